"""VAE, decode, image-to-video, video-to-video and render nodes: frames in and out, chunk by chunk."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths
import torch

from ..causvid_core.bundle import part_file
from ..causvid_core.pipeline import PromptTimeline, RenderState, num_chunks, restyle
from ..causvid_core.resume import RenderJob, render_to_file, resolve_resume
from ..causvid_core.vae import load_wan_vae
from ..causvid_core.video_io import VideoWriter, image_to_vae, read_video_chunks, vae_to_image
from .common import (
    EMBEDDED_MODELS,
    LRU,
    Progress,
    device,
    file_key,
    full_path,
    make_room,
    model_files,
    preview_image,
)
from .sampling import context_latents, plan, stream_inputs

LOG = logging.getLogger("causvid")
CODEC_INPUT = (["h264", "h265"], {"default": "h264", "tooltip": (
    "h265 (HEVC): often smaller files at the same quality (crf scales differ a little)")})  # fmt: skip

_VAES = LRU(size=2)

try:  # ComfyUI's VIDEO type (hosts since mid 2025): the rendered file, for the host's own video nodes
    from comfy_api.latest import InputImpl

    VideoFromFile = InputImpl.VideoFromFile
except (ImportError, AttributeError):
    VideoFromFile = None
VIDEO_OUTPUT = ("VIDEO",) if VideoFromFile is not None else ()


class CausVidLoadVAE:
    DESCRIPTION = (
        "Load a Wan2.1 VAE (models/vae: Wan2.1_VAE.pth or wan_2.1_vae.safetensors) or the embedded one."
    )
    CATEGORY = "CausVid/loaders"
    RETURN_TYPES = ("CAUSVID_VAE",)
    RETURN_NAMES = ("vae",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        names = list(EMBEDDED_MODELS) + model_files("vae")
        return {
            "required": {"vae_name": (names, {"tooltip": "embedded:shapes goes with the embedded model"})}
        }

    def load(self, vae_name):
        if vae_name.startswith("embedded:"):
            path = str(part_file(vae_name, "vae"))
        else:
            path = full_path(vae_name, "vae")
        dev = device()
        return (_VAES.get((file_key(path), str(dev)), lambda: load_wan_vae(path, device=dev)),)


class CausVidDecode:
    DESCRIPTION = (
        "Decode a Wan LATENT to frames chunk by chunk with the causal VAE: memory stays bounded however long the "
        "video, and the frames equal a full decode."
    )
    CATEGORY = "CausVid/video"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "vae": ("CAUSVID_VAE",),
                "latent": ("LATENT",),
                "chunk_frames": (
                    "INT",
                    {"default": 3, "min": 1, "max": 64, "tooltip": "latent frames per pass"},
                ),
            }
        }

    def decode(self, vae, latent, chunk_frames):
        raw = latent["samples"]
        decoder = vae.stream_decoder()
        progress = Progress((raw.shape[2] + chunk_frames - 1) // chunk_frames)
        frames = []
        for i, start in enumerate(range(0, raw.shape[2], chunk_frames)):
            z = vae.normalize(raw[:, :, start : start + chunk_frames].to(device()))
            with torch.no_grad():
                video = decoder.decode(z)
            frames.append(vae_to_image(video).cpu())
            progress.chunk_done(i + 1, preview_image(video))
        return (torch.cat(frames, dim=0),)


class CausVidImageToVideoSeed:
    DESCRIPTION = (
        "Encode a first frame for image-to-video: the image is resized (centre crop) to the video size and "
        "encoded as one clean latent frame that the Causal Sampler or Render Video starts from."
    )
    CATEGORY = "CausVid/video"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("image_seed",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "the first image of a batch is used"}),
                "vae": ("CAUSVID_VAE",),
                "width": ("INT", {"default": 832, "min": 16, "max": 4096, "step": 16}),
                "height": ("INT", {"default": 480, "min": 16, "max": 4096, "step": 16}),
            }
        }

    def encode(self, image, vae, width, height):
        frame = _fit(image[:1], width, height)
        with torch.no_grad():
            mu = vae.encode_raw(image_to_vae(frame).to(device()))
        return ({"samples": mu.cpu()},)


def _fit(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize IMAGE [N, H, W, 3] to cover width x height, then centre-crop."""
    n, h, w, _ = images.shape
    scale = max(width / w, height / h)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    x = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2), size=(nh, nw), mode="bilinear",
                                        align_corners=False, antialias=True)  # fmt: skip
    top, left = (nh - height) // 2, (nw - width) // 2
    return x[:, :, top : top + height, left : left + width].permute(0, 2, 3, 1).clamp(0, 1)


def _output_path(prefix: str, width: int, height: int) -> tuple[str, str, str]:
    """A new mp4 path inside the output folder: (full path, file name, subfolder)."""
    out_dir = folder_paths.get_output_directory()
    full_dir, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, out_dir, width, height)
    filename = f"{name}_{counter:05}_.mp4"  # the trailing _ is what the host's counter scans for
    return os.path.join(full_dir, filename), filename, subfolder


