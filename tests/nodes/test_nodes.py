"""Our nodes in the real ComfyUI host, in-process: registration, runs to a file, progress, interrupt, errors."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from causvid_core.video_io import probe_video

NODE_IDS = [
    "CausVid_LoadModel", "CausVid_LoadVAE", "CausVid_PromptSchedule", "CausVid_Sampler",
    "CausVid_ImageToVideoSeed", "CausVid_StreamV2V", "CausVid_Decode", "CausVid_RenderVideo",
]  # fmt: skip


def loaders() -> dict:
    return {
        "1": {"class_type": "CausVid_LoadModel", "inputs": {
            "model_name": "embedded:shapes", "precision": "auto", "attention": "auto", "chunk_frames": 0,
            "denoising_steps": ""}},
        "2": {"class_type": "CausVid_LoadVAE", "inputs": {"vae_name": "embedded:shapes"}},
        "3": {"class_type": "CausVid_PromptSchedule", "inputs": {
            "schedule": "0: a red circle moving right\n1: a blue square moving left", "unit": "chunk",
            "blend_chunks": 0, "model": ["1", 0]}},
    }  # fmt: skip


def empty_image(width: int, height: int, frames: int, colour: int) -> dict:
    """ComfyUI's own EmptyImage node: ``frames`` images of one colour."""
    return {"class_type": "EmptyImage",
            "inputs": {"width": width, "height": height, "batch_size": frames, "color": colour}}  # fmt: skip


def stream(**over) -> dict:
    base = {"width": 32, "height": 32, "length": 33, "length_unit": "frames", "seed": 0, "kv_window": 2,
            "kv_sink": 1, "rope_mode": "absolute", "recache_on_switch": True}  # fmt: skip
    return {**base, **over}


def render_prompt(**over) -> dict:
    p = loaders()
    p["4"] = {"class_type": "CausVid_RenderVideo", "inputs": {
        "model": ["1", 0], "vae": ["2", 0], "prompts": ["3", 0], "crf": 18, "filename_prefix": "causvid/test",
        "return_frames": True, **stream(**over)}}  # fmt: skip
    return p


def test_every_node_registers_with_descriptions(host) -> None:
    import nodes as comfy_nodes

    for node_id in NODE_IDS:
        cls = comfy_nodes.NODE_CLASS_MAPPINGS[node_id]
        assert cls.CATEGORY.startswith("CausVid/") and len(cls.DESCRIPTION) > 40, node_id
        assert node_id in comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS


def test_render_video_writes_the_file_with_progress_per_chunk(host, embedded, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="causvid"):
        result = host.execute(render_prompt())
    assert result.success, result.error
    # before it starts, the node logs what the KV cache will hold (the test model: sink 1 + window 2)
    assert "CausVid: KV cache 36.0 KB: 1 sink + 2 window chunks of 3 latent frames at 4x4 latents" in caplog.text
    # and after it, the colour drift of its chunks against the first (the colour_anchor input is off)
    assert "CausVid Render Video: colour drift against the start (0-255): largest shift" in caplog.text
    assert "anchored" not in caplog.text
    path = Path(result.value("4", 1))
    info = probe_video(path)
    assert info.frames == 33 and (info.width, info.height) == (32, 32)
    assert result.value("4", 0).shape == (33, 32, 32, 3)
    updates = [p for p in result.progress if p["node"] == "4"]
    assert [u["value"] for u in updates] == [1, 2, 3] and updates[-1][
        "max"
    ] == 3  # 9 latent frames = 3 chunks
    assert result.outputs["4"]["images"][0]["filename"] == path.name
    video = result.value("4", 2)  # ComfyUI's own VIDEO type, on hosts that have it (v0.3.75 does)
    assert video.get_dimensions() == (32, 32) and abs(video.get_duration() - 33 / 16) < 0.1


def test_cache_inputs_default_to_the_models_own_settings(host, embedded) -> None:
    """0 / -1 / 'model' render with the cache the checkpoint names (the test model: sink 1, window 2,
    absolute); a value set on the node overrides it. 65 frames = 6 chunks, so the window rolls."""

    def frames(**over):
        result = host.execute(render_prompt(length=65, **over))
        assert result.success, result.error
        return result.value("4", 0)

    own = frames(kv_window=0, kv_sink=-1, rope_mode="model")
    assert np.array_equal(own, frames(kv_window=2, kv_sink=1, rope_mode="absolute"))
    assert not np.array_equal(own, frames(kv_window=1, kv_sink=-1, rope_mode="model"))
    assert not np.array_equal(own, frames(kv_window=0, kv_sink=0, rope_mode="model"))
    assert not np.array_equal(own, frames(kv_window=0, kv_sink=-1, rope_mode="window"))


