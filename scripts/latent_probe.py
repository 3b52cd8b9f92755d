"""What a Shapes VAE's latent holds where the object is, in the form a DiT writes it: for each of the
prompt's attributes (colour, shape, direction, background), how much of the object cells' variance lies
between its values, and how often a linear probe names it from one object cell on held-out clips.

    python scripts/latent_probe.py runs/shapes/vae/final.safetensors [--clips 96] [--frames 17] [--codes]

The latents are the normalised ones the DiT is trained on (unit scale per channel). A cell is an object
cell when the object covers at least half of it in the frame its latent frame starts on. Latent frame 0
encodes one frame (no motion in it); ``--first``/``--last`` pick the latent frames (default: 1 to the end).
Measured with it (docs/reproduction.md, The VAE): the shipped VAE keeps the colour in most of the object
cells' variance (20.1 of 24.7, probe 96.5%); session 14's code VAE holds colour, shape and direction
(probes 100 / 100 / 99.6%). ``--codes`` also reads the codes a VAE was trained to write
(``--shape-weight``, ``--motion-weight``, ``--colour-code-weight``, docs/training.md) off its raw latent,
averaged over the object's cells, and prints how often each names the clip's value, by latent frame.

``--position`` asks where the object is instead: a small convolutional probe is trained to give the 9
centroids (as the figures measure them) of a 9-frame clip from its 3 latent frames, and its motion error
on held-out clips (mean |speed - 1.5 px|, and the temporal quality that makes) is printed beside the
round trips of each ``--decoder`` on the same clips, and with ``--student`` beside that student's own
first 3 latent frames read by the probe and drawn by each decoder. Measured with it (session 18): the
probe reads motion from version 6's latents to 0.044 px (95.8) where its decoder draws it to 0.289 (76.3).

    python scripts/latent_probe.py VAE --position [--clips 4000] [--steps 4000] [--decoder VAE2] [--student DIT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/...` from anywhere

from causvid_core.pipeline import to_uint8_frames  # noqa: E402
from causvid_core.text import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPE_NAMES  # noqa: E402
from causvid_core.vae import load_wan_vae  # noqa: E402
from training.metrics import frame_stats, wrapped  # noqa: E402
from training.shapes import (  # noqa: E402
    DIRECTION_VECTORS,
    SPEED,
    ShapesDataset,
    parse_prompt,
    prompt_set,
    render_video,
    to_model_range,
)
from training.vae_stage import COLOUR_CHANNELS, MOTION_CHANNELS, SHAPE_CHANNELS, object_cover  # noqa: E402

ATTRIBUTES = {name: list(values) for name, values in
              (("colour", COLOURS), ("shape", SHAPE_NAMES), ("direction", DIRECTIONS), ("background", BACKGROUNDS))}


def encode_clips(vae, clips: int, frames: int, seed: int = 2000) -> tuple[list[str], list[tuple]]:
    """The probe's prompts, and per clip its raw latent [1, C, f, h, w] and object cover [1, 1, f, h, w]."""
    prompts = prompt_set(clips, seed=3)
    encoded = []
    for i, prompt in enumerate(prompts):
        x = to_model_range(render_video(prompt, seed=seed + i, num_frames=frames))[None]
        with torch.no_grad():
            encoded.append((vae.encode_raw(x), object_cover(x)))
    return prompts, encoded


def object_cells(vae, encoded: list[tuple], first: int, last: int | None):
    """Per object cell: its normalised latent vector [N, C] and the index of its clip [N]."""
    feats, clip_of = [], []
    for i, (mu, cover) in enumerate(encoded):
        z = vae.normalize(mu)[0]  # [C, f, h, w]: what the DiT is trained on
        sel = cover[0, 0, first:last] >= 0.5
        cells = z[:, first:last].permute(1, 2, 3, 0)[sel]  # [n, C]
        feats.append(cells)
        clip_of.append(torch.full((len(cells),), i))
    if not feats or sum(len(f) for f in feats) == 0:
        raise SystemExit("no object cells: is the VAE a Shapes VAE (8x8 latent cells on 64x64 frames)?")
    return torch.cat(feats), torch.cat(clip_of)


