"""Command line: ``python -m causvid_core <command> ...``.

Each command is a ``Subcommand`` (name, help, argument setup, run function) registered in
``SUBCOMMANDS`` with ``register``; ``main`` builds one argparse sub-parser per entry. Add a
command by defining its two functions and calling ``register`` at import time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .bundle import EMBEDDED_PREFIX, embedded_file, embedded_names, file_metadata, load_bundle, vae_file
from .resume import RenderJob

SIZE_META = "causvid_size"  # [width, height] a model was trained at (proposed for bundle.settings_metadata)


@dataclass(frozen=True)
class Subcommand:
    """One ``python -m causvid_core`` command."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]  # returns the exit status


SUBCOMMANDS: dict[str, Subcommand] = {}


def register(command: Subcommand) -> Subcommand:
    """Add a command to ``SUBCOMMANDS`` (names must be unique)."""
    if command.name in SUBCOMMANDS:
        raise ValueError(f"subcommand {command.name!r} is already registered")
    SUBCOMMANDS[command.name] = command
    return command


def _lora_arg(text: str) -> tuple[str, float]:
    """``FILE[:STRENGTH]`` -> (file, strength); strength defaults to 1."""
    path, sep, strength = text.rpartition(":")
    if sep and path:
        try:
            return path, float(strength)
        except ValueError:
            pass
    return text, 1.0


# -- inspect ---------------------------------------------------------------------------------
def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="checkpoint file, model folder or hf://owner/repo/path reference")
    parser.add_argument("--preset", help="use this preset's DiT config instead of inferring it")
    parser.add_argument("--load", action="store_true", help="load the weights (slow) instead of headers")
    parser.add_argument("--dtype", help="with --load: float32, bfloat16 or float16 (default: the file's)")
    parser.add_argument(
        "--lora", action="append", type=_lora_arg, default=[], metavar="FILE[:STRENGTH]",
        help="with --load: merge this LoRA and report matched/unmatched keys (repeatable)",
    )  # fmt: skip


def _inspect(args: argparse.Namespace) -> int:
    from .checkpoint import describe, load_model
    from .config import get_preset

    config = get_preset(args.preset).dit if args.preset else None
    if args.load or args.lora:
        _, report = load_model(args.path, config=config, dtype=args.dtype, lora=args.lora or None)
    else:
        report = describe(args.path, config=config)
    print(report.summary())
    return 0


register(Subcommand("inspect", "print a checkpoint's layout, config, parameter count and dtype",
                    _inspect_arguments, _inspect))  # fmt: skip


# -- render / generate ------------------------------------------------------------------------
def _render_arguments(parser: argparse.ArgumentParser, generate: bool = False) -> None:
    add = parser.add_argument
    add(
        "--model",
        default="embedded:shapes" if generate else None,
        help="embedded:NAME, a checkpoint file or folder, or hf://owner/repo/file"
        + (" (default: embedded:shapes)" if generate else ""),
    )
    _model_file_arguments(add)
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--image",
        metavar="FILE",
        help="image-to-video: the video starts from this picture (PNG, JPEG, or a video's first frame), "
        "resized to cover the size and centre-cropped",
    )
    start.add_argument(
        "--extend",
        metavar="VIDEO",
        help="continue this video: its last frames (as many as the model's KV cache holds) open the new "
        "file, re-decoded, and the continuation follows; --seconds / --frames count the new part",
    )
    add(
        "--extend-at",
        type=float,
        metavar="SECONDS",
        help="with --extend: continue from this time of the video instead of its end (re-render the rest "
        "with another prompt or seed)",
    )
    _prompt_arguments(parser, required=False)
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=float, help="video length in seconds")
    length.add_argument("--frames", type=int, help="video length in frames")
    add("--out", help="output .mp4 (parent folders are created)")
    _stream_arguments(add)
    add("--no-recache", action="store_true", help="keep the cached window as it was at a prompt change")
    add(
        "--colour-anchor",
        "--color-anchor",
        type=float,
        default=0.0,
        metavar="S",
        help="0..1: hold each chunk's colours and contrast to the start's (after a prompt change, the new "
        "prompt's); the written frames only. Default 0 (off); the drift is reported either way",
    )
    if not generate:
        add("--resume", metavar="FILE", help="continue an interrupted render (its .mp4 or .mp4.resume)")