def _resume_target(text: str) -> tuple[str, str, str]:
    """The interrupted mp4 a resume input names (inside the output folder): (full path, file name, subfolder)."""
    out_dir = Path(folder_paths.get_output_directory()).resolve()
    path = Path(text.strip())
    path = (path if path.is_absolute() else out_dir / path).resolve()
    if not path.is_relative_to(out_dir):
        raise ValueError(
            f"resume path '{text}' is outside ComfyUI's output folder {out_dir}: give the interrupted file "
            "relative to it, e.g. causvid/video_00001_.mp4"
        )
    mp4 = resolve_resume(path)[0]
    sub = mp4.parent.relative_to(out_dir)
    return str(mp4), mp4.name, "" if sub == Path() else str(sub)


class CausVidRenderVideo:
    DESCRIPTION = (
        "Sample, decode and write an mp4 chunk by chunk: the file grows while the video is made, memory stays "
        "flat, a preview and progress show per chunk, and Cancel (or a crash) leaves a playable file with every "
        "finished chunk plus a .resume file; put the file's name in 'resume' to finish the same video. Returns "
        "the frames too (IMAGE) for other video nodes."
    )
    CATEGORY = "CausVid/video"
    RETURN_TYPES = ("IMAGE", "STRING", *VIDEO_OUTPUT)
    RETURN_NAMES = ("images", "path", *(("video",) if VIDEO_OUTPUT else ()))
    OUTPUT_NODE = True
    FUNCTION = "render"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("CAUSVID_MODEL",),
                "vae": ("CAUSVID_VAE",),
                "prompts": ("CAUSVID_PROMPTS",),
                **stream_inputs(),
                "crf": ("INT", {"default": 18, "min": 0, "max": 51, "tooltip": "H.264 quality: lower is better"}),
                "filename_prefix": ("STRING", {"default": "causvid/video"}),
                "return_frames": ("BOOLEAN", {"default": True,
                                              "tooltip": "off for very long videos: keep only the file"}),
            },
            "optional": {
                "image_seed": ("LATENT",),
                "context": ("LATENT",),
                "resume": ("STRING", {"default": "", "tooltip": (
                    "continue an interrupted render: its .mp4 (or .mp4.resume) in the output folder, e.g. "
                    "causvid/video_00001_.mp4; every other input must be as it was. Empty: a new video")}),
                "colour_anchor": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": (
                    "hold each chunk's colours and contrast to the start's (after a prompt change: to the new "
                    "prompt's first chunk); 0 = off, 1 = matched. Changes the written frames only")}),
                "codec": CODEC_INPUT,
            },
        }  # fmt: skip

    def render(self, model, vae, prompts, crf, filename_prefix, return_frames, image_seed=None, context=None,
               resume="", colour_anchor=0.0, codec="h264", **settings):  # fmt: skip
        ctx = context_latents(model, image_seed, context)
        request, causal, timeline = plan(model, prompts, context=ctx, **settings)
        make_room(model.model, causal, request.width, request.height, batch=timeline.changes[0].shape[0])
        if resume.strip():
            path, filename, subfolder = _resume_target(resume)
        else:
            path, filename, subfolder = _output_path(filename_prefix, request.width, request.height)
        job = RenderJob(model.model, vae, timeline, request, Path(path), sampling=model.sampling, causal=causal,
                        settings={"model": model.name}, context_latents=ctx, crf=crf,
                        colour_anchor=colour_anchor, codec=codec)  # fmt: skip
        progress = Progress(num_chunks(request, causal, 0 if ctx is None else ctx.shape[2]))
        frames: list[torch.Tensor] = []

        def on_chunk(event) -> None:
            if return_frames:
                frames.append(vae_to_image(event.frames).cpu())
            progress.chunk_done(event.index + 1, preview_image(event.frames))

        try:
            with torch.no_grad():
                state = render_to_file(job, resume=bool(resume.strip()), on_chunk=on_chunk, on_step=Progress.step)
        except BaseException:  # Cancel, a full disk, a NaN chunk: say where the finished part is and how to go on
            if Path(path).exists():
                name = f"{subfolder}/{filename}" if subfolder else filename
                LOG.warning("CausVid Render Video stopped: %s keeps the finished chunks; put '%s' in the node's "
                            "'resume' input and queue it again to finish the same video", path, name)  # fmt: skip
            raise
        LOG.info("CausVid Render Video: %s", state.colours.report())
        images = torch.cat(frames, dim=0)[: request.num_frames] if frames else torch.zeros(1, 64, 64, 3)
        ui = {
            "images": [{"filename": filename, "subfolder": subfolder, "type": "output"}],
            "animated": (True,),
        }
        video = (VideoFromFile(path),) if VideoFromFile is not None else ()
        return {"ui": ui, "result": (images, path, *video)}


