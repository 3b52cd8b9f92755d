"""``python -m training.distill vae``: the Wan-architecture VAE trained from scratch on Shapes clips.

Loss: L1 + ``mse_weight`` * MSE between the clip and its reconstruction from a posterior sample,
plus ``kl_weight`` * KL(q(z|x) || N(0, 1)) per latent element (keeps the latent space smooth for
the DiT). Clips are short (``clip_frames``); the causal convolutions make the result valid for any
length. After the last step the per-channel statistics of the posterior means over
``stats_samples`` full-length clips go into ``final.safetensors`` (``causvid_latents`` metadata), so
``encode`` returns unit-scale latents and every later stage and the bundle use the same numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from causvid_core.bundle import file_metadata, latent_stats_json
from causvid_core.pipeline import to_uint8_frames
from causvid_core.vae import VAEStreamState, WanVAE, latent_stats_of

from . import dist
from .config import CENTROID_READS, ConfigError, VAETrainConfig, stage_dir, stage_name
from .data import run_vae_path
from .metrics import MIN_AREA
from .shapes import DIRECTION_VECTORS, REFERENCE_SIZE, SHAPE_NAMES, ShapesDataset, parse_prompt
from .state import Trainable, save_weights

LATENTS_META = "causvid_latents"  # the key causvid_core.bundle reads (kept in sync by a test)
# set on a --decoder-only run's VAE: (mean, std) of its frozen encoder (the init's), written into every
# checkpoint it saves, so a step_*.safetensors is usable in front of a DiT like final.safetensors
FROZEN_STATS_ATTR = "frozen_latent_stats"


def posterior(vae: WanVAE, video: Tensor) -> tuple[Tensor, Tensor]:
    """(mu, logvar) of a whole clip [B, 3, T, H, W] -> [B, z, 1 + (T-1)/4, H/8, W/8] each."""
    state = VAEStreamState("encode")
    h = vae.conv1(vae.encoder(video, state), state)
    mu, logvar = h.chunk(2, dim=1)
    return mu, logvar.clamp(-30.0, 20.0)


def pixel_weights(video: Tensor, object_weight: float) -> Tensor:
    """[B, 1, T, H, W]: ``object_weight`` on pixels farther than 80/255 (RGB) from the clip's background,
    1 elsewhere (the background: ``background``), so the loss does not drown the object in background."""
    if object_weight == 1.0:
        return video.new_ones(1)
    far = object_mask(video, background(video))
    return 1.0 + (object_weight - 1.0) * far.float()


SKIPS_IN_A_ROW = 5  # consecutive large-gradient steps skipped before the large norm counts as the new level
OBJECT_DISTANCE = 2 * 80 / 255  # SHAPES.md: object pixels are farther than 80 (RGB) from the background
MASK_SOFTNESS = 0.05  # in -1..1 units (about 6 RGB levels): width of the soft segmentation's edge


def background(video: Tensor) -> Tensor:
    """[B, 3, 1, 1, 1]: the per-channel median of the first frame's pixels.

    The object covers about 6% of a frame, so the median is the background's colour wherever the object
    is. (The median of the four corners, used before, took the object for the background whenever a
    wrapped object covered two or more corners: about 3 clips in 100, in which every loss that separates
    object from background, the codes included, then acted on the background.)
    """
    return video[:, :, 0].flatten(2).median(dim=-1).values[:, :, None, None, None]


def object_mask(video: Tensor, bg: Tensor) -> Tensor:
    """[B, 1, T, H, W] bool: the pixels of ``video`` farther than the figures' 80 (RGB) from ``bg``."""
    return (video - bg).square().sum(1, keepdim=True) > OBJECT_DISTANCE**2


def mask_loss(recon: Tensor, video: Tensor) -> Tensor:
    """Binary cross-entropy of a soft segmentation of ``recon`` against the true object mask.

    The Shapes figures segment at 80 from the background; a reconstruction that is close in PSNR but
    blurs the edge moves that contour (a square's corners round off, a triangle becomes a blob and the
    fill ratio names the wrong shape). This term acts on the pixels on the wrong side of the threshold.
    """
    bg = background(video)
    target = object_mask(video, bg)[:, 0].float()
    return F.binary_cross_entropy_with_logits(object_logit(recon, bg), target)


def object_logit(video: Tensor, bg: Tensor) -> Tensor:
    """[B, T, H, W]: the distance of each pixel from the background, centred on the figures' 80 and
    scaled by ``MASK_SOFTNESS``; its sigmoid is a soft object mask."""
    dist = ((video - bg).square().sum(1) + 1e-6).sqrt()
    return (dist - OBJECT_DISTANCE) / MASK_SOFTNESS


def present_area(video: Tensor) -> float:
    """Object pixels a frame of ``video`` needs for the object to count as there: the figures' ``MIN_AREA``
    at 64x64, scaled to the frame's size."""
    return MIN_AREA * video.shape[-1] * video.shape[-2] / REFERENCE_SIZE**2


def circular_centroid(mask: Tensor) -> Tensor:
    """[B, T, 2] (x, y) angles in radians of the circular mean of a [B, T, H, W] mask on the torus (the
    Shapes canvas wraps around; training/metrics.py measures the centroid the same way)."""
    out = []
    for axis in (-1, -2):  # x: along the width, y: along the height
        n = mask.shape[axis]
        marginal = mask.sum(dim=-2 if axis == -1 else -1)  # [B, T, n]
        theta = 2 * math.pi * (torch.arange(n, device=mask.device, dtype=mask.dtype) + 0.5) / n
        out.append(torch.atan2(marginal @ theta.sin(), marginal @ theta.cos()))
    return torch.stack(out, -1)


EDGE_BLUR = 1.5  # px: sigma of the Gaussian that widens both masks' edges before the edge read


def circular_blur(x: Tensor, sigma: float = EDGE_BLUR) -> Tensor:
    """A [B, T, H, W] map blurred by a Gaussian of ``sigma`` px on the torus (the canvas wraps around)."""
    radius = max(1, round(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype) / sigma).square())
    k = k / k.sum()
    b, t, h, w = x.shape
    y = F.conv2d(F.pad(x.reshape(b * t, 1, h, w), (radius, radius, 0, 0), mode="circular"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="circular"), k.view(1, 1, -1, 1))
    return y.reshape(b, t, h, w)


def edge_shift(mask: Tensor, truth: Tensor) -> Tensor:
    """[B, T, 2] (x, y) in pixels: how far ``mask`` lies moved from ``truth`` (both [B, T, H, W] soft masks),
    read off ``truth``'s edges: one Lucas-Kanade step, ``-G^-1 sum((mask - truth) g)`` with ``g`` the
    gradient of the blurred truth and ``G = sum(g g^T)``, both masks blurred by ``EDGE_BLUR`` px first so
    that the read stays near linear for shifts up to about 2 px.

    Why another read: the centroids' difference pushes a pixel by its distance from the centroid, so a
    square's corners and a triangle's tips take the largest pushes every step, which looked like why a
    decoder trained on it rounds them off. Here every pixel of the edge band counts by the edge's own
    slope, wherever it lies on the outline; measured (session 24), a decoder trained on this read rounds
    them as much, so the lever arm was not the cause (``motion`` was the cure).

    Like any one-step read it sees shifts within the blurred edge (about 2 px; 3 px reads as 2.4) and
    nothing of an object drawn far off or not at all (0 then), so it suits a decoder that already draws
    the object near its place, as a fine-tune's does.
    """
    m, t = circular_blur(mask), circular_blur(truth)
    gx = (t.roll(-1, -1) - t.roll(1, -1)) / 2
    gy = (t.roll(-1, -2) - t.roll(1, -2)) / 2
    diff = m - t
    sum2 = lambda a, b: (a * b).sum((-1, -2))  # noqa: E731
    gxx, gxy, gyy, bx, by = sum2(gx, gx), sum2(gx, gy), sum2(gy, gy), sum2(diff, gx), sum2(diff, gy)
    det = (gxx * gyy - gxy.square()).clamp_min(1e-6)
    return torch.stack([(gxy * by - gyy * bx) / det, (gxy * bx - gxx * by) / det], -1)


def torus_dilate(mask: Tensor, radius: int) -> Tensor:
    """[B, T, H, W] bool dilated by a (2r+1)^2 square on the torus (training/metrics.py's ``_roll_or``)."""
    b, t, h, w = mask.shape
    x = F.pad(mask.reshape(b * t, 1, h, w).float(), (radius,) * 4, mode="circular")
    return F.max_pool2d(x, 2 * radius + 1, stride=1).reshape(b, t, h, w) > 0.5


