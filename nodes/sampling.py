"""Causal Sampler node: streams latent chunks with the KV cache and returns a Wan LATENT."""

from __future__ import annotations

import dataclasses

import torch

from ..causvid_core.pipeline import RenderRequest, num_chunks, render, seconds_to_frames
from .common import Progress, latent_preview, make_room

LENGTH_UNITS = ("frames", "seconds")
ROPE_MODES = ("model", "absolute", "window")  # "model": the loaded model's own setting


def stream_inputs() -> dict:
    """Inputs shared by every node that streams from a CausVid model."""
    return {
        "width": ("INT", {"default": 832, "min": 16, "max": 4096, "step": 16, "tooltip": "multiple of 16"}),
        "height": ("INT", {"default": 480, "min": 16, "max": 4096, "step": 16, "tooltip": "multiple of 16"}),
        "length": ("FLOAT", {"default": 81, "min": 1, "max": 1_000_000, "step": 1,
                             "tooltip": "video length, in the unit below; there is no upper limit"}),
        "length_unit": (list(LENGTH_UNITS), {"default": "frames"}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
        "kv_window": ("INT", {"default": 0, "min": 0, "max": 64,
                              "tooltip": "recent chunks kept in the KV cache; 0 = the model's own (5 for Wan "
                                         "CausVid: 5 + sink 1 + the new chunk = 21 frames; 2 for embedded:shapes)"}),
        "kv_sink": ("INT", {"default": -1, "min": -1, "max": 16,
                            "tooltip": "first chunks kept forever, anchoring the look of a long video; "
                                       "-1 = the model's own (1 for Wan CausVid, 0 for embedded:shapes)"}),
        "rope_mode": (list(ROPE_MODES), {"default": "model",
                                         "tooltip": "frame positions past the window: absolute, or re-indexed "
                                                    "(window); model = the model's own"}),
        "recache_on_switch": ("BOOLEAN", {"default": True,
                                          "tooltip": "re-compute the cached window under a new prompt (smooth)"}),
    }  # fmt: skip


def plan(model, prompts, width, height, length, length_unit, seed, kv_window, kv_sink, rope_mode,
         recache_on_switch, context=None):  # fmt: skip
    """Core request, causal settings and prompt timeline from node inputs."""
    frames = int(length) if length_unit == "frames" else seconds_to_frames(length, model.fps)
    request = RenderRequest(
        width, height, frames, seed=seed, fps=model.fps, blend_chunks=prompts.blend_chunks,
        recache_on_switch=recache_on_switch,
    )  # fmt: skip
    causal = model.causal  # the model's own settings (its trained horizon), each overridden when set
    if kv_window > 0:
        causal = dataclasses.replace(causal, window_chunks=kv_window)
    if kv_sink >= 0:
        causal = dataclasses.replace(causal, sink_chunks=kv_sink)
    if rope_mode != "model":
        causal = dataclasses.replace(causal, rope_mode=rope_mode)
    context_frames = 0 if context is None else context.shape[2]
    return request, causal, prompts.timeline(model.fps, causal, context_frames)


def context_latents(model, image_seed=None, context=None) -> torch.Tensor | None:
    """Model-space context latents from optional LATENT inputs (image seed first, then context)."""
    parts = [model.to_model(x["samples"]) for x in (image_seed, context) if x is not None]
    return torch.cat(parts, dim=2).to(model.device) if parts else None


class CausVidSampler:
    DESCRIPTION = (
        "Stream a video chunk by chunk with the causal model and its KV cache, at constant cost per chunk, for "
        "any length. Prompts change on the schedule. Returns a Wan LATENT that ComfyUI's VAE Decode (or CausVid "
        "Decode) turns into frames. Shows a preview and progress per chunk; Cancel stops after the current step."
    )
    CATEGORY = "CausVid/sampling"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {"model": ("CAUSVID_MODEL",), "prompts": ("CAUSVID_PROMPTS",), **stream_inputs()},
            "optional": {
                "image_seed": ("LATENT", {"tooltip": "a first frame to start from (Image-to-Video Seed)"}),
                "context": ("LATENT", {"tooltip": "clean latents to continue from (a video to extend)"}),
            },
        }

    def sample(self, model, prompts, image_seed=None, context=None, **settings):
        ctx = context_latents(model, image_seed, context)
        request, causal, timeline = plan(model, prompts, context=ctx, **settings)
        make_room(model.model, causal, request.width, request.height, batch=timeline.changes[0].shape[0])
        progress = Progress(num_chunks(request, causal, 0 if ctx is None else ctx.shape[2]))
        state = render(
            model.model, timeline, request, sampling=model.sampling, causal=causal, context_latents=ctx,
            on_chunk=lambda ev: progress.chunk_done(ev.index + 1, latent_preview(model.to_raw(ev.latents))),
            on_step=Progress.step,
        )  # fmt: skip
        parts = ([ctx.cpu()] if ctx is not None else []) + state.latents
        return ({"samples": model.to_raw(torch.cat(parts, dim=2))},)


NODE_CLASS_MAPPINGS = {"CausVid_Sampler": CausVidSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"CausVid_Sampler": "Causal Sampler (KV cache)"}
