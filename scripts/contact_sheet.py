"""A contact sheet of Shapes videos: one row per prompt, every Nth frame, the ground truth on top.

    python scripts/contact_sheet.py --teacher runs/shapes/teacher/final.safetensors \
        --vae runs/shapes/vae/final.safetensors --out teacher.png
    python scripts/contact_sheet.py --model embedded:shapes --out ours.png [--frames 33 --every 4]

What the Shapes figures summarise, made visible: how many objects, their shape, whether they move.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/...` from anywhere

from training.shapes import render_video  # noqa: E402

PROMPTS = (
    "a red square moving right",
    "a green triangle moving up on a gray background",
    "a blue circle moving down on a white background",
)


def sheet(videos: list[np.ndarray], every: int, scale: int) -> Image.Image:
    """Rows of frames 0, every, 2*every, ... of each [F, H, W, 3] uint8 video, upscaled ``scale`` times."""
    rows = [np.concatenate(list(v[::every]), axis=1) for v in videos]
    width = min(r.shape[1] for r in rows)
    grid = np.concatenate([r[:, :width] for r in rows], axis=0)
    img = Image.fromarray(grid)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a causal student: embedded:NAME or a checkpoint (streamed)")
    src.add_argument("--teacher", help="a many-step teacher checkpoint (50 Euler steps, CFG 6)")
    p.add_argument("--vae", help="VAE weights (default: the embedded model's)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--no-truth", action="store_true", help="leave out the ground-truth rows")
    args = p.parse_args()

    from training.eval import _model_fn

    ns = argparse.Namespace(model=args.model, teacher=args.teacher, vae=args.vae, teacher_steps=50,
                            guidance=6.0, causal_chunk=None)  # fmt: skip
    generate = _model_fn(ns)
    videos = []
    for i, prompt in enumerate(args.prompts):
        if not args.no_truth:
            videos.append(render_video(prompt, seed=i, num_frames=args.frames))
        videos.append(generate(prompt, i, args.frames))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet(videos, args.every, args.scale).save(args.out)
    print(f"wrote {args.out}: {len(args.prompts)} prompts, frames 0..{args.frames - 1} every {args.every}")


if __name__ == "__main__":
    main()