def coverage(video: Tensor, bg: Tensor) -> Tensor:
    """[B, T, H, W]: the soft coverage the figures weigh a frame's centroid by (training/metrics.py), with
    gradients through the distances: ``clip(dist / ref, 0, 1)`` on the object's 2-px neighbourhood, ``ref``
    the mean distance over the object's interior (the 80-from-background mask eroded by one pixel; the
    mask itself when nothing is left). Faint edge pixels count by how far they are from the background."""
    dist = ((video - bg).square().sum(1) + 1e-12).sqrt()  # [B, T, H, W], -1..1 units
    mask = dist.detach() > OBJECT_DISTANCE
    interior = ~torus_dilate(~mask, 1)
    core = torch.where(interior.flatten(2).any(-1)[..., None, None], interior, mask).to(dist.dtype)
    ref = (dist * core).sum((-1, -2)) / core.sum((-1, -2)).clamp_min(1.0)
    ref = ref.clamp_min(2.0 / 255.0)[..., None, None]  # the figures' floor of 1 RGB level
    return (dist / ref).clamp(0.0, 1.0) * torus_dilate(mask, 2).to(dist.dtype)


def centroid_loss(
    recon: Tensor, video: Tensor, read: str = "moment", motion: bool = False, beta: float = 1.0
) -> Tensor:
    """Smooth-L1 loss (quadratic within ``beta`` px, default 1, then the distance itself) of the per-frame
    distance between the object centroids of ``recon`` and ``video``, in pixels, on frames where the object
    is there; ``read``: the centroids' difference ('moment', of the soft 80-from-background masks), one
    Lucas-Kanade step (``edge_shift``) or the difference of the centroids the figures take ('coverage':
    weighted by ``coverage``, so a faint edge counts as temporal quality counts it). ``motion``: of the
    change of that offset from one frame to the next instead (``--centroid-motion``), so a drawing that sits
    off the clip's by the same amount in every frame costs nothing and only its steps count, as temporal
    quality counts them.

    Why: the Shapes VAE decoded every group of four frames that share a latent frame with a fixed phase
    error (the three in-between frames drawn 0.5-0.7 px ahead, toward the frame the latent was encoded
    from), and temporal quality (exp(-|speed - 1.5 px|)) pays for every half pixel: 66 on round trips
    where the video itself scores 99.6. Blurry L1/MSE barely see a sub-pixel shift of a blob; this does.
    """
    bg = background(video)
    truth = torch.sigmoid(object_logit(video, bg))
    if read == "edge":
        delta = edge_shift(torch.sigmoid(object_logit(recon, bg)), truth)
    elif read in ("moment", "coverage"):
        if read == "coverage":
            drawn, meant = coverage(recon, bg), coverage(video, bg)
        else:
            drawn, meant = torch.sigmoid(object_logit(recon, bg)), truth
        a, b = circular_centroid(drawn), circular_centroid(meant)
        size = torch.tensor([video.shape[-1], video.shape[-2]], device=video.device, dtype=a.dtype)
        delta = torch.atan2(torch.sin(a - b), torch.cos(a - b)) * size / (2 * math.pi)  # wrapped, in pixels
    else:
        raise ConfigError(f"--centroid-read must be one of {', '.join(CENTROID_READS)}, got {read!r}")
    there = (truth.sum((-1, -2)) >= present_area(video)).to(delta)
    if motion:
        delta, there = delta[:, 1:] - delta[:, :-1], there[:, 1:] * there[:, :-1]
    err = torch.sqrt(delta.square().sum(-1) + 1e-6)
    loss = F.smooth_l1_loss(err, torch.zeros_like(err), reduction="none", beta=beta)  # slope 1 past beta
    return (loss * there).sum() / there.sum().clamp_min(1)


def centre_on(maps: Tensor, truth: Tensor) -> Tensor:
    """``maps`` [..., B, T, H, W] rolled frame by frame (the canvas wraps around) so that the centroid of the
    hard mask ``truth`` [B, T, H, W] sits at the canvas centre, as training/metrics.py centres a frame
    before it measures the fill ratio; maps stacked on the leading dims share one centring."""
    b, t, h, w = truth.shape
    size = torch.tensor([w, h], device=truth.device)
    angles = circular_centroid(truth.float()).reshape(b * t, 2)  # (x, y) in radians
    shift = size // 2 - torch.remainder(angles / (2 * math.pi) * size, size).floor().long()  # [B*T, 2]
    rows = torch.remainder(torch.arange(h, device=truth.device)[None] - shift[:, 1:], h)  # [B*T, H]
    cols = torch.remainder(torch.arange(w, device=truth.device)[None] - shift[:, :1], w)
    lead = maps.shape[:-4]
    flat = maps.reshape(*lead, b * t, h, w)
    flat = torch.gather(flat, -2, rows[:, :, None].expand(*lead, -1, -1, w))
    flat = torch.gather(flat, -1, cols[:, None, :].expand(*lead, -1, h, -1))
    return flat.reshape(maps.shape)