def test_colour_anchor_holds_each_chunks_colours_to_the_new_prompts_first(host, embedded) -> None:
    """The test schedule switches prompt at chunk 1 (no blend): with colour_anchor 1 the chunks after it keep
    chunk 1's mean colours, which are the new prompt's own (chunk 0's are not imposed on them)."""

    def chunk_means(**over) -> np.ndarray:
        result = host.execute(render_prompt(length=65, **over))
        assert result.success, result.error
        video = result.value("4", 0).numpy()  # IMAGE [65, 32, 32, 3] in 0..1: chunks of 9, then 12 frames
        bounds = ((0, 9), (9, 21), (21, 33), (33, 45), (45, 57))
        return np.stack([video[a:b].reshape(-1, 3).mean(0) * 255 for a, b in bounds])

    free, held = chunk_means(), chunk_means(colour_anchor=1.0)
    np.testing.assert_allclose(held[:2], free[:2], atol=0.05)  # the references are written as they come
    assert np.abs(held[2:] - held[1]).max() < 1.0 < 2.0 < np.abs(free[2:] - free[1]).max()


def test_load_with_speed_options_renders_the_reference_frames(host, embedded) -> None:
    """Load CausVid's ``speed`` input (ring cache + fused QKV) renders what the reference path renders,
    past the first eviction of the window (65 frames = 17 latent frames, 6 chunks, sink 1 + window 2)."""
    import numpy as np

    frames = []
    for speed in ("", "ring,fused_qkv"):
        p = render_prompt(length=65)
        p["1"]["inputs"]["speed"] = speed
        result = host.execute(p)
        assert result.success, result.error
        frames.append(np.asarray(result.value("4", 0), dtype=np.float32))
    assert frames[0].shape == frames[1].shape == (65, 32, 32, 3)
    assert np.abs(frames[0] - frames[1]).max() <= 1e-4


def test_cancel_mid_render_leaves_a_playable_partial_file(host, embedded, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="causvid"):
        result = host.execute(render_prompt(length=65), interrupt_after=2)
    assert result.interrupted
    files = sorted((host.output_dir / "causvid").glob("test_*.mp4"), key=os.path.getmtime)
    info = probe_video(files[-1])
    assert 9 <= info.frames < 65  # the finished chunks, not the whole video
    # the console says which file holds them and what to put in 'resume' to finish it
    assert f"put 'causvid/{files[-1].name}' in the node's 'resume' input" in caplog.text


def test_sampler_latent_decodes_and_image_seed_starts_the_video(host, embedded) -> None:
    later = []
    for colour in (0xFF0000, 0x0000FF):
        p = loaders()
        p["5"] = empty_image(32, 32, 1, colour)
        p["6"] = {"class_type": "CausVid_ImageToVideoSeed", "inputs": {"image": ["5", 0], "vae": ["2", 0],
                                                                      "width": 32, "height": 32}}  # fmt: skip
        p["7"] = {"class_type": "CausVid_Sampler", "inputs": {"model": ["1", 0], "prompts": ["3", 0],
                                                             "image_seed": ["6", 0], **stream(length=21)}}  # fmt: skip
        p["8"] = {
            "class_type": "CausVid_Decode",
            "inputs": {"vae": ["2", 0], "latent": ["7", 0], "chunk_frames": 3},
        }
        p["9"] = {
            "class_type": "PreviewImage",
            "inputs": {"images": ["8", 0]},
        }  # ComfyUI's own node takes our IMAGE
        result = host.execute(p)
        assert result.success, result.error
        latent = result.value("7")["samples"]
        assert tuple(latent.shape) == (1, 16, 6, 4, 4)  # the image latent + 5 generated frames
        # the video starts at the seed image's latent, and what follows is generated from it
        assert torch.allclose(latent[:, :, :1], result.value("6")["samples"].float(), atol=1e-4)
        assert result.value("8").shape == (21, 32, 32, 3)
        later.append(latent[:, :, 1:])
    assert not torch.allclose(later[0], later[1], atol=1e-3)  # another first frame, another continuation