def variance_split(x: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(between, within): the summed per-channel variance of the label means around the overall mean,
    and of the cells around their label's mean (between + within = total)."""
    mean = x.mean(0)
    between = torch.zeros(())
    within = torch.zeros(())
    for k in labels.unique():
        part = x[labels == k]
        w = len(part) / len(x)
        between += w * (part.mean(0) - mean).square().sum()
        within += w * part.var(0, unbiased=False).sum()
    return float(between), float(within)


def probe_accuracy(x: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, steps: int = 300) -> float:
    """Held-out accuracy of a multinomial logistic regression (standardised inputs, light L2)."""
    mu, sd = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    xs = (x - mu) / sd
    k = int(labels.max()) + 1
    lin = torch.nn.Linear(x.shape[1], k)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xs[train]), labels[train])
        loss = loss + 1e-3 * lin.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = lin(xs[~train]).argmax(1)
    return float((pred == labels[~train]).float().mean())


def probe(vae, clips: int = 96, frames: int = 17, first: int = 1, last: int | None = None,
          encoded: tuple[list[str], list[tuple]] | None = None) -> dict:
    """The variance split and probe per attribute; ``encoded`` (from ``encode_clips``) saves encoding again."""
    prompts, clips_encoded = encoded or encode_clips(vae, clips, frames)
    clips, frames = len(prompts), 1 + 4 * (clips_encoded[0][0].shape[2] - 1)  # as encoded
    x, clip_of = object_cells(vae, clips_encoded, first, last)
    parsed = [parse_prompt(p) for p in prompts]
    total = float(x.var(0, unbiased=False).sum())
    out = {"clips": clips, "frames": frames, "cells": len(x), "total_variance": total}
    for name, values in ATTRIBUTES.items():
        per_clip = torch.tensor([values.index(getattr(p, name)) for p in parsed])
        labels = per_clip[clip_of]
        # half the clips of each value fit the probe, the other half test it (prompt_set cycles the
        # attributes, so a plain odd/even split of the clips can hold some values out of training)
        rank = torch.zeros(clips, dtype=torch.long)
        for k in per_clip.unique():
            idx = (per_clip == k).nonzero()[:, 0]
            rank[idx] = torch.arange(len(idx))
        train = (rank % 2 == 0)[clip_of]
        between, within = variance_split(x, labels)
        out[name] = {"between": round(between, 3), "within": round(within, 3),
                     "probe": round(100 * probe_accuracy(x, labels, train), 1),
                     "chance": round(100 / len(values), 1)}  # fmt: skip
    return out