def box_stats(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(area, height, width) [B, T] of a centred [B, T, H, W] mask, soft or hard: height counts each row
    by its largest value (for a hard mask of one convex object, its bounding box's height), width likewise."""
    return mask.sum((-1, -2)), mask.amax(-1).sum(-1), mask.amax(-2).sum(-1)


def box_loss(recon: Tensor, video: Tensor) -> Tensor:
    """Squared error of the soft object mask's fill ratio (area / bounding box), plus the relative squared
    errors of its box height and width, against the true object's, per frame, on frames where the object
    is whole and its box (centred as the figures centre it) clears the border.

    Why: a decoder unsure of a corner averages it into a curve (squares come back with rounded corners and
    a partial row on each side, fill ratio 0.87 where the square has over 0.9; triangles with their tip
    filled in). Per pixel that is a few pixels of a frame, which the pixel and mask terms barely weigh; as
    a share of the object's box it is what names the shape. The box sizes are matched too, so that the
    ratio cannot be met by stray pixels that stretch the box."""
    bg = background(video)
    truth = object_mask(video, bg)[:, 0]  # [B, T, H, W] bool
    soft, hard = centre_on(torch.stack([torch.sigmoid(object_logit(recon, bg)), truth.to(recon.dtype)]), truth)
    area, height, width = box_stats(soft)
    t_area, t_height, t_width = box_stats(hard)
    rows, cols = hard.amax(-1), hard.amax(-2)  # [B, T, H], [B, T, W]
    clear = (rows[..., 0] + rows[..., -1] + cols[..., 0] + cols[..., -1]) == 0
    there = ((t_area >= present_area(video)) & clear).to(recon.dtype)
    fill, t_fill = area / (height * width).clamp_min(1.0), t_area / (t_height * t_width).clamp_min(1.0)
    err = (fill - t_fill).square() + ((height - t_height) / t_height.clamp_min(1.0)).square() \
        + ((width - t_width) / t_width.clamp_min(1.0)).square()
    return (err * there).sum() / there.sum().clamp_min(1.0)


def object_colour_loss(recon: Tensor, video: Tensor) -> Tensor:
    """Squared error (summed over RGB, in -1..1 units) between the mean colour of ``recon`` and of ``video``
    over the true object's pixels, per frame, averaged over frames with an object.

    Why: VAEs that carry the shape decoded some objects in the wrong hue, frame by frame (a magenta triangle
    on gray as cyan, blue, magenta in turn; a yellow one as orange), while the 8x8 cell colours that
    ``--colour-weight`` matches are mostly background around a small object. The figures' colour accuracy
    is the nearest palette colour of exactly this mean.
    """
    far = object_mask(video, background(video)).to(recon)  # [B, 1, T, H, W]
    area = far.sum((-1, -2))  # [B, 1, T]
    mean = lambda x: (x * far).sum((-1, -2)) / area.clamp_min(1.0)  # noqa: E731  [B, 3, T]
    there = (area > 0).to(recon)
    err = (mean(recon) - mean(video)).square().sum(1, keepdim=True)
    return (err * there).sum() / there.sum().clamp_min(1.0)


def object_cover(video: Tensor) -> Tensor:
    """[B, 1, F, h, w]: the share of each 8x8 latent cell that is object, in the frames the latent frames
    start on (every 4th), as the shape and colour codes weight their cells."""
    return F.avg_pool3d(object_mask(video[:, :, ::4], background(video)).float(), (1, 8, 8))


SHAPE_CHANNELS = slice(3, 6)  # after the colour guide's 0-2: one channel per shape, +1 for it, -1 otherwise


def shape_code_loss(mu: Tensor, video: Tensor, shapes: Tensor) -> Tensor:
    """Squared error between latent channels 3-5 and the clip's shape code (+1 on the shape's channel,
    -1 on the other two), weighted by how much of each latent cell the object covers (in the frames the
    latent frames start on, as ``pooled_colour``).

    Why: every Shapes VAE trained on reconstruction alone encoded a circle and a square at the same
    place and colour 0.4-0.8 apart in a latent of norm 13-17 (a triangle ~2.5), and decoded all three
    as blobs (fill ratios 0.83 / 0.84-0.89 / 0.64-0.75 against 0.77 / 0.99 / 0.57): the corners are too
    few pixels for L1/MSE to pay for carrying them. This puts the shape into the latent explicitly, so
    the decoder (and the DiT that writes those latents from the prompt) has it to draw.
    """
    cover = object_cover(video)
    target = F.one_hot(shapes.long(), 3).to(mu) * 2 - 1  # [B, 3]
    err = (mu[:, SHAPE_CHANNELS] - target[:, :, None, None, None]).square().sum(1, keepdim=True)
    return (err * cover).sum() / cover.sum().clamp_min(1e-6)


MOTION_CHANNELS = slice(6, 8)  # after the shape code's 3-5: the direction of motion (x, y), one unit long


def motion_code_loss(mu: Tensor, video: Tensor, directions: Tensor) -> Tensor:
    """Squared error between latent channels 6-7 of every latent frame after the first and the clip's
    direction of motion ``directions`` [B, 2] (x, y: a unit vector), weighted by how much of each latent
    cell the object covers on average over the four frames that latent frame encodes.

    Why: a latent frame after the first encodes four frames, but the direction of motion was not even
    linearly readable from one (a ridge probe on the cells around the object: 16-34% held out, chance 25),
    and the decoder drew those four frames as blobs (fill ratio 0.84-0.85 for squares, 0.69-0.73 for
    triangles), whichever frame of the group. The code puts the direction where the decoder, and the DiT
    that writes the latents from the prompt, can read it; learnt (right in every group), it did not by
    itself sharpen the groups (docs/reproduction.md, The VAE). The first latent frame (a single frame:
    no motion to see) is left free.
    """
    frames = video.shape[2]
    if frames < 5 or (frames - 1) % 4:
        return mu.new_zeros(())  # single frames (the image phase): no group to code
    far = object_mask(video[:, :, 1:], background(video)).float()  # [B, 1, T-1, H, W]
    b, _, t, h, w = far.shape
    cover = F.avg_pool3d(far.view(b, 1, t // 4, 4, h, w).mean(3), (1, 8, 8))  # [B, 1, F-1, h, w]
    target = directions.to(mu)[:, :, None, None, None]
    err = (mu[:, MOTION_CHANNELS, 1:] - target).square().sum(1, keepdim=True)
    return (err * cover).sum() / cover.sum().clamp_min(1e-6)


COLOUR_CHANNELS = slice(8, 11)  # after the motion code's 6-7: the object's colour (R, G, B in -1..1)


def colour_code_loss(mu: Tensor, video: Tensor, colours: Tensor) -> Tensor:
    """Squared error between latent channels 8-10 and the object's colour ``colours`` [B, 3] (R, G, B in
    the video's -1..1 range), weighted by how much of each latent cell the object covers (in the frames
    the latent frames start on, as ``shape_code_loss``), in every latent frame.

    Why: the VAEs that carry the shape and motion codes round-trip colour perfectly, yet the object's
    colour is a small, tangled part of their latents: between-colour variance 1.3-1.4 of the object
    cells' ~18 (the shipped VAE: 14 of 17), and a linear probe names the colour from the object cells
    61% of the time (shipped 99.7%). Their DiT teachers drew colour worse the less of it the latent held
    (colour accuracy 97 / 85 / 62). The code puts the colour where the DiT can write it from the prompt.
    """
    cover = object_cover(video)
    err = (mu[:, COLOUR_CHANNELS] - colours.to(mu)[:, :, None, None, None]).square().sum(1, keepdim=True)
    return (err * cover).sum() / cover.sum().clamp_min(1e-6)


def init_posterior(vae: WanVAE, log_std: float = -4.0) -> None:
    """Start with a narrow posterior (logvar bias 2 * log_std): with Wan's default init the samples are
    almost pure noise and the decoder learns nothing for hundreds of steps."""
    with torch.no_grad():
        vae.conv1.bias[vae.z_dim :] = 2.0 * log_std


@torch.no_grad()
def inflate_temporal(vae: WanVAE) -> None:
    """Make the temporal parts act as the image network on every frame (the video as stills).

    Trained on single frames, a causal conv only ever used its last time tap (its past was zero padding),
    and the time convolutions of Resample never ran: all of these sit at their random init. Entering the
    clip phase like that injects noise (PSNR fell from 28 to 19 dB at the switch, and a VAE trained on
    from there did not generalise past its 9-frame clips). Here the past taps become zero, the temporal
    downsampling keeps the newest frame of each pair and the temporal upsampling repeats the frame, so
    the clip phase starts from the image network's quality and only has to learn motion.
    """
    from causvid_core.vae import CausalConv3d, Resample

    time_convs = set()
    for module in vae.modules():
        if isinstance(module, Resample) and hasattr(module, "time_conv"):
            conv = module.time_conv
            time_convs.add(conv)
            conv.weight.zero_()
            conv.bias.zero_()
            out_dim, in_dim = conv.weight.shape[:2]
            eye = torch.eye(in_dim, device=conv.weight.device, dtype=conv.weight.dtype)
            for half in range(out_dim // in_dim):  # upsample3d: both output frames copy the input frame
                conv.weight[half * in_dim : (half + 1) * in_dim, :, -1, 0, 0] = eye
    for module in vae.modules():
        if isinstance(module, CausalConv3d) and module not in time_convs and module.kernel_size[0] > 1:
            module.weight[:, :, :-1] = 0.0


def train_temporal_only(vae: WanVAE) -> int:
    """Freeze everything that acts on a still: only the past time taps of the causal convolutions and the
    temporal resampling convolutions train (the current-frame tap's gradient is masked to zero). Returns
    the number of trainable weights.

    Why: a VAE that decodes single frames with the right colour and shape lost both in its clip phase
    (single-frame round trips colour 100 / shape 79, then 33-frame round trips 71-76 / 44-52 after 500-1500
    clip steps). With the image network frozen, a clip reconstructs its first frame exactly as the image
    phase left it, and the clip phase can only add what the frames before contribute (the motion).
    """
    from causvid_core.vae import CausalConv3d, Resample

    for p in vae.parameters():
        p.requires_grad_(False)
    time_convs = {m.time_conv for m in vae.modules() if isinstance(m, Resample) and hasattr(m, "time_conv")}
    count = 0
    for module in vae.modules():
        if module in time_convs:
            for p in module.parameters():
                p.requires_grad_(True)
                count += p.numel()
        elif isinstance(module, CausalConv3d) and module.kernel_size[0] > 1:
            module.weight.requires_grad_(True)
            mask = torch.ones_like(module.weight)
            mask[:, :, -1] = 0.0  # the current frame's tap: the image network
            module.weight.register_hook(lambda grad, mask=mask: grad * mask)
            count += int(mask.sum())
    return count


def channel_list(spec: str, z_dim: int, flag: str) -> list[int]:
    """'0-2,5' -> [0, 1, 2, 5]; every channel must exist (< ``z_dim``); '' -> []."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise ConfigError(f"{flag} {spec!r}: give channels as numbers and ranges, like '0-2' or '0,1,5'") from None
        if not 0 <= first <= last < z_dim:
            raise ConfigError(f"{flag} {spec!r}: {part} is not a range of channels 0-{z_dim - 1}")
        out.extend(range(first, last + 1))
    return out


def shift_sizes(spec: str, default: float, z_dim: int, flag: str = "--latent-shift-channels") -> list[float]:
    """Per-channel offset sizes (in latent stds): ``default`` everywhere but the channels ``spec`` (option
    ``flag``) names, '3-6:0.5,13:0.4' (channels as for --clean-channels, then a colon and the size)."""
    sizes = [default] * z_dim
    for part in filter(None, (p.strip() for p in spec.split(","))):
        channels, colon, size = part.partition(":")
        try:
            value = float(size)
        except ValueError:
            value = -1.0
        if not colon or not value >= 0:
            raise ConfigError(f"{flag} {spec!r}: {part!r} is not CHANNELS:STD; give e.g. "
                              "'3-6:0.5,13:0.4' (offset sizes >= 0 in latent stds)")  # fmt: skip
        for c in channel_list(channels, z_dim, flag):
            sizes[c] = value
    return sizes


def offset_std(sizes: list[float], init_std: Tensor | None) -> Tensor | None:
    """Per-clip offsets' std per channel in raw latent units [1, C, 1, 1, 1] from ``sizes`` in latent stds
    (``shift_sizes``); None: no offsets."""
    if init_std is None or not any(sizes):
        return None
    return torch.tensor(sizes, device=init_std.device).view(1, -1, 1, 1, 1) * init_std


def reconstruct(vae: WanVAE, z: Tensor, state: VAEStreamState | None = None) -> Tensor:
    """Raw latents -> the decoder's unclamped drawing; with ``state``, continuing that stream."""
    state = state if state is not None else VAEStreamState("decode")
    return vae.decoder(vae.conv2(z, state), state)


def stream_window(vae: WanVAE, z: Tensor, video: Tensor, start: int, count: int) -> tuple[Tensor, Tensor]:
    """(drawing, frames) of latent frames ``start`` .. ``start + count`` of a clip, drawn as a stream decodes them:
    the latents before ``start`` prime the decoder's causal cache without gradient, so the window's frames are
    those of the whole clip's decode at a fraction of the cost (``--student-frames``)."""
    state = VAEStreamState("decode")
    if start > 0:
        with torch.no_grad():
            reconstruct(vae, z[:, :, :start], state)
    first = 0 if start == 0 else 1 + 4 * (start - 1)  # the first latent frame gives one frame, the others four
    drawn = reconstruct(vae, z[:, :, start : start + count], state)
    return drawn, video[:, :, first : first + drawn.shape[2]]


def pixel_loss(recon: Tensor, video: Tensor, cfg: VAETrainConfig) -> tuple[Tensor, Tensor, Tensor]:
    """(weighted L1 + MSE, L1, MSE) of a reconstruction, the object's pixels weighted ``--object-weight``."""
    weight = pixel_weights(video, cfg.object_weight)
    l1 = ((recon - video).abs() * weight).mean()
    mse = ((recon - video).square() * weight).mean()
    return cfg.l1_weight * l1 + cfg.mse_weight * mse, l1, mse


def cell_colour_loss(recon: Tensor, video: Tensor) -> Tensor:
    """Squared error of the 8x8 cell means (``--colour-weight``)."""
    return (F.avg_pool3d(recon.float(), (1, 8, 8)) - F.avg_pool3d(video.float(), (1, 8, 8))).square().mean()


def picture_loss(recon: Tensor, video: Tensor, cfg: VAETrainConfig) -> tuple[Tensor, dict[str, float]]:
    """Every term that compares a drawing with the video it should be (pixels, cell colours, the
    segmentation, the centroid, the object's colour), weighted by ``cfg``; with the parts for the log."""
    loss, l1, mse = pixel_loss(recon, video, cfg)
    parts = {"l1": float(l1.detach()), "mse": float(mse.detach())}
    terms = (("colour", cfg.colour_weight, cell_colour_loss),  # the low-frequency part of the error: cell colours
             ("mask", cfg.mask_weight, mask_loss),
             ("centroid", cfg.centroid_weight,
              lambda r, v: centroid_loss(r, v, cfg.centroid_read, cfg.centroid_motion, cfg.centroid_delta)),
             ("object_colour", cfg.object_colour_weight, object_colour_loss),
             ("box", cfg.box_weight, box_loss))  # fmt: skip
    for name, weight, term in terms:
        if weight > 0:
            value = term(recon, video)
            loss = loss + weight * value
            parts[name] = float(value.detach())
    return loss, parts


def vae_loss(
    vae: WanVAE, video: Tensor, eps: Tensor, cfg: VAETrainConfig, guide: float = 0.0,
    shapes: Tensor | None = None, latent_noise: Tensor | None = None, directions: Tensor | None = None,
    colours: Tensor | None = None, disc: nn.Module | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """``vae_loss_and_recon`` without the reconstruction."""
    loss, parts, _ = vae_loss_and_recon(vae, video, eps, cfg, guide, shapes, latent_noise, directions, colours, disc)
    return loss, parts


def vae_loss_and_recon(
    vae: WanVAE, video: Tensor, eps: Tensor, cfg: VAETrainConfig, guide: float = 0.0,
    shapes: Tensor | None = None, latent_noise: Tensor | None = None, directions: Tensor | None = None,
    colours: Tensor | None = None, disc: nn.Module | None = None, outline: Tensor | None = None,
) -> tuple[Tensor, dict[str, float], Tensor]:
    """Total loss, its parts and the reconstruction of one batch; ``eps`` is the posterior noise (seeded by the step);
    ``shapes`` [B] the index of each clip's shape (``SHAPE_NAMES``), needed by ``--shape-weight``;
    ``latent_noise`` (shaped as the latents) is added to what the decoder reconstructs from (``--latent-noise``);
    ``directions`` [B, 2] each clip's direction of motion (x, y), needed by ``--motion-weight``.
    ``colours`` [B, 3] each clip's object colour (-1..1), needed by ``--colour-code-weight``.
    ``disc`` the patch discriminator, needed by ``--adv-weight`` (its weights get no gradient here).
    ``outline`` (``--code-swap``): clips whose latents give every channel but the shape code (channels 3-5,
    which come from ``video``); the decoder must still draw ``video``.

    ``guide`` > 0 adds the pooled-colour guide (see ``guide_weight``): the encoder's means regress onto
    a fixed 8x8-pooled, 16-channel lift of the frames, and the decoder also reconstructs from that lift.
    """
    mu, logvar = posterior(vae, video)
    z = mu + torch.exp(0.5 * logvar) * eps
    if outline is not None:
        mu_o, logvar_o = posterior(vae, outline)
        z_o = mu_o + torch.exp(0.5 * logvar_o) * eps
        z = torch.cat([z_o[:, : SHAPE_CHANNELS.start], z[:, SHAPE_CHANNELS], z_o[:, SHAPE_CHANNELS.stop :]], 1)
    if latent_noise is not None:
        z = z + latent_noise
    recon = reconstruct(vae, z)
    rec, parts = picture_loss(recon, video, cfg)
    kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).mean()
    loss = rec + cfg.kl_weight * kl
    parts["kl"] = float(kl.detach())
    codes = (("--shape-weight", cfg.shape_weight, shape_code_loss, shapes, "shape_code", "the shape"),
             ("--motion-weight", cfg.motion_weight, motion_code_loss, directions, "motion_code", "the direction"),
             ("--colour-code-weight", cfg.colour_code_weight, colour_code_loss, colours, "colour_code",
              "the object colour"))  # fmt: skip
    for flag, weight, code_loss, target, part, what in codes:
        if weight > 0:
            if target is None:
                raise ConfigError(f"{flag} needs {what} of every clip")
            code = code_loss(mu, video, target)
            loss = loss + weight * code
            parts[part] = float(code.detach())
    if guide > 0 and cfg.guide == "colour":
        # only the first three channels are pulled onto the cell colours; the decoder is never asked to
        # draw from a guide latent, and the other channels stay free to carry the outline
        guide_lat = (mu[:, :3] - pooled_colour(video).to(mu)).square().mean()
        loss = loss + guide * guide_lat
        parts |= {"guide_latent": float(guide_lat.detach())}
    elif guide > 0:
        target = guide_latent(video, vae.z_dim, cfg.guide).to(mu)
        guide_rec = pixel_loss(reconstruct(vae, target), video, cfg)[0]
        guide_lat = (mu - target).square().mean()
        loss = loss + guide * (guide_lat + guide_rec)
        parts |= {"guide_latent": float(guide_lat.detach()), "guide_recon": float(guide_rec.detach())}
    if cfg.adv_weight > 0:
        if disc is None:
            raise ConfigError("--adv-weight needs the patch discriminator")
        adv = generator_hinge(disc, recon)
        loss = loss + cfg.adv_weight * adv
        parts["adv_g"] = float(adv.detach())
    plain = (recon.detach() - video).square().mean()
    parts["psnr"] = float(10 * torch.log10(4.0 / plain.clamp_min(1e-10)))  # range -1..1: peak 2
    return loss, parts, recon


class PatchDiscriminator(nn.Module):
    """Frames -> a grid of real / fake logits, one per 4x4 pixels, each seeing about 26 px: a whole Shapes
    object (about 14 px) with its edges and corners. Two stride-2 convolutions, then two 3x3 ones."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        c = channels
        self.channels = c
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(c, 2 * c, 4, 2, 1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, 2 * c, 3, 1, 1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, 1, 3, 1, 1),
        )  # fmt: skip

    def forward(self, video: Tensor) -> Tensor:
        """[B, 3, T, H, W] clips -> [B * T, 1, H / 4, W / 4] logits (every frame on its own)."""
        frames = video.transpose(1, 2).flatten(0, 1)
        return self.net(frames.float())


def generator_hinge(disc: nn.Module, recon: Tensor) -> Tensor:
    """The decoder's adversarial loss: minus the discriminator's mean logit on the reconstruction. The
    discriminator's weights are only read (no gradient reaches them)."""
    needs = [p.requires_grad for p in disc.parameters()]
    for p in disc.parameters():
        p.requires_grad_(False)
    try:
        return -disc(recon).mean()
    finally:
        for p, flag in zip(disc.parameters(), needs, strict=True):
            p.requires_grad_(flag)


def discriminator_hinge(disc: nn.Module, video: Tensor, recon: Tensor) -> Tensor:
    """Hinge loss of the discriminator: real frames above +1, reconstructed ones below -1. Both go through
    one forward (a data-parallel wrapper expects one forward per backward)."""
    real, fake = disc(torch.cat([video, recon.detach().to(video.dtype)])).chunk(2)
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


GUIDES = ("pool", "quadrants", "colour")


def pooled_colour(video: Tensor) -> Tensor:
    """[B, 3, 1 + (T-1)/4, H/8, W/8]: the mean colour of each 8x8 cell of every 4th frame (the frames the
    causal VAE's latent frames start on), in the video's -1..1 range."""
    return F.avg_pool3d(video[:, :, ::4].float(), (1, 8, 8))


def guide_latent(video: Tensor, channels: int, kind: str = "pool") -> Tensor:
    """The fixed latent the guide regresses the encoder onto: [B, C, 1 + (T-1)/4, H/8, W/8].

    ``pool``: the mean colour of each 8x8 cell, lifted to C channels (PoolCodec): rank 3, so every
    object becomes a blob of its colour, and a VAE guided by it was seen to keep drawing blobs (a
    triangle's fill ratio 0.76, a square's 0.84) long after the guide was gone.
    ``quadrants``: the mean colour of each 4x4 quarter of a cell (12 values, the object's outline at
    4-pixel resolution), lifted orthonormally to C >= 12 channels.
    (``colour`` has no full target latent: ``vae_loss`` pulls only three channels, see ``pooled_colour``.)
    """
    from .data import PoolCodec

    if kind == "pool":
        return PoolCodec(channels, 0).encode(video)
    if kind != "quadrants":
        raise ConfigError(f"--guide must be one of {', '.join(GUIDES)}, got {kind!r}")
    if channels < 12:
        raise ConfigError(f"--guide quadrants needs at least 12 latent channels, the VAE has {channels}")
    frames = video[:, :, ::4].float()
    b, c, f, h, w = frames.shape
    quarters = F.avg_pool3d(frames, (1, 4, 4))  # [B, 3, F, H/4, W/4]
    cells = (
        quarters.view(b, c, f, h // 8, 2, w // 8, 2)
        .permute(0, 1, 4, 6, 2, 3, 5)
        .reshape(b, 12, f, h // 8, w // 8)
    )
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(channels, 12, generator=gen, dtype=torch.float64))
    lift = (q * (channels / 12) ** 0.5).to(cells)
    return torch.einsum("kc,bcfhw->bkfhw", lift, cells)


def guide_weight(step: int, cfg: VAETrainConfig) -> float:
    """1 for the first ``guide_steps``, then linearly to 0 over as many steps; always 0 for a decoder
    fine-tune (the guide shapes the encoder, which is frozen there, and its reconstruction term would
    teach the decoder to draw from the guide's blob latent).

    Why: trained from scratch at these widths the encoder passes position and brightness but not colour
    (after 1200 steps every object decoded grey), while a decoder given a colour-carrying latent learns
    colour within ~200 steps. The guide puts colour into the latent from the start and is then released.
    """
    if cfg.guide_steps <= 0 or cfg.decoder_only:
        return 0.0
    return float(min(1.0, max(0.0, 2.0 - step / cfg.guide_steps)))


@torch.no_grad()
def latent_statistics(vae: WanVAE, cfg: VAETrainConfig, batch: int = 8) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means of ``stats_samples`` full-length clips."""
    data = ShapesDataset(cfg.num_frames, cfg.height, seed=cfg.seed + 7919)  # clips unseen in training
    dev = next(vae.parameters()).device
    total = torch.zeros(vae.z_dim, dtype=torch.float64)
    total_sq = torch.zeros(vae.z_dim, dtype=torch.float64)
    count = 0
    for start in range(0, cfg.stats_samples, batch):
        n = min(batch, cfg.stats_samples - start)
        video = torch.stack([data.sample(start + k)[0] for k in range(n)]).to(dev)
        mu = posterior(vae, video)[0].double().transpose(0, 1).reshape(vae.z_dim, -1).cpu()
        total += mu.sum(1)
        total_sq += mu.square().sum(1)
        count += mu.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def _tile_index(old: int, new: int, groups: int, what: str) -> Tensor:
    """Channel j of a tensor widened from ``old`` to ``new`` channels holds old channel j mod C (C the old
    width), within each of ``groups`` equal blocks (time_conv's two frames, to_qkv's q, k and v)."""
    c, c_new = old // groups, new // groups
    if old % groups or new % groups or c_new % c:
        raise ConfigError(f"cannot widen {what} from {old} to {new} channels: each new width must be a whole "
                          "multiple of the old one (--arch.decoder-dim-mult: multiply the init's by 2, 3, ...)")
    return torch.tensor([g * c + j % c for g in range(groups) for j in range(c_new)])


def widen_decoder(sd: dict[str, Tensor], vae: WanVAE, jitter: float = 0.0, seed: int = 0) -> dict[str, Tensor]:
    """``sd`` (a VAE state dict) with its decoder widened to ``vae``'s, drawing the same video: every channel
    of a wider layer is a copy of an old one (``_tile_index``) and every weight reading copies is divided by
    their count. Wan's RMS norm scales by the square root of the width, so copies keep its output; the
    attention's queries shrink by the square root of the widening so its logits stay too; a shortcut the
    wider block needs where the old one had none starts as the identity on the copies. The copies are
    exact, so they would get the same gradients forever: ``jitter`` J > 0 adds seeded noise of J times each
    widened weight's std to it, which parts them at a small cost to the start (0: the exact copy)."""
    out = dict(sd)
    gen = torch.Generator().manual_seed(seed)
    for key, ref in vae.state_dict().items():
        if not key.startswith("decoder.") or (key in sd and sd[key].shape == ref.shape):
            continue
        if key not in sd:
            if ".shortcut." not in key:
                raise ConfigError(f"cannot widen the init's decoder: it has no {key}")
            if key.endswith("bias"):
                out[key] = torch.zeros_like(ref)
                continue
            c = sd[key.replace("shortcut.weight", "residual.2.weight")].shape[1]  # the old block's width
            o, i = ref.shape[:2]
            same = (torch.arange(o)[:, None] % c) == (torch.arange(i)[None, :] % c)
            out[key] = (same.to(ref.dtype) / (i // c)).view(ref.shape)
            continue
        old = sd[key]
        if old.ndim != ref.ndim:
            raise ConfigError(f"cannot widen {key}: shaped {list(old.shape)} in the init, {list(ref.shape)} here")
        groups = 2 if ".time_conv." in key else 3 if ".to_qkv." in key else 1
        w = old[_tile_index(old.shape[0], ref.shape[0], groups, key)]
        if old.ndim >= 2 and key.endswith("weight") and old.shape[1] != ref.shape[1]:
            w = w[:, _tile_index(old.shape[1], ref.shape[1], 1, key)] / (ref.shape[1] // old.shape[1])
        if ".to_qkv." in key:  # q . k sums over r times the channels and is scaled by 1/sqrt(r) more
            w = w.clone()
            w[: ref.shape[0] // 3] /= (ref.shape[0] / old.shape[0]) ** 0.5
        if jitter > 0 and w.ndim >= 2:
            w = w + jitter * w.float().std() * torch.randn(w.shape, generator=gen).to(w)
        out[key] = w.contiguous()
    for key in sd:
        if key.startswith("decoder.") and key not in vae.state_dict():
            raise ConfigError(f"cannot widen the init's decoder to this one: it has no {key} (a shortcut the "
                              "init needs where the wider block has none; widen every stage by the same factor)")
    return out


WIDEN_JITTER = 0.02  # a widened decoder's copies start this far apart (``widen_decoder``)


def load_init(vae: WanVAE, path: Path, widen: bool = False, seed: int = 0) -> tuple[list[float], list[float]] | None:
    """Load VAE weights saved by a vae run (strictly: same architecture; with ``widen``, a decoder narrower
    than ``vae``'s is widened to it first, its copies parted by ``WIDEN_JITTER``, see ``widen_decoder``);
    returns their latent statistics (None when the file has none)."""
    if not path.is_file():
        raise ConfigError(f"VAE init {path} not found: train the vae stage first or pass --init PATH")
    try:
        sd = load_file(str(path))
        vae.load_state_dict(widen_decoder(sd, vae, WIDEN_JITTER, seed) if widen else sd)
    except RuntimeError as e:
        raise ConfigError(
            f"{path} does not fit this VAE architecture ({e.args[0].splitlines()[0]})"
        ) from None
    stats = latent_stats_of(path)
    return None if stats is None else (list(stats[0]), list(stats[1]))


def store_statistics(path: Path, mean: list[float], std: list[float]) -> None:
    """Rewrite a VAE safetensors with the latent statistics added to its metadata (atomic)."""
    meta = dict(file_metadata(path))
    meta.pop("format", None)
    meta[LATENTS_META] = latent_stats_json(mean, std)
    save_weights(load_file(str(path)), path, meta)


CLIP_STEPS_META = "causvid_vae_clip_steps"  # clip steps behind a VAE file, its --init chain included


def frame_steps(cfg: dict[str, Any]) -> int:
    """How many first steps of a vae run (its config as a dict) train on single frames: --decoder-frame-steps
    in a decoder fine-tune, --image-steps otherwise."""
    return int(cfg.get("decoder_frame_steps", 0) if cfg.get("decoder_only") else cfg.get("image_steps", 0))


def _clip_steps(cfg: dict[str, Any], step: int, depth: int = 0) -> int | None:
    """Clip steps behind a run's weights at ``step`` (its config as saved), its init's included; None when
    the init's history cannot be read."""
    own = max(0, step - frame_steps(cfg))
    init = cfg.get("init")
    if not init:
        return own
    prior = clip_steps_of(Path(init), depth + 1)
    return None if prior is None else prior + own


def clip_steps_of(path: Path, depth: int = 0) -> int | None:
    """How many clip steps trained the VAE in ``path``: its stored count, or (files from before the count
    was stored) what its saved config and its init's tell; None when unknown (not our file, or an init
    that is gone)."""
    if depth > 32 or not path.is_file():
        return None
    meta = file_metadata(path)
    if CLIP_STEPS_META in meta:
        return int(meta[CLIP_STEPS_META])
    if "causvid_training" not in meta or "causvid_step" not in meta:
        return None
    return _clip_steps(json.loads(meta["causvid_training"]), int(meta["causvid_step"]), depth)


def vae_metadata(vae: WanVAE, stage: str, step: int, training_json: str) -> dict[str, Any]:
    from dataclasses import asdict

    if isinstance(vae, PatchDiscriminator):  # --adv-weight's discriminator: no VAE config, no latents
        return {"causvid_discriminator": {"channels": vae.channels}, "causvid_stage": stage,
                "causvid_step": step, "causvid_training": training_json}  # fmt: skip
    arch = {k: v for k, v in asdict(vae.config).items() if k not in ("latents_mean", "latents_std")}
    meta = {"causvid_vae_config": arch, "causvid_stage": stage, "causvid_step": step,
            "causvid_training": training_json}  # fmt: skip
    clip_steps = _clip_steps(json.loads(training_json), step)
    if clip_steps is not None:
        meta[CLIP_STEPS_META] = clip_steps
    frozen = getattr(vae, FROZEN_STATS_ATTR, None)
    if frozen is not None:  # a decoder fine-tune: every checkpoint's latents are the init's, so are their stats
        meta[LATENTS_META] = latent_stats_json(*frozen)
    return meta


def run_vae(cfg: VAETrainConfig, ctx: dist.DistContext) -> dict[str, Any]:
    from .distill import _say, checked, poison, randn, step_generator, train_loop

    dev = ctx.device
    torch.manual_seed(cfg.seed)
    raw = WanVAE(cfg.arch).to(dev).train()
    init_posterior(raw)
    init_stats = None
    frames_only_init = False  # an --init that never saw a clip: its temporal layers are at their random init
    if cfg.student is not None and not cfg.decoder_only:
        raise ConfigError(f"--student {cfg.student}: a decoder fine-tune learns a student's latents; add "
                          "--decoder-only true")  # fmt: skip
    if cfg.student is not None and (cfg.student_clips < 1 or cfg.student_batch < 1):
        raise ConfigError(f"--student-clips {cfg.student_clips} / --student-batch {cfg.student_batch}: "
                          "use at least 1 of each with --student")  # fmt: skip
    if cfg.student_frames < 0 or (cfg.student_frames > 0 and (
            (cfg.student_frames - 1) % 4 or cfg.student_frames > cfg.num_frames or cfg.student is None)):
        raise ConfigError(f"--student-frames {cfg.student_frames}: the window of each --student clip drawn per step, "
                          f"1 + 4k frames up to the clip's --num-frames {cfg.num_frames} (e.g. 17; 0: the whole "
                          "clip), with --student")  # fmt: skip
    if cfg.student_workers < 0:
        raise ConfigError(f"--student-workers {cfg.student_workers}: processes that make --student's clips; give "
                          "1 or more, or 0 for one per core")  # fmt: skip
    if cfg.student_smooth < 0:
        raise ConfigError(f"--student-smooth {cfg.student_smooth}: frames the deviation of each --student clip's path "
                          "from a straight one is averaged over; give 1 or more, or 0 for the straight path")  # fmt: skip
    if cfg.student_shift < 0 or (cfg.student_shift > 0 and cfg.student is None):
        raise ConfigError(f"--student-shift {cfg.student_shift}: offsets for --student's latents in latent stds; "
                          "use a value >= 0 with --student")  # fmt: skip
    student_sizes = shift_sizes(cfg.student_shift_channels, cfg.student_shift, cfg.arch.z_dim, "--student-shift-channels")
    if cfg.student_shift_channels and cfg.student is None:
        raise ConfigError(f"--student-shift-channels {cfg.student_shift_channels!r}: offsets for --student's latents; "
                          "use it with --student")  # fmt: skip
    if cfg.decoder_only or cfg.init:
        init_path = Path(cfg.init) if cfg.init else _default_init(cfg)
        # a decoder fine-tune may widen the init's decoder (--arch.decoder-dim-mult): the latents stay the same
        init_stats = load_init(raw, init_path, widen=cfg.decoder_only, seed=cfg.seed)
        frames_only_init = clip_steps_of(init_path) == 0
        _say(ctx, f"VAE weights from {init_path}" + (" (trained on frames only)" if frames_only_init else ""))
    if cfg.decoder_only:  # the encoder (and so every latent and its statistics) stays as it is
        for p in (*raw.encoder.parameters(), *raw.conv1.parameters()):
            p.requires_grad_(False)
        if init_stats is None:
            raise ConfigError(
                f"{init_path} has no latent statistics: fine-tune the decoder of a finished vae run"
            )
        setattr(raw, FROZEN_STATS_ATTR, init_stats)
    if cfg.latent_shift_channels and not cfg.decoder_only:
        raise ConfigError(f"--latent-shift-channels {cfg.latent_shift_channels!r}: per-clip offsets are for a decoder "
                          "fine-tune; use it with --decoder-only true")  # fmt: skip
    for flag, value, what in (("--latent-noise", cfg.latent_noise, "noise"),
                              ("--latent-shift", cfg.latent_shift, "per-clip offset")):  # fmt: skip
        if value < 0 or (value > 0 and not cfg.decoder_only):
            raise ConfigError(f"{flag} {value}: a decoder fine-tune's {what} in units of its init's latent stds; "
                              "use a value >= 0 with --decoder-only true")  # fmt: skip
    # the init's per-channel latent std [1, C, 1, 1, 1]: the unit of --latent-noise and --latent-shift
    init_std = None if init_stats is None else torch.tensor(init_stats[1], device=dev).view(1, -1, 1, 1, 1)
    init_mean = None if init_stats is None else torch.tensor(init_stats[0], device=dev).view(1, -1, 1, 1, 1)
    noise_std = None  # --latent-noise in raw latent units
    if cfg.latent_noise > 0:
        noise_std = cfg.latent_noise * init_std
        noise_std[:, channel_list(cfg.clean_channels, cfg.arch.z_dim, "--clean-channels")] = 0.0
    elif cfg.clean_channels:
        raise ConfigError(f"--clean-channels {cfg.clean_channels} names channels kept free of --latent-noise: "
                          "give --latent-noise too")  # fmt: skip
    shift_std = offset_std(shift_sizes(cfg.latent_shift_channels, cfg.latent_shift, cfg.arch.z_dim), init_std)
    student_shift_std = offset_std(student_sizes, init_std)  # the same for --student's clips
    if not 0 <= cfg.code_swap <= 1 or (cfg.code_swap > 0 and not cfg.decoder_only):
        raise ConfigError(f"--code-swap {cfg.code_swap}: the share of a decoder fine-tune's clips decoded with "
                          "another shape's code; use a value in 0..1 with --decoder-only true")  # fmt: skip
    if cfg.code_swap > 0 and cfg.arch.z_dim < SHAPE_CHANNELS.stop:
        raise ConfigError(f"--code-swap swaps the shape code in latent channels 3-5: --arch.z-dim {cfg.arch.z_dim} "
                          "has no such channels")  # fmt: skip
    # a decoder fine-tune learns on clips from its first step, or from --decoder-frame-steps (the temporal layers
    # are what it is for, and stay as the init left them: never inflated), and never uses the guide (guide_weight)
    if cfg.decoder_frame_steps and not cfg.decoder_only:
        raise ConfigError(f"--decoder-frame-steps {cfg.decoder_frame_steps} trains a decoder fine-tune on frames "
                          "first: add --decoder-only true, or use --image-steps to train a whole VAE on frames first")  # fmt: skip
    if not 0 <= cfg.decoder_frame_steps <= cfg.steps:
        raise ConfigError(f"--decoder-frame-steps {cfg.decoder_frame_steps}: use a count of steps in 0..--steps "
                          f"({cfg.steps})")  # fmt: skip
    image_steps = frame_steps(vars(cfg))
    if cfg.decoder_only and (cfg.image_steps or cfg.guide_steps):
        _say(ctx, f"decoder fine-tune: clips from step {image_steps}, no guide (--image-steps and --guide-steps "
                  "apply to training the whole VAE; --decoder-frame-steps trains a decoder on frames first)")  # fmt: skip
    codes = (("--shape-weight", cfg.shape_weight, "3-5"), ("--motion-weight", cfg.motion_weight, "6-7"),
             ("--colour-code-weight", cfg.colour_code_weight, "8-10"))
    for flag, weight, chans in codes:
        if weight > 0 and cfg.guide_steps > 0 and cfg.guide != "colour" and not cfg.decoder_only:
            raise ConfigError(f"{flag} codes latent channels {chans}, which --guide {cfg.guide} pulls onto its "
                              "own target for --guide-steps: use --guide colour (channels 0-2) or --guide-steps 0")  # fmt: skip
    for flag, weight, chans, needs in (("--motion-weight", cfg.motion_weight, "6-7", 8),
                                       ("--colour-code-weight", cfg.colour_code_weight, "8-10", 11)):
        if weight > 0 and cfg.arch.z_dim < needs:
            raise ConfigError(f"{flag} codes latent channels {chans}: --arch.z-dim {cfg.arch.z_dim} has no "
                              f"room for them (use {needs} or more)")  # fmt: skip
    if cfg.temporal_only:
        if cfg.decoder_only or cfg.image_steps:
            raise ConfigError("--temporal-only trains the clip phase of a VAE trained on frames (--init, "
                              "--image-steps 0); it does not combine with --decoder-only")  # fmt: skip
        if not cfg.init:
            raise ConfigError("--temporal-only needs --init: the VAE whose image network it keeps")
        _say(ctx, f"temporal layers only: {train_temporal_only(raw) / 1e6:.3f}M weights train")
    student = None  # (latents, targets) of --student's own clips
    if cfg.student is not None:
        student = _student_data(cfg, ctx, init_path)
        _say(ctx, f"{len(student[0])} clips of {cfg.student}'s own latents, {cfg.student_batch} per step")
    n = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    _say(
        ctx,
        f"VAE {n / 1e6:.2f}M trained params, {n * 16 / 2**30:.3f} GiB with grads and AdamW (activations aside)",
    )
    model = dist.wrap(raw, ctx)
    trained = [p for p in model.parameters() if p.requires_grad]
    # no weight decay with --temporal-only (it would shrink the masked current-frame taps as well), nor with
    # --decoder-frame-steps (it would shrink the temporal layers, which frames never train)
    decay = 0.0 if cfg.temporal_only or cfg.decoder_frame_steps else cfg.weight_decay
    opt = torch.optim.AdamW(trained, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=decay)
    t = Trainable("step", model, opt, raw)
    trainables = [t]
    disc_raw = None
    if cfg.adv_weight < 0:
        raise ConfigError(f"--adv-weight {cfg.adv_weight}: use a weight >= 0 (0: no discriminator)")
    if cfg.adv_weight > 0:  # the discriminator trains beside the VAE, on the same lr schedule
        disc_raw = PatchDiscriminator(cfg.disc_channels).to(dev).train()
        disc_lr = cfg.lr if cfg.disc_lr is None else cfg.disc_lr
        disc_opt = torch.optim.AdamW(disc_raw.parameters(), lr=disc_lr, betas=(0.5, 0.9), weight_decay=0.0)
        trainables.append(Trainable("disc", dist.wrap(disc_raw, ctx), disc_opt, disc_raw))
        _say(ctx, f"adversarial term {cfg.adv_weight}: patch discriminator of "
                  f"{sum(p.numel() for p in disc_raw.parameters()) / 1e6:.3f}M weights")  # fmt: skip
    clips = ShapesDataset(cfg.clip_frames, cfg.height, seed=cfg.seed)
    images = ShapesDataset(1, cfg.height, seed=cfg.seed + 1)  # first frames of fresh videos

    guard: dict[str, Any] = {"losses": []}  # recent losses and the state before the last update

    def step_fn(step: int) -> dict[str, float]:
        gen = step_generator(cfg.seed, step, ctx.rank)
        data, batch = (images, cfg.image_batch) if step < image_steps else (clips, cfg.batch_size)
        first = (step * ctx.world_size + ctx.rank) * batch
        if cfg.data_size:  # cycle over a fixed set (small reproducible runs)
            first %= cfg.data_size
        items = [data.sample(first + k) for k in range(batch)]
        outline = None
        if cfg.code_swap > 0:  # some clips become their twin of another shape, decoded from the original's outline
            pick = np.random.default_rng([cfg.seed, step, ctx.rank, 7])
            outline = torch.stack([v for v, _ in items]).to(dev)
            for k, (_, prompt) in enumerate(items):
                if pick.random() < cfg.code_swap:
                    others = [s for s in SHAPE_NAMES if s != parse_prompt(prompt).shape]
                    items[k] = data.sample_as(first + k, others[int(pick.integers(len(others)))])
        video = torch.stack([v for v, _ in items]).to(dev)
        # each clip's shape, direction and colour, read from its prompt only for the latent codes
        coded = cfg.shape_weight > 0 or cfg.motion_weight > 0 or cfg.colour_code_weight > 0
        parsed = [parse_prompt(p) for _, p in items] if coded else []
        shapes = directions = colours = None
        if cfg.shape_weight > 0:
            shapes = torch.tensor([SHAPE_NAMES.index(q.shape) for q in parsed], device=dev)
        if cfg.motion_weight > 0:
            directions = torch.tensor([DIRECTION_VECTORS[q.direction] for q in parsed], device=dev,
                                      dtype=torch.float32)  # fmt: skip
        if cfg.colour_code_weight > 0:  # the palette colour in the video's -1..1 range
            colours = torch.tensor([q.colour_rgb for q in parsed], device=dev, dtype=torch.float32) / 127.5 - 1
        # never in a decoder fine-tune; at step 0 when the --init was trained on frames only (--temporal-only
        # requires that; a clip run chained onto frame runs otherwise starts from random temporal layers)
        if cfg.inflate and not cfg.decoder_only and step == image_steps and (
                image_steps > 0 or cfg.temporal_only or frames_only_init):
            inflate_temporal(raw)
            _say(ctx, f"step {step}: clips from here on; temporal layers set to act as the image network")
        lat = (batch, cfg.arch.z_dim, 1 + (video.shape[2] - 1) // 4, cfg.height // 8, cfg.width // 8)
        eps = randn(lat, gen, dev)
        extra = None if noise_std is None else noise_std * randn(lat, gen, dev)
        if shift_std is not None:  # one offset per clip and channel
            shift = shift_std * randn((batch, cfg.arch.z_dim, 1, 1, 1), gen, dev)
            extra = shift if extra is None else extra + shift
        with dist.autocast(ctx, cfg.amp):
            loss, parts, recon = vae_loss_and_recon(model.module if hasattr(model, "module") else model,
                                                    video, eps, cfg, guide_weight(step, cfg), shapes, extra,
                                                    directions, colours, disc_raw, outline)  # fmt: skip
        if student is not None:  # and the student's own latents, each drawn as the video it meant
            pick = torch.from_numpy(np.random.default_rng([cfg.seed, step, ctx.rank, 11]).integers(
                len(student[0]), size=cfg.student_batch))  # fmt: skip
            z = student[0][pick].to(dev) * init_std + init_mean  # the init's raw latents
            target = student[1][pick].to(dev)
            if student_shift_std is not None:  # one offset per clip and channel, as --latent-shift gives the encoder's
                z = z + student_shift_std * randn((len(pick), cfg.arch.z_dim, 1, 1, 1), gen, dev)
            with dist.autocast(ctx, cfg.amp):
                start, count = 0, z.shape[2]  # the whole clip, or (--student-frames) a window anywhere in it
                if cfg.student_frames:
                    count = 1 + (cfg.student_frames - 1) // 4
                    start = int(np.random.default_rng([cfg.seed, step, ctx.rank, 13]).integers(
                        z.shape[2] - count + 1))  # fmt: skip
                drawn, target = stream_window(raw, z, target, start, count)
                student_loss, student_parts = picture_loss(drawn, target, cfg)
            loss = loss + student_loss
            parts |= {"student": float(student_loss.detach()), "student_mask": student_parts.get("mask", 0.0)}
        loss = poison(loss, step, cfg)
        value = checked("loss", loss, step, cfg, ctx)
        if step == image_steps or guard.get("in_a_row", 0) >= 5:  # a new phase, or a real level shift
            guard["losses"], guard["in_a_row"] = [], 0
        recent = guard["losses"][-20:]
        if len(recent) == 20 and value > cfg.rollback_factor * float(np.median(recent)):
            guard["in_a_row"] = guard.get("in_a_row", 0) + 1
            # The last update crossed a cliff: at these widths (16 channels at full resolution, each pixel
            # RMS-normalised) a 0.4% weight change was seen to drop PSNR from 20 to 4 dB. Undo it, skip.
            raw.load_state_dict(guard["weights"])
            t.opt.load_state_dict(guard["optim"])
            return {"loss": value, **parts, "grad_norm": 0.0, "skipped": 0.0, "rolled_back": 1.0}
        guard["losses"].append(value)
        guard["in_a_row"] = 0
        guard["weights"] = {k: v.detach().clone() for k, v in raw.state_dict().items()}
        guard["optim"] = copy.deepcopy(t.opt.state_dict())
        t.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = float(dist.clip_grad(t.model, cfg.grad_clip))
        # A gradient spike would undo the progress: skip it (large norms are normal during warm-up). But
        # five large norms in a row are the new level, not a spike (skipping on would freeze the weights
        # for good): take that step, clipped as always. A non-finite norm is always skipped.
        spike = step >= cfg.lr_warmup and not norm < cfg.skip_grad_norm
        skipped = not math.isfinite(norm) or (spike and guard.get("skips", 0) < SKIPS_IN_A_ROW)
        guard["skips"] = guard.get("skips", 0) + 1 if skipped else 0
        if not skipped:
            t.opt.step()
        if disc_raw is not None:  # then the discriminator's step, on this batch's frames and reconstructions
            d = trainables[1]
            with dist.autocast(ctx, cfg.amp):
                d_loss = discriminator_hinge(d.model, video, recon)
            parts["adv_d"] = checked("disc_loss", d_loss, step, cfg, ctx)
            d.opt.zero_grad(set_to_none=True)
            d_loss.backward()
            dist.clip_grad(d.model, cfg.grad_clip)
            d.opt.step()
        return {"loss": value, **parts, "grad_norm": norm, "skipped": float(skipped), "rolled_back": 0.0}

    def sample_fn(step: int, folder: Path) -> None:
        _reconstruction_video(raw, cfg, folder / "samples" / f"step_{step:06d}.mp4")

    result = train_loop(cfg, ctx, trainables, step_fn, sample_fn)
    if result["final"] and ctx.is_main:
        raw.eval()
        mean, std = init_stats if cfg.decoder_only else latent_statistics(raw, cfg)
        for path in result["final"][:1]:  # the VAE's (final_disc.safetensors is the discriminator's)
            store_statistics(Path(path), mean, std)
        _say(ctx, f"latent statistics over {cfg.stats_samples} clips: std {min(std):.3f}..{max(std):.3f}; "
                  f"stored in {result['final'][0]}")  # fmt: skip
        result["latents"] = {"mean": mean, "std": std}
    return result


def _default_init(cfg: VAETrainConfig) -> Path:
    """A decoder fine-tune's init without --init: this run's vae/final; for --student, the run's vae-decoder/final
    (the decoder the student's figures were measured through) when it exists."""
    if cfg.student is not None:
        general = stage_dir(dataclasses.replace(cfg, out_dir=None, student=None), "vae-decoder") / "final.safetensors"
        if general.is_file():
            return general
    return run_vae_path(cfg)


def _student_data(cfg: VAETrainConfig, ctx: dist.DistContext, init: Path) -> tuple[Tensor, Tensor]:
    """--student's clips (training/student_clips.py), made once by the main rank into the stage's folder."""
    from causvid_core.bundle import part_file

    from .data import checkpoint_text_encoder
    from .distill import _say
    from .student_clips import default_workers, student_clips

    name = str(cfg.student)
    path = part_file(name, "dit")
    if not path.is_file():
        raise ConfigError(f"--student {name} not found: give a student's checkpoint (e.g. this run's "
                          "ode-init-causal-teacher/final.safetensors) or embedded:NAME")  # fmt: skip
    folder = stage_dir(cfg, stage_name(cfg)) / "student-clips"

    def make() -> tuple[Tensor, Tensor]:
        return student_clips(folder, path, init, cfg.student_clips, cfg.num_frames, cfg.height, cfg.seed,
                             text=checkpoint_text_encoder(name), say=lambda m: _say(ctx, m),
                             workers=cfg.student_workers or default_workers(), smooth=cfg.student_smooth)  # fmt: skip

    if ctx.is_main:
        data = make()
    dist.barrier(ctx)
    return data if ctx.is_main else make()  # the other ranks read the main rank's shards


@torch.no_grad()
def _reconstruction_video(vae: WanVAE, cfg: VAETrainConfig, path: Path) -> None:
    """Source | reconstruction side by side for one full-length clip."""
    from .logging_utils import write_strip, write_video

    was = vae.training
    vae.eval()
    video = ShapesDataset(cfg.num_frames, cfg.height, seed=cfg.seed + 7919).sample(0)[0][None]
    dev = next(vae.parameters()).device
    recon = reconstruct(vae, posterior(vae, video.to(dev))[0]).cpu()
    vae.train(was)
    frames = to_uint8_frames(torch.cat([video, recon], dim=4)).numpy()  # source | reconstruction, side by side
    write_video(frames, path, fps=16)
    write_strip(frames, path.with_suffix(".png"), scale=1)  # 8 frames, each source | reconstruction
