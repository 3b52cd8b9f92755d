"""Score a Shapes VAE on reconstructions: the Shapes figures (SHAPES.md) of ground-truth videos after an
encode + decode round trip, against the same figures of the videos themselves.

    python scripts/vae_recon_check.py runs/shapes/vae/final.safetensors [--videos 16] [--frames 33] [--images]
        [--latent-noise S]

``--latent-noise S`` decodes the latents plus S latent stds of seeded Gaussian noise on every channel: a DiT's
latents lie off the encoder's, and a decoder that draws exact latents well can still break the object
into pieces or lose its shape on those (docs/reproduction.md, The VAE).

Besides the figures it prints PSNR by latent frame (frame 0, then each group of 4 frames a latent frame
decodes to): a VAE that leans on more past than its training clips showed drifts along a long clip, and
it shows there first (docs/reproduction.md, The VAE).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/...` from anywhere

from causvid_core.pipeline import to_uint8_frames  # noqa: E402
from causvid_core.vae import load_wan_vae  # noqa: E402
from causvid_core.video_io import psnr  # noqa: E402
from training.metrics import frame_stats, score_video  # noqa: E402
from training.shapes import parse_prompt, prompt_set, render_video, to_model_range  # noqa: E402


def psnr_by_latent_frame(sq_err: np.ndarray) -> list[float]:
    """[videos, frames] mean squared errors (0-255 scale) -> PSNR of frame 0, then of each group of 4
    frames that one latent frame decodes to (the last group may be shorter)."""
    groups = [slice(0, 1)] + [slice(i, i + 4) for i in range(1, sq_err.shape[1], 4)]
    return [float(10 * np.log10(255**2 / max(float(sq_err[:, g].mean()), 1e-12))) for g in groups]


def round_trip(vae, x: torch.Tensor, latent_noise: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Encode and decode [B, 3, F, H, W]; with ``latent_noise`` S the decoder reads the unit-scale latents
    plus S stds of Gaussian noise drawn from ``generator`` (seeded: the same generator state, the same video)."""
    with torch.no_grad():
        z = vae.encode(x)
        if latent_noise:
            z = z + latent_noise * torch.randn(z.shape, generator=generator).to(z)
        return vae.decode(z)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vae")
    p.add_argument("--videos", type=int, default=16)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--images", action="store_true", help="round-trip every frame alone (the image phase)")
    p.add_argument("--latent-noise", type=float, default=0.0, help="latent stds of noise added before decoding")
    args = p.parse_args()
    if args.latent_noise < 0:
        p.error(f"--latent-noise {args.latent_noise}: use a number of latent stds >= 0 (0: exact latents)")
    vae = load_wan_vae(args.vae).eval()
    noise_gen = torch.Generator().manual_seed(0)
    gt_scores, rec_scores, psnrs, sq_err = [], [], [], []
    fills: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}  # shape -> (ground truth, reconstructed)
    prompts = prompt_set(args.videos, seed=1)
    for i, prompt in enumerate(prompts):
        video = render_video(prompt, seed=1000 + i, num_frames=args.frames)
        x = to_model_range(video)[None]  # [1, 3, F, H, W]
        if args.images:  # each frame its own one-frame video: [F, 3, 1, H, W]
            x = x.permute(2, 1, 0, 3, 4)
        rec = round_trip(vae, x, args.latent_noise, noise_gen)
        rec = rec.permute(2, 1, 0, 3, 4)[0] if args.images else rec[0]
        rec_u8 = to_uint8_frames(rec[None]).numpy()
        gt_scores.append(score_video(video, prompt))
        rec_scores.append(score_video(rec_u8, prompt))
        psnrs.append(psnr(video, rec_u8))
        sq_err.append(((video.astype(np.float64) - rec_u8) ** 2).mean(axis=(1, 2, 3)))  # per frame
        parsed = parse_prompt(prompt)  # segmented against the prompt's background, as score_video does
        gt_fill, rec_fill = fills.setdefault(parsed.shape, ([], []))
        gt_fill.append(frame_stats(video, parsed.background_rgb).fill)
        rec_fill.append(frame_stats(rec_u8, parsed.background_rgb).fill)
    for name, scores in (("ground truth", gt_scores), ("reconstructed", rec_scores)):
        mean = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
        print(f"{name:14s} " + "  ".join(f"{k} {v:.1f}" for k, v in mean.items()))
    noisy = f", latents + {args.latent_noise:g} stds of noise" if args.latent_noise else ""
    print(f"PSNR {np.mean(psnrs):.2f} dB over {args.videos} videos of {args.frames} frames{noisy}")
    if not args.images:
        print("PSNR by latent frame (dB): " + " ".join(f"{v:.1f}" for v in psnr_by_latent_frame(np.stack(sq_err))))
    # where shape accuracy is lost: the fill-ratio rule fails one shape at a time (square corners rounded off)
    by_shape: dict[str, list[float]] = {}
    for prompt, s in zip(prompts, rec_scores, strict=True):
        by_shape.setdefault(parse_prompt(prompt).shape, []).append(s["shape_accuracy"])
    print("reconstructed shape accuracy by the prompt's shape: "
          + ", ".join(f"{k} {np.mean(v):.1f} ({len(v)})" for k, v in sorted(by_shape.items())))  # fmt: skip
    # the fill ratio (area / bounding box) the rule reads: > 0.9 square, 0.65-0.9 circle, < 0.65 triangle
    print("median fill ratio by shape, ground truth -> reconstructed: " + ", ".join(
        f"{k} {np.nanmedian(np.concatenate(gt)):.3f} -> {np.nanmedian(np.concatenate(rec)):.3f}"
        for k, (gt, rec) in sorted(fills.items())))  # fmt: skip


if __name__ == "__main__":
    main()