def read_codes(mu: torch.Tensor, cover: torch.Tensor) -> dict[str, torch.Tensor]:
    """Raw latents [B, C, f, h, w] and object cover [B, 1, f, h, w] -> per clip and latent frame [B, f] the
    shape (argmax of channels 3-5), direction (nearest unit vector to channels 6-7) and colour (nearest
    palette colour to channels 8-10, as R, G, B in -1..1) their cover-weighted means name."""
    w = cover / cover.sum((3, 4), keepdim=True).clamp_min(1e-6)
    mean = (mu * w).sum((3, 4))  # [B, C, f]
    dirs = torch.tensor([DIRECTION_VECTORS[d] for d in DIRECTIONS], dtype=mu.dtype)  # [4, 2]
    palette = torch.tensor(list(COLOURS.values()), dtype=mu.dtype) / 127.5 - 1  # [6, 3]

    def nearest(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:  # x [B, k, f] -> [B, f]
        return (x.permute(0, 2, 1)[:, :, None] - table).square().sum(-1).argmin(-1)

    return {"shape": mean[:, SHAPE_CHANNELS].argmax(1), "direction": nearest(mean[:, MOTION_CHANNELS], dirs),
            "colour": nearest(mean[:, COLOUR_CHANNELS], palette)}  # fmt: skip


def code_accuracy(vae, clips: int = 48, frames: int = 33,
                  encoded: tuple[list[str], list[tuple]] | None = None) -> dict[str, list[float]]:
    """Per code, the share of clips (0-100) whose code names the right value, by latent frame."""
    prompts, clips_encoded = encoded or encode_clips(vae, clips, frames)
    hits: dict[str, list[torch.Tensor]] = {"shape": [], "direction": [], "colour": []}
    for prompt, (mu, cover) in zip(prompts, clips_encoded, strict=True):
        read = read_codes(mu, cover)
        q = parse_prompt(prompt)
        truth = {"shape": SHAPE_NAMES.index(q.shape), "direction": DIRECTIONS.index(q.direction),
                 "colour": list(COLOURS).index(q.colour)}  # fmt: skip
        for name in hits:
            hits[name].append(read[name][0] == truth[name])
    return {name: [round(100 * float(v), 1) for v in torch.stack(h).float().mean(0)] for name, h in hits.items()}


def centroids(video: torch.Tensor, prompt: str) -> np.ndarray:
    """Per-frame object centroids [F, 2] of a video [3, F, H, W] in -1..1, as the figures measure them."""
    return frame_stats(to_uint8_frames(video[None]).numpy(), parse_prompt(prompt).background_rgb).centroid


def motion_error(c: np.ndarray, size: int = 64) -> tuple[float, float]:
    """Centroids [N, F, 2] -> (mean |speed - 1.5| in px, the temporal quality 100 mean exp(-that))."""
    d = wrapped(np.diff(c, axis=1), size)
    err = np.abs(np.hypot(d[..., 0], d[..., 1]) - SPEED)
    return float(np.nanmean(err)), 100 * float(np.nanmean(np.exp(-err)))


class PositionProbe(torch.nn.Module):
    """Latent frames [B, C, f, h, w] -> the centroids of their 1 + 4 (f - 1) pixel frames, each coordinate
    as the cosine and sine of its angle on the wrapped canvas (so a wrap costs nothing)."""

    def __init__(self, channels: int, latent_frames: int, cells: int = 8, width: int = 128, size: int = 64) -> None:
        super().__init__()
        self.frames, self.size = 1 + 4 * (latent_frames - 1), size
        conv = dict(kernel_size=3, padding=1, padding_mode="circular")
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels * latent_frames, width, **conv), torch.nn.SiLU(),
            torch.nn.Conv2d(width, width, **conv), torch.nn.SiLU(), torch.nn.Conv2d(width, width, **conv),
            torch.nn.SiLU(), torch.nn.Flatten(), torch.nn.Linear(width * cells * cells, 256), torch.nn.SiLU(),
            torch.nn.Linear(256, 4 * self.frames))  # fmt: skip

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.flatten(1, 2))

    def target(self, c: np.ndarray) -> torch.Tensor:
        a = torch.from_numpy(c / self.size * 2 * np.pi).float()  # [N, F, 2]
        return torch.cat([a.cos(), a.sin()], -1).flatten(1)

    def centroids(self, z: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            y = self(z).reshape(len(z), self.frames, 4)
        return np.mod(torch.atan2(y[..., 2:], y[..., :2]).numpy() / (2 * np.pi) * self.size, self.size)


def fit_position_probe(z: torch.Tensor, c: np.ndarray, steps: int, batch: int = 64, lr: float = 1e-3,
                       width: int = 128) -> PositionProbe:
    """Fit the probe to latents [N, C, f, h, w] and their clips' centroids [N, F, 2] (one-cycle AdamW)."""
    probe = PositionProbe(z.shape[1], z.shape[2], cells=z.shape[-1], width=width)
    y = probe.target(c)
    opt = torch.optim.AdamW(probe.parameters(), lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(z), (batch,), generator=gen)
        loss = (probe(z[idx]) - y[idx]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return probe.eval()


def position(vae, clips: int, steps: int, decoders: list[str], student: str | None, held_out: int = 400,
             seed: int = 123, student_prompts: int = 64, log=None) -> dict:
    """The ``--position`` figures: motion error of the probe and of each decoder, as (px, temporal);
    ``log`` (e.g. print) hears how far the long parts have got."""
    data = ShapesDataset(9, seed=seed)
    z, c, prompts = [], [], []
    for a in range(0, clips + held_out, 50):  # 50 clips per encoder call
        if log and a % 500 == 0:
            log(f"encoding clips: {a}/{clips + held_out}")
        xs, names = zip(*(data.sample(i) for i in range(a, min(a + 50, clips + held_out))), strict=True)
        with torch.no_grad():
            z.append(vae.encode(torch.stack(xs)))
        c += [centroids(x, prompt) for x, prompt in zip(xs, names, strict=True)]
        prompts += names
    z, c = torch.cat(z), np.stack(c)
    if log:
        log(f"fitting the probe: {steps} steps")
    probe = fit_position_probe(z[:clips], c[:clips], steps)
    test = slice(clips, None)
    out = {"probe": motion_error(probe.centroids(z[test])), "truth": motion_error(c[test])}
    decs = {path: load_wan_vae(path).eval() for path in decoders}

    def drawn(dec, latents: torch.Tensor, names: list[str]) -> tuple[float, float]:
        """The motion error of the videos a decoder draws from latents [N, C, f, h, w] (50 at a time)."""
        cs = []
        for a in range(0, len(latents), 50):
            with torch.no_grad():
                rec = dec.decode(latents[a : a + 50])
            cs += [centroids(r, p) for r, p in zip(rec, names[a : a + 50], strict=True)]
        return motion_error(np.stack(cs))

    for path, dec in decs.items():
        if log:
            log(f"round trips through {path}")
        out[f"round trip {path}"] = drawn(dec, z[test], prompts[test])
    if student:
        from causvid_core.bundle import load_bundle
        from causvid_core.pipeline import PromptTimeline, RenderRequest, render
        from training.data import checkpoint_text_encoder

        bundle = load_bundle(student, dtype=torch.float32)
        text = bundle.text_encoder or checkpoint_text_encoder(student, bundle.model.config)
        names, zs = prompt_set(student_prompts, seed=0), []
        for i, prompt in enumerate(names):  # 9 frames: one chunk, the student's first 3 latent frames
            with torch.no_grad():
                state = render(bundle.model, PromptTimeline.single(text.encode([prompt])), RenderRequest(64, 64, 9, seed=i),
                               sampling=bundle.sampling, causal=bundle.causal)  # fmt: skip
            zs.append(torch.cat(state.latents, 2)[0, :, :3])
        zs = torch.stack(zs)
        out["probe on the student"] = motion_error(probe.centroids(zs))
        for path, dec in decs.items():
            out[f"student through {path}"] = drawn(dec, zs, names)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vae")
    p.add_argument("--clips", type=int, default=None, help="clips encoded (default 96; --position: 4000)")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--first", type=int, default=1, help="first latent frame used (0 encodes one frame)")
    p.add_argument("--last", type=int, default=None, help="one past the last latent frame used")
    p.add_argument("--codes", action="store_true", help="also read the shape/motion/colour codes off the latent")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--position", action="store_true", help="probe where the object is instead (see above)")
    p.add_argument("--steps", type=int, default=4000, help="--position: the probe's training steps")
    p.add_argument("--decoder", action="append", default=[], help="--position: a VAE whose decoder to compare")
    p.add_argument("--student", default=None, help="--position: a student (bundle source) whose latents to read")
    args = p.parse_args()
    torch.manual_seed(0)
    vae = load_wan_vae(args.vae).eval()
    if args.position:
        out = position(vae, args.clips or 4000, args.steps, [args.vae, *args.decoder], args.student,
                       log=lambda m: print(m, flush=True))
        for name, (px, tq) in out.items():
            print(f"{name}: motion off by {px:.3f} px, temporal quality {tq:.1f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return
    encoded = encode_clips(vae, args.clips or 96, args.frames)  # once, for the probes and the codes
    out = probe(vae, first=args.first, last=args.last, encoded=encoded)
    print(f"{out['cells']} object cells from {out['clips']} clips; total variance {out['total_variance']:.2f}")
    for name in ATTRIBUTES:
        r = out[name]
        print(f"{name:10s} between {r['between']:6.2f}  within {r['within']:6.2f}  "
              f"probe {r['probe']:5.1f}% (chance {r['chance']:.0f}%)")  # fmt: skip
    if args.codes:
        out["codes"] = code_accuracy(vae, encoded=encoded)
        for name, acc in out["codes"].items():  # the first latent frame holds one frame: no motion in it
            print(f"{name} code right (% of clips) by latent frame: " + " ".join(f"{a:.0f}" for a in acc))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
