"""Write the shipped workflows (UI and API format) and their sample inputs into workflows/.

Each workflow is described once as a small graph (node id, type, widget values in INPUT_TYPES order,
links); both files come from that description, so the UI file and the API file cannot disagree.
tests/nodes/test_workflows.py checks the widget order against the host's /object_info.

    python scripts/make_workflows.py          # rewrite workflows/*.json, the PNG and the MP4
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "workflows"
PACK = {"pack": "comfyui-causvid", "version": "0.1.0"}
FIRST_FRAME_PNG = "causvid_shapes_first_frame.png"
SOURCE_MP4 = "causvid_shapes_source.mp4"
SHAPES_PROMPT = "a red circle moving right"

# Widget inputs in INPUT_TYPES order (required, then optional); "seed" also takes its control value.
WIDGETS: dict[str, list[str]] = {
    "CausVid_LoadModel": ["model_name", "precision", "attention", "chunk_frames", "denoising_steps",
                          "hf_reference", "lora_name", "lora_strength", "speed"],
    "CausVid_LoadVAE": ["vae_name"],
    "CausVid_PromptSchedule": ["schedule", "unit", "blend_chunks"],
    "CausVid_ImageToVideoSeed": ["width", "height"],
    "CausVid_RenderVideo": ["width", "height", "length", "length_unit", "seed", "kv_window", "kv_sink",
                            "rope_mode", "recache_on_switch", "crf", "filename_prefix", "return_frames", "resume",
                            "colour_anchor", "codec"],
    "CausVid_StreamV2V": ["strength", "width", "height", "seed", "video_path", "max_frames",
                          "filename_prefix", "crf", "codec"],
    "CLIPLoader": ["clip_name", "type", "device"],
    "LoadImage": ["image"],
}  # fmt: skip
# Socket inputs (name, type) in INPUT_TYPES order, and outputs (name, type).
SOCKETS: dict[str, list[tuple[str, str]]] = {
    "CausVid_PromptSchedule": [("clip", "CLIP"), ("model", "CAUSVID_MODEL"), ("conditioning", "CONDITIONING")],
    "CausVid_ImageToVideoSeed": [("image", "IMAGE"), ("vae", "CAUSVID_VAE")],
    "CausVid_RenderVideo": [("model", "CAUSVID_MODEL"), ("vae", "CAUSVID_VAE"), ("prompts", "CAUSVID_PROMPTS"),
                            ("image_seed", "LATENT"), ("context", "LATENT")],
    "CausVid_StreamV2V": [("model", "CAUSVID_MODEL"), ("vae", "CAUSVID_VAE"), ("prompts", "CAUSVID_PROMPTS"),
                          ("images", "IMAGE")],
}  # fmt: skip
OUTPUTS: dict[str, list[tuple[str, str]]] = {
    "CausVid_LoadModel": [("model", "CAUSVID_MODEL")],
    "CausVid_LoadVAE": [("vae", "CAUSVID_VAE")],
    "CausVid_PromptSchedule": [("prompts", "CAUSVID_PROMPTS")],
    "CausVid_ImageToVideoSeed": [("image_seed", "LATENT")],
    "CausVid_RenderVideo": [("images", "IMAGE"), ("path", "STRING")],
    "CausVid_StreamV2V": [("images", "IMAGE"), ("path", "STRING")],
    "CLIPLoader": [("CLIP", "CLIP")],
    "LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
}


@dataclass
class Node:
    """One node: widget values by name and linked inputs as {input name: (origin id, origin slot)}."""

    id: int
    type: str
    widgets: dict[str, Any]
    links: dict[str, tuple[int, int]] = field(default_factory=dict)
    title: str | None = None


def widget_values(node: Node) -> list:
    """widgets_values as the front end saves them: seed adds 'fixed', LoadImage adds its upload button."""
    values: list = []
    for name in WIDGETS[node.type]:
        values.append(node.widgets[name])
        if name == "seed":
            values.append("fixed")
    if node.type == "LoadImage":
        values.append("image")
    return values


def to_api(nodes: list[Node]) -> dict[str, dict]:
    """API format (POST /prompt): widget values and [origin id, slot] links by input name."""
    prompt = {}
    for node in nodes:
        inputs: dict[str, Any] = {name: node.widgets[name] for name in WIDGETS[node.type]}
        for name, _ in SOCKETS.get(node.type, []):
            if name in node.links:
                origin, slot = node.links[name]
                inputs[name] = [str(origin), slot]
        prompt[str(node.id)] = {"class_type": node.type, "inputs": inputs}
    return prompt


def to_ui(nodes: list[Node], title: str, note: str) -> dict:
    """UI format (what users drag into the page), version 0.4, laid out left to right by depth."""
    links: list[list] = []
    out_links: dict[tuple[int, int], list[int]] = {}
    ui_nodes = []
    depth = _depths(nodes)
    rows: dict[int, int] = {}
    for order, node in enumerate(sorted(nodes, key=lambda n: (depth[n.id], n.id))):
        inputs = []
        for slot, (name, kind) in enumerate(SOCKETS.get(node.type, [])):
            link_id = None
            if name in node.links:
                origin, origin_slot = node.links[name]
                link_id = len(links) + 1
                kind_out = dict(OUTPUTS[_by_id(nodes, origin).type])
                links.append(
                    [link_id, origin, origin_slot, node.id, slot, list(kind_out.values())[origin_slot]]
                )
                out_links.setdefault((origin, origin_slot), []).append(link_id)
            inputs.append({"name": name, "type": kind, "link": link_id})
        height = _height(node)
        top = rows.get(depth[node.id], 40)
        rows[depth[node.id]] = top + height + 60
        ui_nodes.append({
            "id": node.id, "type": node.type, "pos": [40 + 380 * depth[node.id], top],
            "size": [340, height], "flags": {}, "order": order, "mode": 0,
            "inputs": inputs, "outputs": [], "properties": {"Node name for S&R": node.type},
            "widgets_values": widget_values(node), **({"title": node.title} if node.title else {}),
        })  # fmt: skip
    for entry in ui_nodes:
        entry["outputs"] = [
            {"name": name, "type": kind, "links": out_links.get((entry["id"], slot), []), "slot_index": slot}
            for slot, (name, kind) in enumerate(OUTPUTS[entry["type"]])
        ]
    note_node = {
        "id": max(n.id for n in nodes) + 1, "type": "Note", "pos": [40 + 380 * (max(depth.values()) + 1), 40], "size": [420, 260], "flags": {},
        "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
        "widgets_values": [note],
    }  # fmt: skip
    return {
        "last_node_id": note_node["id"], "last_link_id": len(links), "nodes": ui_nodes + [note_node],
        "links": links, "groups": [], "config": {}, "version": 0.4,
        "extra": {"causvid": {**PACK, "title": title}, "ds": {"scale": 0.8, "offset": [100, 120]}},
    }  # fmt: skip


def _height(node: Node) -> int:
    """Node height on the canvas: title, slot rows, widget rows (the schedule box is taller)."""
    slots = max(len(SOCKETS.get(node.type, [])), len(OUTPUTS[node.type]))
    extra = 90 if node.type == "CausVid_PromptSchedule" else 0
    return 40 + 24 * (slots + len(widget_values(node))) + extra


def _by_id(nodes: list[Node], node_id: int) -> Node:
    return next(n for n in nodes if n.id == node_id)


def _depths(nodes: list[Node]) -> dict[int, int]:
    """Column of each node: one more than its deepest input."""
    depth: dict[int, int] = {}

    def visit(node: Node) -> int:
        if node.id not in depth:
            depth[node.id] = 1 + max((visit(_by_id(nodes, o)) for o, _ in node.links.values()), default=-1)
        return depth[node.id]

    for node in nodes:
        visit(node)
    return depth


# ------------------------------------------------------------------------------------------- workflows


def loaders(wan: bool, schedule: str, unit: str = "second", blend: int = 0) -> list[Node]:
    """Model, VAE, prompt schedule (and Wan's umT5 CLIP): ids 1, 2, 3 (and 4)."""
    model = "causvid_1.3b_autoregressive.safetensors" if wan else "embedded:shapes"
    nodes = [
        Node(1, "CausVid_LoadModel", {
            "model_name": model, "precision": "auto", "attention": "auto", "chunk_frames": 0, "denoising_steps": "",
            "hf_reference": "", "lora_name": "None", "lora_strength": 1.0, "speed": ""}),
        Node(2, "CausVid_LoadVAE", {"vae_name": "wan_2.1_vae.safetensors" if wan else "embedded:shapes"}),
        Node(3, "CausVid_PromptSchedule", {"schedule": schedule, "unit": unit, "blend_chunks": blend},
             {"clip": (4, 0)} if wan else {"model": (1, 0)}),
    ]  # fmt: skip
    if wan:
        clip = {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan", "device": "default"}
        nodes.append(Node(4, "CLIPLoader", clip))
    return nodes


def render(wan: bool, prefix: str, length: float, **links: tuple[int, int]) -> Node:
    """Render Video (id 10) at 832x480 (Wan) or 64x64 (Shapes), length in seconds."""
    width, height = (832, 480) if wan else (64, 64)
    widgets = {
        "width": width, "height": height, "length": length, "length_unit": "seconds", "seed": 42,
        "kv_window": 0, "kv_sink": -1, "rope_mode": "model", "recache_on_switch": True, "crf": 18,
        "filename_prefix": f"causvid/{prefix}", "return_frames": length <= 20, "resume": "", "colour_anchor": 0.0, "codec": "h264",
    }  # fmt: skip
    return Node(
        10, "CausVid_RenderVideo", widgets, {"model": (1, 0), "vae": (2, 0), "prompts": (3, 0), **links}
    )


WAN_PROMPT = "A red fox trots through fresh snow in a birch forest at sunrise, cinematic, soft light"
WAN_SCHEDULE = """# seconds: prompt (one change per line; changes blend over 2 chunks)
0: A red fox trots through fresh snow in a birch forest at sunrise, cinematic
20: The fox reaches a frozen lake, ice glittering, mountains in the distance
40: Snow begins to fall heavily, the fox walks along the shore, soft grey light
60: The storm clears, golden evening light over the lake, long shadows
80: Night falls, the aurora borealis ripples green above the fox
100: Dawn breaks over the valley, the fox curls up to sleep in the snow"""
SHAPES_SCHEDULE = """# seconds: prompt (one change per line; changes blend over 2 chunks)
0: a red circle moving right
20: a blue square moving left
40: a green triangle moving up
60: a yellow circle moving down on a white background
80: a red square moving right on a blue background
100: a white triangle moving left"""


def workflows() -> dict[str, tuple[list[Node], str]]:
    """name -> (graph, note shown on the canvas)."""
    out: dict[str, tuple[list[Node], str]] = {}
    for wan in (False, True):
        kind = "wan" if wan else "embedded"
        need = (
            "Needs models/causvid/causvid_1.3b_autoregressive.safetensors (a CausVid Wan2.1 1.3B checkpoint), "
            "models/vae/wan_2.1_vae.safetensors and models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors."
            if wan
            else "Runs on any CPU with the embedded Shapes model (64x64, 16 fps); nothing to download."
        )
        prompt = WAN_PROMPT if wan else SHAPES_PROMPT
        out[f"{kind}-text-to-video"] = (
            [*loaders(wan, f"0: {prompt}"), render(wan, "t2v", 5 if wan else 10)],
            f"Text to video with CausVid's causal sampler. {need}",
        )
        out[f"{kind}-long-video-schedule"] = (
            [*loaders(wan, WAN_SCHEDULE if wan else SHAPES_SCHEDULE, blend=2), render(wan, "long", 120)],
            "A 2-minute video whose prompt changes every 20 seconds (blended over 2 chunks); cost per chunk stays "
            f"constant (KV cache window), frames are written to the mp4 as they are made. {need}",
        )
        image = "example.png" if wan else FIRST_FRAME_PNG
        size = (832, 480) if wan else (64, 64)
        i2v = [
            *loaders(wan, f"0: {prompt}"),
            Node(5, "LoadImage", {"image": image}),
            Node(6, "CausVid_ImageToVideoSeed", {"width": size[0], "height": size[1]},
                 {"image": (5, 0), "vae": (2, 0)}),
            render(wan, "i2v", 5 if wan else 10, image_seed=(6, 0)),
        ]  # fmt: skip
        out[f"{kind}-image-to-video"] = (
            i2v,
            f"Image to video: the loaded image is the first frame. {need}"
            + ("" if wan else f" Put {FIRST_FRAME_PNG} (shipped in workflows/) in ComfyUI's input folder."),
        )
        v2v_prompt = (
            "0: A watercolor painting, soft brush strokes" if wan else "0: a blue square moving right"
        )
        v2v = Node(10, "CausVid_StreamV2V", {
            "strength": 0.6, "width": size[0], "height": size[1], "seed": 42,
            "video_path": "source.mp4" if wan else SOURCE_MP4, "max_frames": 0,
            "filename_prefix": "causvid/v2v", "crf": 18, "codec": "h264"}, {"model": (1, 0), "vae": (2, 0), "prompts": (3, 0)})  # fmt: skip
        out[f"{kind}-stream-video-to-video"] = (
            [*loaders(wan, v2v_prompt), v2v],
            "Stream video to video: the source is read, restyled and written chunk by chunk. "
            + need
            + (" Put your video in ComfyUI's input folder as source.mp4." if wan
               else f" Put {SOURCE_MP4} (shipped in workflows/) in ComfyUI's input folder."),
        )  # fmt: skip
    return out


def write_samples(folder: Path) -> None:
    """The 64x64 first-frame PNG and the 2-second source MP4 the embedded workflows load."""
    sys.path.insert(0, str(REPO))
    from PIL import Image

    from causvid_core.video_io import VideoWriter
    from training.shapes import render_frames

    Image.fromarray(render_frames(SHAPES_PROMPT, 0, 0, 1, 64)[0]).save(folder / FIRST_FRAME_PNG)
    with VideoWriter(folder / SOURCE_MP4, fps=16, crf=23) as writer:
        writer.write(render_frames("a green triangle moving right on a white background", 1, 0, 33, 64))


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Rewrite workflows/*.json (UI and API format) and their sample inputs.")
    ap.add_argument("--no-samples", action="store_true", help="leave the sample PNG and MP4 as they are")
    args = ap.parse_args(argv)
    OUT.mkdir(exist_ok=True)
    for name, (nodes, note) in workflows().items():
        title = name.replace("-", " ")
        (OUT / f"{name}.json").write_text(json.dumps(to_ui(nodes, title, note), indent=2) + "\n")
        (OUT / f"{name}.api.json").write_text(json.dumps(to_api(nodes), indent=2) + "\n")
    if not args.no_samples:
        write_samples(OUT)


if __name__ == "__main__":
    main()