class CausVidStreamV2V:
    DESCRIPTION = (
        "Restyle a video chunk by chunk: each chunk is encoded, noised to the strength, denoised by the causal "
        "model under the prompts and decoded, so frames come out while the source is still being read. Takes "
        "frames (IMAGE) or a video file; can write the result as it goes."
    )
    CATEGORY = "CausVid/video"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("images", "path")
    OUTPUT_NODE = True
    FUNCTION = "restyle"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("CAUSVID_MODEL",),
                "vae": ("CAUSVID_VAE",),
                "prompts": ("CAUSVID_PROMPTS",),
                "strength": ("FLOAT", {"default": 0.6, "min": 0.01, "max": 1.0, "step": 0.01,
                                       "tooltip": "how far from the source: the first step is at timestep strength x 1000 "
                                                  "(low keeps the layout, high takes the prompt; 1 ignores it)"}),
                "width": ("INT", {"default": 832, "min": 16, "max": 4096, "step": 16}),
                "height": ("INT", {"default": 480, "min": 16, "max": 4096, "step": 16}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
                "video_path": ("STRING", {"default": "", "tooltip": "a file in the input folder, or a full path; "
                                                                    "used when no images are connected"}),
                "max_frames": ("INT", {"default": 0, "min": 0, "max": 1_000_000, "tooltip": "0 = all"}),
                "filename_prefix": ("STRING", {"default": "", "tooltip": "empty: do not write a file"}),
                "crf": ("INT", {"default": 18, "min": 0, "max": 51}),
            },
            "optional": {
                "images": ("IMAGE",),
                "codec": CODEC_INPUT,
            },
        }  # fmt: skip

    def restyle(self, model, vae, prompts, strength, width, height, seed, video_path, max_frames,
                filename_prefix, crf, images=None, codec="h264"):  # fmt: skip
        k = model.causal.chunk_frames
        chunks = _source_chunks(images, video_path, width, height, 4 * k, max_frames, model.fps)
        timeline = PromptTimeline.from_schedule(
            prompts.entries, prompts.conditioning, prompts.unit, fps=model.fps, causal=model.causal
        )
        path = _output_path(filename_prefix, width, height)[0] if filename_prefix else ""
        make_room(model.model, model.causal, width, height)
        frames: list[torch.Tensor] = []
        progress = Progress(0)

        def on_chunk(event) -> None:
            frames.append(vae_to_image(event.frames).cpu())
            progress.bar.update_absolute(event.index + 1, event.index + 2, preview_image(event.frames))
            Progress.step(0, 0, event.frames)

        writer = VideoWriter(path, fps=model.fps, crf=crf, codec=codec) if path else None
        try:
            with torch.no_grad():
                restyle(model.model, vae, chunks, timeline, strength=strength, seed=seed, sampling=model.sampling,
                        causal=model.causal, blend_chunks=prompts.blend_chunks, writer=writer, on_chunk=on_chunk,
                        on_step=Progress.step, state=RenderState())  # fmt: skip
        except BaseException:
            if writer is not None:
                LOG.warning("CausVid Stream V2V stopped: %s is partial, the first %d restyled frames", path,
                            sum(f.shape[0] for f in frames))  # fmt: skip
            raise
        finally:
            if writer is not None:
                writer.close()
        return (torch.cat(frames, dim=0), path)


def _source_chunks(images, video_path, width, height, chunk, max_frames, fps):
    """uint8 [t, H, W, 3] chunks from IMAGE frames or a video file: 1 + chunk - 4 first, then chunk."""
    first = chunk - 3
    if images is not None:
        frames = (_fit(images, width, height) * 255).round().to(torch.uint8)
        if max_frames:
            frames = frames[:max_frames]
        yield frames[:first]
        for start in range(first, frames.shape[0], chunk):
            yield frames[start : start + chunk]
        return
    if not video_path.strip():
        raise ValueError("Stream V2V needs frames: connect images or give a video_path")
    path = video_path if os.path.isabs(video_path) else folder_paths.get_annotated_filepath(video_path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"video '{video_path}' was not found (looked at {path}): put it in the input folder"
        )
    for part in read_video_chunks(path, chunk, first_chunk_frames=first, fps=fps, size=(width, height),
                                  max_frames=max_frames or None):  # fmt: skip
        yield torch.from_numpy(part)


NODE_CLASS_MAPPINGS = {
    "CausVid_LoadVAE": CausVidLoadVAE,
    "CausVid_Decode": CausVidDecode,
    "CausVid_ImageToVideoSeed": CausVidImageToVideoSeed,
    "CausVid_RenderVideo": CausVidRenderVideo,
    "CausVid_StreamV2V": CausVidStreamV2V,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "CausVid_LoadVAE": "Load CausVid VAE",
    "CausVid_Decode": "CausVid Decode (streaming)",
    "CausVid_ImageToVideoSeed": "Image-to-Video Seed (CausVid)",
    "CausVid_RenderVideo": "CausVid Render Video",
    "CausVid_StreamV2V": "Stream V2V (CausVid)",
}