def _model_file_arguments(add: Callable[..., Any]) -> None:
    """The files beside a model: VAE, text encoder, tokenizer (render, generate, v2v)."""
    add("--vae", help="VAE file, or embedded:NAME (default: the embedded model's own VAE)")
    add("--text-encoder", help="umT5 weights for Wan checkpoints (embedded models carry their own)")
    add("--tokenizer", help="umT5 tokenizer folder or file (default: found beside the text encoder)")


def _prompt_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    prompts = parser.add_mutually_exclusive_group(required=required)
    prompts.add_argument("--prompt", help="one prompt for the whole video")
    prompts.add_argument("--schedule", metavar="FILE", help="a prompt schedule: lines 'TIME: prompt'")
    parser.add_argument("--schedule-unit", choices=("second", "chunk", "frame"), default="second",
                        help="unit of schedule times")  # fmt: skip


def _stream_arguments(add: Callable[..., Any]) -> None:
    """How the stream runs and is written (render, generate, v2v)."""
    add("--seed", type=int, default=0)
    add("--width", type=int, help="multiple of 16 (default: the model's natural size)")
    add("--height", type=int, help="multiple of 16 (default: the model's natural size)")
    add("--fps", type=int, help="frames per second (default: the model's)")
    add("--steps", help="denoising steps like '1000,757,522' (default: the model's)")
    add("--chunk-frames", type=int, help="latent frames per chunk (default: the model's)")
    add("--blend", type=int, default=0, help="chunks over which a schedule's prompt change is blended")
    add("--crf", type=int, default=18, help="H.264 / H.265 quality: lower is better (0-51)")
    add("--codec", choices=("h264", "h265"), default="h264",
        help="h265 (HEVC): often smaller files at the same quality (crf scales differ a little)")  # fmt: skip
    add("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add("--dtype", help="float32, bfloat16 or float16 (default: the file's)")
    add(
        "--speed",
        default="",
        help="comma list of speed options: ring, fused_qkv, compile, fp8 (CUDA); default: the reference path",
    )
    add("--overwrite", action="store_true", help="replace an existing --out file")
    add("--quiet", action="store_true", help="no progress bar")


class _ProgressBar:
    """One status line on stderr: chunks done/total, frames per second, time left."""

    def __init__(self, total: int, done: int = 0, quiet: bool = False) -> None:
        self.total, self.done0, self.quiet = total, done, quiet
        self.start, self.frames = time.perf_counter(), 0

    def update(self, done: int, frames: int) -> None:
        self.frames += frames
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.start
        fps = self.frames / elapsed if elapsed > 0 else 0.0
        if self.total <= 0:  # a live source: no end to count down to
            print(f"\r{done} chunks  {fps:5.1f} fps", end="", file=sys.stderr, flush=True)
            return
        eta = elapsed / max(1, done - self.done0) * (self.total - done)
        bar = "#" * round(24 * done / max(1, self.total))
        print(f"\r[{bar:<24}] {done}/{self.total} chunks  {fps:5.1f} fps  eta {eta:5.0f} s", end="",
              file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        if not self.quiet:
            print(file=sys.stderr, flush=True)


def _render_settings(args: argparse.Namespace) -> dict:
    """The JSON settings of a new render from the command line, with errors for what is missing."""
    missing = [name for name, value in (("--model", args.model), ("--out", args.out)) if not value]
    if not (args.prompt or args.schedule):
        missing.append("--prompt or --schedule")
    if args.seconds is None and args.frames is None:
        missing.append("--seconds or --frames")
    if missing:
        hint = " (or --resume FILE to continue a render)" if args.command == "render" else ""
        raise ValueError(f"{args.command} needs {', '.join(missing)}{hint}")
    schedule = None
    if args.schedule:
        path = Path(args.schedule)
        if not path.is_file():
            raise FileNotFoundError(f"schedule file {path} not found")
        schedule = path.read_text()
    return {  # files as absolute paths: --resume may run from another folder
        "model": _absolute(args.model), "vae": _absolute(args.vae), "text_encoder": _absolute(args.text_encoder),
        "tokenizer": _absolute(args.tokenizer),
        "prompt": args.prompt, "schedule": schedule, "schedule_unit": args.schedule_unit,
        "seconds": args.seconds, "frames": args.frames, "seed": args.seed, "width": args.width,
        "height": args.height, "fps": args.fps, "steps": args.steps, "chunk_frames": args.chunk_frames,
        "blend_chunks": args.blend, "recache": not args.no_recache, "crf": args.crf, "dtype": args.dtype,
        "speed": args.speed, "image": _absolute(args.image), "extend": _absolute(args.extend),
        "colour_anchor": args.colour_anchor, "extend_at": args.extend_at, "codec": args.codec,
    }  # fmt: skip


def _absolute(source: str | None) -> str | None:
    """An existing local path made absolute; embedded:NAME, hf:// references and None as given."""
    if not source or source.startswith((EMBEDDED_PREFIX, "hf://")) or not Path(source).exists():
        return source
    return str(Path(source).resolve())


def _natural_size(bundle) -> tuple[int, int]:
    """(width, height) a model was made for: its file's causvid_size metadata, else 64x64 for embedded
    models and 832x480 for Wan checkpoints."""
    name = str(bundle.name)
    path = None
    if name.startswith(EMBEDDED_PREFIX):
        path = embedded_file(name[len(EMBEDDED_PREFIX) :], "dit")
    elif Path(name).is_file() and name.endswith((".safetensors", ".gguf")):
        path = Path(name)
    if path is not None:
        size = file_metadata(path).get(SIZE_META)
        if size:
            width, height = json.loads(size)
            return int(width), int(height)
    return (64, 64) if name.startswith(EMBEDDED_PREFIX) else (832, 480)


def _check_model_source(source: str) -> None:
    if source.startswith((EMBEDDED_PREFIX, "hf://")) or Path(source).exists():
        return
    known = ", ".join(f"{EMBEDDED_PREFIX}{n}" for n in embedded_names()) or "no embedded models installed"
    raise FileNotFoundError(
        f"model {source} not found (known: {known}); give a checkpoint file or folder, or hf://owner/repo/file"
    )


def _vae_path(settings: dict) -> Path:
    model = settings["model"]
    path = vae_file(settings.get("vae"), model)
    if path is None:
        raise ValueError(f"{model} needs a VAE: pass --vae Wan2.1_VAE.pth (or wan_2.1_vae.safetensors)")
    return path


def _load_text_encoder(path: str, tokenizer: str | None, device: torch.device):
    """umT5 (Wan), or the Shapes encoder an embedded model ships as text.safetensors: a training checkpoint
    of the Shapes preset (runs/shapes/dmd/final.safetensors) renders with it."""
    if Path(path).suffix == ".safetensors" and Path(path).is_file():
        from safetensors import safe_open

        from .checkpoint import reading_safetensors
        from .text import ShapesTextEncoder

        with reading_safetensors(path), safe_open(path, framework="pt") as f:
            if set(f.keys()) == ShapesTextEncoder.STATE_KEYS:
                return ShapesTextEncoder.from_state_dict({k: f.get_tensor(k) for k in f.keys()})
    from .umt5 import UMT5TextEncoder

    return UMT5TextEncoder.load(path, tokenizer, device=device)


def _device(name: str | None) -> torch.device:
    if not name or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name}: this machine has no CUDA GPU that torch can use; use --device cpu"
        )
    return dev


def _load_parts(settings: dict, dev: torch.device) -> tuple[Any, Any, Any]:
    """(bundle, VAE, text encoder) of a render's settings, with errors naming what is missing."""
    from .vae import load_wan_vae

    _check_model_source(settings["model"])
    vae_path = _vae_path(settings)
    bundle = load_bundle(settings["model"], dtype=settings.get("dtype"), device=dev,
                         chunk_frames=settings.get("chunk_frames"), denoising_steps=settings.get("steps"))  # fmt: skip
    bundle.model.set_speed(settings.get("speed") or "")
    vae = load_wan_vae(vae_path, device=dev)
    encoder = bundle.text_encoder
    if encoder is None:
        if not settings.get("text_encoder"):
            raise ValueError(
                f"{settings['model']} has no text encoder of its own: pass --text-encoder umt5.safetensors "
                "(a Wan model) or the text.safetensors of the embedded model it was trained with (Shapes)"
            )
        encoder = _load_text_encoder(settings["text_encoder"], settings.get("tokenizer"), dev)
    return bundle, vae, encoder


def build_job(settings: dict, out: Path, device: str | None = "auto") -> RenderJob:
    """Load the model, VAE and text encoder of ``settings`` and plan the render; errors before any file."""
    import dataclasses

    from .pipeline import PromptTimeline, RenderRequest, encode_schedule, seconds_to_frames

    dev = _device(device)
    bundle, vae, encoder = _load_parts(settings, dev)

    def given(key: str, default):  # 0 is a value (and an error below), not "unset"
        return default if settings.get(key) is None else settings[key]

    fps = given("fps", bundle.fps)
    if fps <= 0:
        raise ValueError(f"--fps must be a positive number of frames per second, got {fps}")
    width, height = _natural_size(bundle)
    width, height = given("width", width), given("height", height)
    frames = given("frames", None)
    if frames is None:
        frames = seconds_to_frames(settings["seconds"], fps)
    start = _start_frames(settings, width, height, fps, bundle.causal)
    if start is not None and settings.get("extend"):
        chunk = 4 * bundle.causal.chunk_frames
        if frames < chunk:
            raise ValueError(
                f"the continuation ({frames} frames) is below one chunk: ask for at least {chunk} frames "
                f"({chunk / fps:.2f} s at {fps} fps) after the {len(start)} frames it continues"
            )
        frames += len(start)  # the new part's length comes after the frames it continues
    request = RenderRequest(width, height, frames, seed=settings.get("seed", 0), fps=fps,
                            blend_chunks=settings.get("blend_chunks", 0),
                            recache_on_switch=settings.get("recache", True))  # fmt: skip
    context = None
    if start is not None:
        video = torch.from_numpy(start).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # [1, 3, T, H, W]
        with torch.no_grad():
            context = vae.encode(video.to(dev))

    def encode(prompt: str) -> torch.Tensor:
        return encoder.encode([prompt]).to(dev)

    if settings.get("schedule"):
        schedule = encode_schedule(settings["schedule"], settings.get("schedule_unit", "second"), encode,
                                   request.blend_chunks)  # fmt: skip
        # schedule times count from the video's first frame, the image seed or continued frames included
        timeline = schedule.timeline(fps, bundle.causal, 0 if context is None else context.shape[2])
    else:
        timeline = PromptTimeline.single(encode(settings["prompt"]))
    causal = dataclasses.replace(bundle.causal)
    return RenderJob(bundle.model, vae, timeline, request, Path(out), sampling=bundle.sampling, causal=causal,
                     settings=settings, crf=settings.get("crf", 18), context_latents=context,
                     colour_anchor=settings.get("colour_anchor") or 0.0,
                     codec=settings.get("codec") or "h264")  # fmt: skip


def _start_frames(settings: dict, width: int, height: int, fps: int, causal) -> np.ndarray | None:
    """The frames a render starts from (uint8 [T, H, W, 3] at the render's size), or None: the --image's
    picture, or the last 1 + 4k frames of the --extend video (resampled to the render's fps; before
    --extend-at when given) that the KV cache can hold."""
    from collections import deque

    from .kv_cache import KVCache
    from .video_io import fit_frames, read_video_chunks

    option = "--image" if settings.get("image") else "--extend" if settings.get("extend") else None
    if settings.get("extend_at") is not None and option != "--extend":
        raise ValueError("--extend-at needs --extend VIDEO: the video to continue from that time")
    if option is None:
        return None
    path = Path(settings["image"] or settings["extend"])
    if not path.is_file():
        raise FileNotFoundError(f"{option} file {path} not found")
    if option == "--image":
        first = next(read_video_chunks(path, 1, max_frames=1), None)
        if first is None:
            raise ValueError(f"{option} {path} holds no picture")
        return fit_frames(first, width, height)
    keep = 1 + 4 * (KVCache.capacity_frames(causal) - 1)  # the latent frames the cache holds, in video frames
    tail: deque[np.ndarray] = deque(maxlen=keep)
    at = settings.get("extend_at")
    if at is not None and at <= 0:
        raise ValueError(f"--extend-at must be a time after the start of the video, got {at}")
    until = None if at is None else max(1, round(at * fps))  # the frames before that time
    read = 0
    for chunk in read_video_chunks(path, 16, fps=fps, max_frames=until):
        tail.extend(chunk)
        read += len(chunk)
    if not tail:
        raise ValueError(f"{option} {path} holds no frames")
    if until is not None and read < until:
        raise ValueError(f"--extend-at {at}: {path.name} ends before that ({read / fps:.2f} s at {fps} fps)")
    count = (len(tail) - 1) // 4 * 4 + 1  # whole latent frames: 1 + 4k video frames
    return fit_frames(np.stack(list(tail)[-count:]), width, height)


def job_from_sidecar(path: str | Path, device: str | None = "auto") -> RenderJob:
    """The job of an interrupted command-line render, rebuilt from the settings in its sidecar."""
    from .resume import load_sidecar, resolve_resume

    out, sidecar = resolve_resume(path)
    settings = load_sidecar(sidecar).settings
    if "model" not in settings or not (settings.get("prompt") or settings.get("schedule")):
        raise ValueError(f"{sidecar} was written by a node, not the command line: resume it from the node")
    return build_job(settings, out, device=device)


def memory_line(job: RenderJob) -> str:
    """What the render will hold in memory, said before it starts: the weights and the KV cache (which must
    fit in the device's free memory: ``CacheTooLargeError`` otherwise, before any file is written)."""
    return _memory(job.model, job.causal, *job.request.latent_size)


def _memory(model: Any, causal: Any, h: int, w: int) -> str:
    from .gguf import PackedLinear
    from .kv_cache import CachePlan, format_bytes

    weight = next(model.parameters())
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    packed = sum(isinstance(m, PackedLinear) for m in model.modules())
    plan = CachePlan(model.config, causal, 1, h, w, weight.dtype, getattr(model, "cache_layout", "compact"))
    plan.check_fits(weight.device)
    cache = plan.describe()
    return (
        f"memory: weights {format_bytes(held)} on {weight.device}"
        + (f" ({packed} GGUF layers packed)" if packed else "")
        + f"; {cache}"
    )


def _wrote(out: Path, frames: int, fps: float, elapsed: float, load_s: float) -> str:
    return (f"wrote {out}: {frames} frames ({frames / fps:.1f} s at {fps} fps) in {elapsed:.1f} s; "
            f"model loaded in {load_s:.1f} s")  # fmt: skip


def _render(args: argparse.Namespace, generate: bool = False) -> int:
    from .pipeline import num_chunks
    from .resume import render_to_file

    t_load = time.perf_counter()
    resume = getattr(args, "resume", None)
    if resume:
        job = job_from_sidecar(resume, device=args.device)
    else:
        out = Path(args.out) if args.out else None
        if out is not None and out.exists() and not args.overwrite:
            from .resume import interrupted_message

            raise ValueError(interrupted_message(out) or f"{out} already exists: pass --overwrite to replace it, "
                             "or choose another --out")  # fmt: skip
        job = build_job(_render_settings(args), Path(args.out or "."), device=args.device)
    load_s = time.perf_counter() - t_load
    print(memory_line(job))
    context = 0 if job.context_latents is None else job.context_latents.shape[2]
    bar = _ProgressBar(num_chunks(job.request, job.causal, context), quiet=args.quiet)
    first: list[float] = []

    def on_chunk(event) -> None:
        if not first:
            first.append(time.perf_counter() - bar.start)
            bar.done0 = event.index
        bar.update(event.index + 1, 0 if event.frames is None else event.frames.shape[2])

    try:
        state = render_to_file(job, resume=bool(resume), overwrite=args.overwrite, on_chunk=on_chunk)
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted: continue with python -m causvid_core render --resume {job.out}", file=sys.stderr)
        return 130
    bar.close()
    elapsed = time.perf_counter() - bar.start
    print(_wrote(job.out, state.frames_written, job.request.fps, elapsed, load_s))
    print(state.colours.report())
    if generate and first:
        print(f"time to first frame: {first[0]:.2f} s (first chunk generated, decoded and written)")
        print(f"frames per second: {bar.frames / elapsed:.1f} (whole run, decoding and writing included)")
    return 0


register(Subcommand("render", "render a video to an mp4 chunk by chunk (resumable with --resume)",
                    _render_arguments, _render))  # fmt: skip
register(Subcommand("generate", "render a prompt to an mp4 and print time to first frame and frames per second",
                    lambda p: _render_arguments(p, generate=True), lambda a: _render(a, generate=True)))  # fmt: skip


# -- v2v ------------------------------------------------------------------------------------------
def _v2v_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--source", required=True, help="the video to restyle: a file, or with --source-format a device "
        "(/dev/video0 with v4l2, '0' with avfoundation, 'video=NAME' with dshow); read at --fps and resized to "
        "cover --width x --height, centre-cropped")  # fmt: skip
    add("--source-format", help="read --source as this FFmpeg input format (v4l2, avfoundation, dshow, lavfi)")
    add("--model", default="embedded:shapes", help="embedded:NAME, a checkpoint, or hf://... (default: embedded:shapes)")
    _model_file_arguments(add)
    _prompt_arguments(parser, required=True)
    add("--strength", type=float, default=0.6, help="(0, 1]: how far each chunk is noised before it is denoised "
        "under the prompt (low keeps the source's layout, high takes the prompt's look); default 0.6")  # fmt: skip
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=float, help="stop after this much video (default: the whole source)")
    length.add_argument("--frames", type=int, help="stop after this many frames")
    add("--out", required=True, help="output .mp4, written chunk by chunk (parent folders are created)")
    _stream_arguments(add)


