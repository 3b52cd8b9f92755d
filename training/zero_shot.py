"""Zero-shot applications of a Shapes student, each measured: ``python -m training.zero_shot --model M``.

- ``schedule``: a prompt schedule that changes direction or colour mid-stream; direction and colour
  accuracy of each segment (the chunk after the switch is left out: the model needs it to turn);
- ``image``: image-to-video from a rendered first frame; the distance (px) of the first generated frames'
  object from where the rendered video has it, and colour and shape accuracy over the video;
- ``v2v``: video-to-video that recolours a rendered video; accuracy of the target colour and the mean
  distance (px) between the output's object path and the source's (target: within 2 px).
None of these was trained for: the student only ever saw text-to-video with one prompt.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from causvid_core.pipeline import PromptTimeline, RenderRequest, render, restyle

from .generators import FrameCollector
from .metrics import frame_stats, score_video, wrapped
from .shapes import COLOURS, DIRECTIONS, FPS, ShapesPrompt, parse_prompt, prompt_set, render_video


def _other(options: tuple[str, ...], current: str, k: int) -> str:
    rest = [o for o in options if o != current]
    return rest[k % len(rest)]


def schedule_switch(bundle: Any, vae: Any, prompts: list[str], seconds: float = 6.0) -> dict[str, Any]:
    """Half the cases switch direction, half colour, at the middle chunk boundary."""
    causal = bundle.causal
    frames = int(round(seconds * FPS))
    chunk_px = 4 * causal.chunk_frames
    rows = []
    for i, text in enumerate(prompts):
        p = parse_prompt(text)
        kind = "direction" if i % 2 == 0 else "colour"
        q = (ShapesPrompt(p.colour, p.shape, _other(DIRECTIONS, p.direction, i), p.background) if kind == "direction"
             else ShapesPrompt(_other(tuple(COLOURS), p.colour, i), p.shape, p.direction, p.background))  # fmt: skip
        request = RenderRequest(64, 64, frames, seed=i, fps=FPS)
        latent_frames = request.latent_frames
        switch_chunk = max(1, (latent_frames // causal.chunk_frames) // 2)
        contexts = [bundle.text_encoder.encode([p.text]), bundle.text_encoder.encode([q.text])]
        timeline = PromptTimeline({0: contexts[0], switch_chunk: contexts[1]})
        out = FrameCollector()
        with torch.no_grad():
            render(bundle.model, timeline, request, decoder=vae.stream_decoder(), writer=out,
                   sampling=bundle.sampling, causal=causal, keep_latents=False)  # fmt: skip
        video = out.video(frames)
        cut = 1 + 4 * (switch_chunk * causal.chunk_frames - 1)  # first pixel frame of the switch chunk
        before = score_video(video[:cut], p.text)
        after = score_video(video[cut + chunk_px :], q.text)
        key = "direction_accuracy" if kind == "direction" else "colour_accuracy"
        rows.append({"prompt": p.text, "then": q.text, "kind": kind, "before": before[key], "after": after[key]})
    summary = {}
    for kind in ("direction", "colour"):
        sel = [r for r in rows if r["kind"] == kind]
        if sel:
            summary[f"{kind}_before"] = float(np.mean([r["before"] for r in sel]))
            summary[f"{kind}_after"] = float(np.mean([r["after"] for r in sel]))
    return {"summary": summary, "cases": rows}


def image_to_video(bundle: Any, vae: Any, prompts: list[str], seconds: float = 4.0) -> dict[str, Any]:
    """Start from the rendered first frame; compare the object's path with the rendered video's."""
    frames = int(round(seconds * FPS))
    rows = []
    for i, text in enumerate(prompts):
        p = parse_prompt(text)
        truth = render_video(p, seed=100 + i, num_frames=frames)
        image = torch.from_numpy(truth[:1]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # [1, 3, 1, H, W]
        with torch.no_grad():
            context = vae.encode(image)
        out = FrameCollector()
        request = RenderRequest(64, 64, frames, seed=i, fps=FPS)
        with torch.no_grad():
            render(bundle.model, PromptTimeline.single(bundle.text_encoder.encode([text])), request,
                   decoder=vae.stream_decoder(), writer=out, sampling=bundle.sampling, causal=bundle.causal,
                   context_latents=context, keep_latents=False)  # fmt: skip
        video = out.video(frames)
        bg = p.background_rgb
        got, want = frame_stats(video[1:9], bg), frame_stats(truth[1:9], bg)
        both = got.present & want.present
        err = np.hypot(*wrapped(got.centroid[both] - want.centroid[both], 64).T) if both.any() else np.array([64.0])
        figures = score_video(video, text)
        rows.append({"prompt": text, "start_error_px": float(err.mean()),
                     "colour_accuracy": figures["colour_accuracy"], "shape_accuracy": figures["shape_accuracy"]})  # fmt: skip
    keys = ("start_error_px", "colour_accuracy", "shape_accuracy")
    return {"summary": {k: float(np.mean([r[k] for r in rows])) for k in keys}, "cases": rows}


def _source_chunks(video: np.ndarray, chunk_frames: int) -> Iterator[torch.Tensor]:
    first = 1 + 4 * (chunk_frames - 1)
    yield torch.from_numpy(video[:first])
    for a in range(first, len(video), 4 * chunk_frames):
        yield torch.from_numpy(video[a : a + 4 * chunk_frames])


def video_to_video(
    bundle: Any, vae: Any, prompts: list[str], seconds: float = 4.0, strength: float = 0.6
) -> dict[str, Any]:
    """Recolour a rendered video: target colour accuracy and the path distance to the source (px)."""
    frames = 1 + 4 * ((int(round(seconds * FPS)) - 1) // 4)
    rows = []
    for i, text in enumerate(prompts):
        p = parse_prompt(text)
        q = ShapesPrompt(_other(tuple(COLOURS), p.colour, i), p.shape, p.direction, p.background)
        source = render_video(p, seed=200 + i, num_frames=frames)
        out = FrameCollector()
        timeline = PromptTimeline.single(bundle.text_encoder.encode([q.text]))
        with torch.no_grad():
            restyle(bundle.model, vae, _source_chunks(source, bundle.causal.chunk_frames), timeline,
                    strength=strength, seed=i, sampling=bundle.sampling, causal=bundle.causal, writer=out)  # fmt: skip
        video = out.video(frames)
        bg = p.background_rgb
        got, src = frame_stats(video, bg), frame_stats(source, bg)
        both = got.present & src.present
        dist = np.hypot(*wrapped(got.centroid[both] - src.centroid[both], 64).T) if both.any() else np.array([64.0])
        figures = score_video(video, q.text)
        rows.append({"source": p.text, "target": q.text, "colour_accuracy": figures["colour_accuracy"],
                     "path_error_px": float(dist.mean()), "presence": figures["presence"]})  # fmt: skip
    keys = ("colour_accuracy", "path_error_px", "presence")
    return {"summary": {k: float(np.mean([r[k] for r in rows])) for k in keys}, "cases": rows,
            "strength": strength}  # fmt: skip


def run_all(model: str, vae_path: str | None = None, n: int = 12, strength: float = 0.6) -> dict[str, Any]:
    from causvid_core.bundle import load_bundle, vae_file
    from causvid_core.vae import load_wan_vae

    bundle = load_bundle(model, dtype=torch.float32)
    if bundle.text_encoder is None:  # a training checkpoint: the Shapes encoder its run used
        from .data import checkpoint_text_encoder

        bundle = dataclasses.replace(bundle, text_encoder=checkpoint_text_encoder(model, bundle.model.config))
    path = vae_file(vae_path, model)
    if path is None:
        raise ValueError("--vae PATH is needed with a checkpoint")
    vae = load_wan_vae(path)
    prompts = prompt_set(max(n, 6))[:n]
    return {
        "schedule": schedule_switch(bundle, vae, prompts),
        "image_to_video": image_to_video(bundle, vae, prompts),
        "video_to_video": video_to_video(bundle, vae, prompts, strength=strength),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m training.zero_shot", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:shapes")
    ap.add_argument(
        "--vae", help="VAE weights or embedded:NAME (default: the embedded model's; needed for checkpoints)"
    )
    ap.add_argument("--cases", type=int, default=12, help="prompts per application (default 12)")
    ap.add_argument("--strength", type=float, default=0.6, help="video-to-video strength (default 0.6)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    # checked before minutes of rendering: the strength the last application needs, where the result goes
    if not 0.0 < args.strength <= 1.0:
        raise ValueError(f"--strength must be in (0, 1] (0.6 recolours and keeps the path), got {args.strength}")
    if args.cases < 1:
        raise ValueError(f"--cases must be at least 1, got {args.cases}")
    if args.json:
        if args.json.exists() and args.json.is_dir():
            raise ValueError(f"--json {args.json} is a folder; give a file path such as zero-shot.json")
        args.json.parent.mkdir(parents=True, exist_ok=True)
    result = run_all(args.model, args.vae, args.cases, args.strength)
    for name, part in result.items():
        print(name, json.dumps(part["summary"]))
    if args.json:
        from .eval import write_json

        write_json(args.json, result)
    return result


if __name__ == "__main__":
    from causvid_core.checkpoint import CheckpointError

    try:
        main(sys.argv[1:])
    except (CheckpointError, FileNotFoundError, ValueError) as err:  # a bad option or model: no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)