def test_stream_v2v_restyles_every_frame(host, embedded) -> None:
    outputs = []
    for colour in (0x00FF00, 0x0000FF):
        p = loaders()
        p["5"] = empty_image(40, 36, 14, colour)
        p["6"] = {"class_type": "CausVid_StreamV2V", "inputs": {
            "model": ["1", 0], "vae": ["2", 0], "prompts": ["3", 0], "strength": 0.6, "width": 32, "height": 32,
            "seed": 0, "video_path": "", "max_frames": 0, "filename_prefix": "causvid/v2v", "crf": 18,
            "images": ["5", 0]}}  # fmt: skip
        result = host.execute(p)
        assert result.success, result.error
        frames = np.asarray(result.value("6"), dtype=np.float32)
        assert frames.shape == (14, 32, 32, 3)
        assert probe_video(result.value("6", 1)).frames == 14
        source = np.array([(colour >> 16) & 255, (colour >> 8) & 255, colour & 255], np.float32) / 255
        assert np.abs(frames - source).mean() > 0.05  # restyled, not the source frames passed through
        outputs.append(frames)
    assert not np.allclose(outputs[0], outputs[1], atol=1e-3)  # the source still shapes the result


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p["4"]["inputs"].update(width=40), "width 40 is not a multiple of 16; use 32 or 48"),
        (lambda p: p["3"]["inputs"].update(schedule="0: a red circle moving right\n2 a purple x"),
         r"line 2"),
        (lambda p: p["2"]["inputs"].update(vae_name="embedded:shapes") or p["1"]["inputs"].update(
            denoising_steps="fast"), "comma-separated integers"),
        (lambda p: p["1"]["inputs"].update(speed="ring,turbo"), r"unknown speed options \['turbo'\]"),
    ],
)  # fmt: skip
def test_bad_inputs_fail_with_the_nodes_message(host, embedded, change, message) -> None:
    import re

    prompt = render_prompt()
    change(prompt)
    result = host.execute(prompt)
    assert not result.success
    assert re.search(message, result.error), result.error


def test_missing_video_file_is_named(host, embedded) -> None:
    p = loaders()
    p["6"] = {"class_type": "CausVid_StreamV2V", "inputs": {
        "model": ["1", 0], "vae": ["2", 0], "prompts": ["3", 0], "strength": 0.6, "width": 32, "height": 32,
        "seed": 0, "video_path": "nowhere.mp4", "max_frames": 0, "filename_prefix": "", "crf": 18}}  # fmt: skip
    result = host.execute(p)
    assert "video 'nowhere.mp4' was not found" in (result.error or "")


def test_load_model_offers_and_loads_a_gguf_from_diffusion_models(host, tmp_path: Path) -> None:
    """A ComfyUI-GGUF Wan file in models/diffusion_models (or models/unet) is listed by Load CausVid, not by
    the host's own UNETLoader (which cannot read it), and loads as the same model."""
    import folder_paths

    import nodes as comfy_nodes
    from causvid_core.config import DiTConfig
    from causvid_core.model import CausalWanModel
    from tests.helpers import write_gguf

    gguf = pytest.importorskip("gguf")
    small = DiTConfig(dim=256, ffn_dim=192, num_heads=2, num_layers=2, freq_dim=32, text_dim=32)
    sd = {k: v.detach().clone() for k, v in CausalWanModel(small).state_dict().items()}
    folder = tmp_path / "unet"
    folder.mkdir()
    write_gguf(folder / "wan-small-Q8_0.gguf", sd, gguf.GGMLQuantizationType.Q8_0)
    (folder / "readme.txt").write_text("not a model")
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    try:
        names = host.object_info("CausVid_LoadModel")["input"]["required"]["model_name"][0]
        assert "wan-small-Q8_0.gguf" in names and "readme.txt" not in names
        host_names = comfy_nodes.NODE_CLASS_MAPPINGS["UNETLoader"].INPUT_TYPES()["required"]["unet_name"][0]
        assert "wan-small-Q8_0.gguf" not in host_names
        (bundle,) = host.node_classes["CausVid_LoadModel"]().load("wan-small-Q8_0.gguf", "fp32", "auto", 0, "")
        # the node imports the package as a custom node, so its DiTConfig is another class: compare fields
        assert bundle.report.layout == "gguf" and vars(bundle.model.config) == vars(small)
        assert bundle.report.source_dtypes["Q8_0"] > 0 and bundle.report.packed == {}  # a CPU unpacks
    finally:
        folder_paths.folder_names_and_paths["diffusion_models"][0].remove(str(folder))