def _v2v(args: argparse.Namespace) -> int:
    """Restyle a video file or a live source chunk by chunk into an mp4 that grows as it goes."""
    from .pipeline import PromptTimeline, encode_schedule, restyle, seconds_to_frames
    from .video_io import VideoWriter, fit_frames, probe_video, read_video_chunks

    if not 0.0 < args.strength <= 1.0:
        raise ValueError(f"--strength must be above 0 and at most 1, got {args.strength}")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")
    if not args.source_format and not Path(args.source).is_file():
        raise FileNotFoundError(f"--source {args.source} not found (a device needs --source-format, e.g. v4l2)")
    settings = {"model": args.model, "vae": args.vae, "text_encoder": args.text_encoder, "tokenizer": args.tokenizer,
                "dtype": args.dtype, "chunk_frames": args.chunk_frames, "steps": args.steps, "speed": args.speed}  # fmt: skip
    if args.schedule and not Path(args.schedule).is_file():
        raise FileNotFoundError(f"schedule file {args.schedule} not found")
    t_load = time.perf_counter()
    dev = _device(args.device)
    bundle, vae, encoder = _load_parts(settings, dev)
    fps = args.fps if args.fps is not None else bundle.fps
    if fps <= 0:
        raise ValueError(f"--fps must be a positive number of frames per second, got {fps}")
    width, height = _natural_size(bundle)
    width, height = args.width or width, args.height or height
    if width % 16 or height % 16:
        raise ValueError(f"--width and --height must be multiples of 16, got {width}x{height}")
    limit = args.frames if args.seconds is None else seconds_to_frames(args.seconds, fps)
    if limit is not None and limit < 1:
        raise ValueError(f"the length must be at least 1 frame, got {limit}")

    def encode(prompt: str) -> torch.Tensor:
        return encoder.encode([prompt]).to(dev)

    if args.schedule:
        schedule = encode_schedule(Path(args.schedule).read_text(), args.schedule_unit, encode, args.blend)
        timeline = schedule.timeline(fps, bundle.causal)
    else:
        timeline = PromptTimeline.single(encode(args.prompt))
    chunk = 4 * bundle.causal.chunk_frames  # video frames per chunk; the first has 1 + 4 (k - 1)
    total = None
    if not args.source_format:
        info = probe_video(args.source)
        frames = round(info.duration * fps) if limit is None else min(limit, round(info.duration * fps))
        total = 1 + max(0, -(-(frames - (chunk - 3)) // chunk))
    source = read_video_chunks(args.source, chunk, first_chunk_frames=chunk - 3, fps=fps, max_frames=limit,
                               input_format=args.source_format)  # fmt: skip
    memory = _memory(bundle.model, bundle.causal, height // 8, width // 8)  # the cache must fit, or stop here
    head = next(source, None)  # the source opens (a missing device, a broken file) before any output exists
    if head is None:
        raise ValueError(f"--source {args.source} gave no frames")
    chunks = (torch.from_numpy(fit_frames(part, width, height)) for part in itertools.chain([head], source))
    load_s = time.perf_counter() - t_load
    print(memory)
    bar = _ProgressBar(total or 0, quiet=args.quiet)
    first: list[float] = []

    def on_chunk(event) -> None:
        if not first:
            first.append(time.perf_counter() - bar.start)
        bar.update(event.index + 1, event.frames.shape[2])

    from .pipeline import RenderState

    state = RenderState()
    try:
        with VideoWriter(out, fps=fps, crf=args.crf, low_latency=True, codec=args.codec) as writer, torch.no_grad():
            restyle(bundle.model, vae, chunks, timeline, strength=args.strength, seed=args.seed,
                    sampling=bundle.sampling, causal=bundle.causal, blend_chunks=args.blend, writer=writer,
                    on_chunk=on_chunk, state=state)  # fmt: skip
    except KeyboardInterrupt:
        bar.close()
        print(f"stopped: {out} keeps the {state.frames_written} frames finished", file=sys.stderr)
        return 130
    bar.close()
    elapsed = time.perf_counter() - bar.start
    print(_wrote(out, state.frames_written, fps, elapsed, load_s))
    print(f"time to first frame: {first[0]:.2f} s (first source chunk read, restyled, decoded and written)")
    print(f"frames per second: {state.frames_written / elapsed:.1f} (reading, decoding and writing included)")
    return 0


register(Subcommand("v2v", "restyle a video file or a live source (webcam) chunk by chunk into an mp4",
                    _v2v_arguments, _v2v))  # fmt: skip


# -- entry point -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per registered command."""
    parser = argparse.ArgumentParser(prog="python -m causvid_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in SUBCOMMANDS.values():
        command.add_arguments(sub.add_parser(command.name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; user errors print ``error: ...`` and return 2."""
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .resume import DiskFullError

    try:
        return SUBCOMMANDS[args.command].run(args)
    except (CheckpointError, DiskFullError, FileNotFoundError, KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2


# -- quantize -------------------------------------------------------------------------------------
def _quantize_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("source", help="a DiT checkpoint of any layout `inspect` reads, or embedded:NAME")
    add("--type", choices=("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "F16", "BF16"), default="Q8_0",
        help="the attention / FFN / embedding weights' type (bits a weight: Q8_0 8.5, Q5_1 6, Q5_0 5.5, Q4_1 5, "
        "Q4_0 4.5); norms, biases, "
        "modulation and small tensors stay F32, as ComfyUI-GGUF's converter keeps them")  # fmt: skip
    add("--out", required=True, help="the .gguf to write (written to FILE.partial, then renamed)")
    add("--overwrite", action="store_true", help="replace an existing --out file")


def _quantize(args: argparse.Namespace) -> int:
    """Write a DiT as GGUF: Wan key names and architecture 'wan' (ComfyUI-GGUF reads it), plus this
    package's config and streaming settings, so ``--model FILE.gguf`` and Load CausVid use it as the source."""
    from .checkpoint import META_KEY, _pick_config, _read_raw
    from .config import to_dict
    from .gguf import quantize, write_gguf
    from .hub import resolve_source

    out = Path(args.out)
    if out.suffix != ".gguf":
        raise ValueError(f"--out {out} should end in .gguf (the loaders tell the format by it)")
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")
    name = str(args.source)
    path = embedded_file(name[len(EMBEDDED_PREFIX) :], "dit") if name.startswith(EMBEDDED_PREFIX) else None
    raw = _read_raw(resolve_source(path or args.source))
    cfg, _ = _pick_config(raw, None)
    meta = {k: v for k, v in (file_metadata(path or Path(args.source))).items() if k.startswith("causvid_")}
    meta[META_KEY] = json.dumps(to_dict(cfg))
    if path is not None and SIZE_META not in meta:  # an embedded model's natural size goes with it
        meta[SIZE_META] = json.dumps([64, 64])
    tensors = []
    for key in sorted(raw.state_dict, key=lambda k: [int(p) if p.isdigit() else p for p in k.split(".")]):
        shape = tuple(raw.state_dict[key].shape)
        count = int(np.prod(shape))
        blocks_fit = args.type in ("F16", "BF16") or shape[-1] % 32 == 0
        kind = args.type if len(shape) == 2 and count > 1024 and blocks_fit else "F32"
        if len(shape) > 4:  # llama.cpp holds 4 dimensions: flattened, the shape in metadata (ComfyUI-GGUF's way)
            meta[f"comfy.gguf.orig_shape.{key}"] = list(shape)
            shape = (count // shape[-1], shape[-1])
        tensors.append((key, shape, kind, lambda k=key, t=kind: quantize(raw.take(k, torch.float32), t)))
    size = sum(int(np.prod(s)) for _, s, _, _ in tensors)
    write_gguf(out, tensors, {"general.architecture": "wan", "general.name": Path(name).stem, **meta})
    print(f"wrote {out}: {len(tensors)} tensors, {size:,} weights, {out.stat().st_size / 2**20:.1f} MB "
          f"({args.type} where a weight matrix allows it, F32 elsewhere)")  # fmt: skip
    return 0


register(Subcommand("quantize", "write a DiT as a GGUF file (Q8_0 ... Q4_0, F16, BF16) for low-memory GPUs",
                    _quantize_arguments, _quantize))  # fmt: skip
