"""Wan2.1 VAE with Wan's parameter names: causal 3D convolutions, streaming through an explicit state.

Video [B, 3, T, H, W] in -1..1 <-> latents [B, 16, 1 + (T - 1) / 4, H / 8, W / 8]. Every temporal
operation is causal, so a video can be encoded or decoded chunk by chunk with a ``VAEStreamState``
and give exactly the frames of one full pass. ``encode``/``decode`` work on normalised latents
(z = (mu - mean) / std per channel, Wan's constants), ``encode_raw``/``decode_raw`` on mu itself.
Loading (``load_wan_vae``) reads ``Wan2.1_VAE.pth``, ComfyUI's ``wan_2.1_vae.safetensors`` and
diffusers' ``AutoencoderKLWan`` files.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import PRESETS, VAEConfig
from .vae_stream import StreamDecoder, StreamEncoder, Tiling, VAEStreamState, tiled_apply

__all__ = [
    "VAE_PRESETS", "WanVAE", "VAEStreamState", "Tiling", "StreamDecoder", "StreamEncoder",
    "load_wan_vae", "read_state_dict", "infer_vae_config", "latent_stats_of",
]  # fmt: skip

VAE_PRESETS: dict[str, VAEConfig] = {
    "wan2.1": VAEConfig(),  # the released Wan2.1 VAE (base_dim 96, ~127M parameters)
    "small": VAEConfig(base_dim=32),  # Wan's depth at a third of its width: CPU benchmarks
    "tiny": PRESETS["tiny"].vae,  # tests
    "shapes": PRESETS["shapes"].vae,  # the embedded Shapes model (64x64)
}


CONV_IMPLS = ("auto", "native", "frames")


class CausalConv3d(nn.Conv3d):
    """Conv3d padded only toward the past in time; the past frames come from the stream state.

    ``impl`` chooses how the convolution runs (``WanVAE.set_conv_impl``):
    - ``"native"``: ``nn.Conv3d`` itself, the reference.
    - ``"frames"``: the time taps folded into channels and every output frame as one image of a 2D
      convolution: [B, k*C, T', H, W] -> conv2d on [B*T', k*C, H, W]. The same sum in another order (fp32
      within 1e-6). On a CPU PyTorch sends small 3D inputs (batch 1, N*C*T*H <= 20480, every streamed
      chunk of a small VAE) to its unvectorised ``slow_conv3d``; the 2D path takes oneDNN instead.
    - ``"auto"`` (default): ``"frames"`` on a CPU, ``"native"`` elsewhere (cuDNN's 3D kernels are fast).
    """

    impl = "auto"

    def __init__(self, in_dim: int, out_dim: int, kernel, stride=1, padding=0) -> None:
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_dim, out_dim, kernel, stride=stride, padding=(0, ph, pw))  # zero-pads space only
        self.time_pad = 2 * pt  # = kernel_t - 1 frames of history
        self.cache_key = ""  # the module's name, set by WanVAE

    def _conv(self, x: Tensor) -> Tensor:
        impl = self.impl if self.impl != "auto" else ("frames" if x.device.type == "cpu" else "native")
        if impl == "native":
            return super().forward(x)
        b, c, t, h, w = x.shape
        kt, st = self.kernel_size[0], self.stride[0]
        t_out = (t - kt) // st + 1
        if t_out <= 0:
            return super().forward(x)  # (raises Conv3d's own message for too few frames)
        span = st * (t_out - 1) + 1
        taps = [x[:, :, i : i + span : st] for i in range(kt)]  # each [B, C, T', H, W]
        frames = torch.cat(taps, dim=1) if kt > 1 else taps[0]  # [B, kt*C, T', H, W]
        frames = frames.transpose(1, 2).reshape(b * t_out, kt * c, h, w)
        weight = self.weight.transpose(1, 2).reshape(self.out_channels, kt * c, *self.kernel_size[1:])
        y = F.conv2d(frames, weight, self.bias, self.stride[1:], self.padding[1:], self.dilation[1:], self.groups)
        return y.view(b, t_out, *y.shape[1:]).transpose(1, 2)  # [B, O, T', H', W']

    def forward(self, x: Tensor, state: VAEStreamState) -> Tensor:
        if self.time_pad:  # x [B, C, T, H, W] -> [B, C, pad + T, H, W]
            past = state.caches.get(self.cache_key)
            if past is None:
                past = x.new_zeros((*x.shape[:2], self.time_pad, *x.shape[3:]))
            x = torch.cat([past.to(x), x], dim=2)
            state.caches[self.cache_key] = x[:, :, -self.time_pad :].clone()
        return self._conv(x)


class RMSNorm(nn.Module):
    """x / ||x||_channels * sqrt(C) * gamma (+ bias): Wan's channel-first RMS_norm."""

    def __init__(self, dim: int, images: bool = True, bias: bool = False) -> None:
        super().__init__()
        shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        low = x.dtype in (torch.float16, torch.bfloat16)
        xf = x.float() if low else x
        # F.normalize(x, dim=1), written out: torch's vector_norm over the strided channel axis is ~25x
        # slower on a CPU than this sum of squares (same value within 1e-7)
        y = (xf / xf.square().sum(1, keepdim=True).sqrt().clamp_min(1e-12)).to(x.dtype)
        y = y * (self.scale * self.gamma.to(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Resample(nn.Module):
    """Spatial 2x up/down sampling, with Wan's causal 2x temporal up/down sampling in the 3d modes."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.cache_key = ""
        if mode.startswith("upsample"):
            up = nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact")
            self.resample = nn.Sequential(up, nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode.startswith("downsample"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def forward(self, x: Tensor, state: VAEStreamState) -> Tensor:
        if self.mode == "upsample3d":
            x = self._double_time(x, state)
        b, c, t, h, w = x.shape
        y = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))  # [B*T, C', H', W']
        x = y.view(b, t, *y.shape[1:]).transpose(1, 2)  # [B, C', T, H', W']
        if self.mode == "downsample3d":
            x = self._halve_time(x, state)
        return x

    def _double_time(self, x: Tensor, state: VAEStreamState) -> Tensor:
        """The video's first frame stays single; every later frame becomes two (time_conv's channel halves)."""
        first = None
        if self.cache_key not in state.started:
            state.started.add(self.cache_key)
            first, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2]:
            y = self.time_conv(x, state)  # [B, 2C, T, H, W]
            b, c2, t, h, w = y.shape
            x = y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        return x if first is None else torch.cat([first, x], dim=2)

    def _halve_time(self, x: Tensor, state: VAEStreamState) -> Tensor:
        """Frame 0 passes alone; then stride-2 windows of 3 frames over the whole video (1 + 2k -> 1 + k)."""
        first = None
        if self.cache_key not in state.started:
            state.started.add(self.cache_key)
            first, seq = x[:, :, :1], x
        else:
            seq = torch.cat([state.caches[self.cache_key].to(x), x], dim=2)
        state.caches[self.cache_key] = x[:, :, -1:].clone()
        y = self.time_conv(seq, state) if seq.shape[2] >= 3 else seq[:, :, :0]
        return y if first is None else torch.cat([first, y], dim=2)


class ResidualBlock(nn.Module):
    """x + residual(x): (norm, SiLU, causal conv) twice; a 1x1x1 shortcut when the width changes."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False), nn.SiLU(), nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )  # fmt: skip
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, state: VAEStreamState) -> Tensor:
        skip = self.shortcut(x, state) if isinstance(self.shortcut, CausalConv3d) else x
        return _run(self.residual, x, state) + skip


class AttentionBlock(nn.Module):
    """Single-head self-attention over each frame's pixels (frames never attend to each other)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))  # [B*T, C, H, W]
        qkv = self.to_qkv(y).view(b * t, 3, c, h * w).transpose(-1, -2)  # [B*T, 3, HW, C]
        q, k, v = (qkv[:, i : i + 1] for i in range(3))  # [B*T, 1, HW, C]
        y = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b * t, c, h, w)
        y = self.proj(y).view(b, t, c, h, w).transpose(1, 2)  # [B, C, T, H, W]
        return x + y


def _run(layers: nn.Sequential, x: Tensor, state: VAEStreamState) -> Tensor:
    """Apply a Sequential, handing the stream state to the layers that keep one."""
    for layer in layers:
        x = layer(x, state) if isinstance(layer, (CausalConv3d, ResidualBlock, Resample)) else layer(x)
    return x


class Encoder3d(nn.Module):
    """Video -> 2 * z_dim channels (mu, log_var) at 1/8 size and 1 + (T - 1) / 4 frames."""

    def __init__(self, cfg: VAEConfig, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(d_in, d_out, dropout))
                d_in = d_out
            if i < len(cfg.dim_mult) - 1:
                blocks.append(
                    Resample(d_out, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d")
                )
        self.downsamples = nn.Sequential(*blocks)
        d = dims[-1]
        self.middle = nn.Sequential(
            ResidualBlock(d, d, dropout), AttentionBlock(d), ResidualBlock(d, d, dropout)
        )
        self.head = nn.Sequential(RMSNorm(d, images=False), nn.SiLU(), CausalConv3d(d, out_dim, 3, padding=1))

    def forward(self, x: Tensor, state: VAEStreamState) -> Tensor:
        x = self.conv1(x, state)  # [B, dim, T, H, W]
        x = _run(self.downsamples, x, state)  # [B, dim * mult[-1], T', H / 8, W / 8]
        return _run(self.head, _run(self.middle, x, state), state)


class Decoder3d(nn.Module):
    """z_dim channels -> video: 8x up in space, 4x in time (the first latent frame gives one frame)."""

    def __init__(self, cfg: VAEConfig, dropout: float = 0.0) -> None:
        super().__init__()
        mult = cfg.decoder_dim_mult or cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0], dropout), AttentionBlock(dims[0]),
            ResidualBlock(dims[0], dims[0], dropout),
        )  # fmt: skip
        blocks: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            d_in = d_in // 2 if i > 0 else d_in  # each upsample's conv halves the width
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(d_in, d_out, dropout))
                d_in = d_out
            if i < len(mult) - 1:
                blocks.append(Resample(d_out, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            RMSNorm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1)
        )

    def forward(self, x: Tensor, state: VAEStreamState) -> Tensor:
        x = _run(self.middle, self.conv1(x, state), state)  # [B, dim * mult[-1], f, h, w]
        x = _run(self.upsamples, x, state)  # [B, dim, T, 8h, 8w]
        return _run(self.head, x, state)  # [B, 3, T, 8h, 8w]


class WanVAE(nn.Module):
    """The Wan2.1 video VAE; streaming state is passed in, never kept on the module."""

    def __init__(self, config: VAEConfig | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        cfg = config or VAEConfig()
        if not len(cfg.latents_mean) == len(cfg.latents_std) == cfg.z_dim:
            raise ValueError(
                f"latents_mean/latents_std have {len(cfg.latents_mean)}/{len(cfg.latents_std)} entries but "
                f"z_dim is {cfg.z_dim}: give one mean and std per latent channel"
            )
        if len(cfg.temporal_downsample) != len(cfg.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs {len(cfg.dim_mult) - 1} entries (one per downsample)"
            )
        if cfg.decoder_dim_mult is not None and len(cfg.decoder_dim_mult) != len(cfg.dim_mult):
            raise ValueError(
                f"decoder_dim_mult {cfg.decoder_dim_mult} needs {len(cfg.dim_mult)} entries, one per stage as "
                f"dim_mult {cfg.dim_mult}"
            )
        self.config = cfg
        self.encoder = Encoder3d(cfg, cfg.z_dim * 2, dropout)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg, dropout)
        for name, module in self.named_modules():
            if isinstance(module, (CausalConv3d, Resample)):
                module.cache_key = name

    def set_conv_impl(self, impl: str) -> None:
        """How the causal 3D convolutions run: "auto" (default), "native" (the reference) or "frames"
        (2D convolutions over frames, many times faster on a CPU); see ``CausalConv3d``."""
        if impl not in CONV_IMPLS:
            raise ValueError(f"conv impl must be one of {', '.join(CONV_IMPLS)}, got {impl!r}")
        for module in self.modules():
            if isinstance(module, CausalConv3d):
                module.impl = impl

    @property
    def z_dim(self) -> int:
        return self.config.z_dim

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32, device=like.device).view(shape)
        std = torch.tensor(self.config.latents_std, dtype=torch.float32, device=like.device).view(shape)
        return mean, std

    def normalize(self, mu: Tensor) -> Tensor:
        """z = (mu - mean) / std per channel (Wan's latent normalisation)."""
        mean, std = self._stats(self._check_latent(mu))
        return ((mu.float() - mean) / std).to(mu.dtype)

    def denormalize(self, z: Tensor) -> Tensor:
        """mu = z * std + mean per channel."""
        mean, std = self._stats(self._check_latent(z))
        return (z.float() * std + mean).to(z.dtype)

    def encode(self, video: Tensor, state: VAEStreamState | None = None, **kw) -> Tensor:
        """[B, 3, T, H, W] in -1..1 -> normalised latents [B, z_dim, T', H/8, W/8] (see ``encode_raw``)."""
        return self.normalize(self.encode_raw(video, state, **kw))

    def decode(self, z: Tensor, state: VAEStreamState | None = None, **kw) -> Tensor:
        """Normalised latents [B, z_dim, f, h, w] -> video [B, 3, T, 8h, 8w] in -1..1 (see ``decode_raw``)."""
        return self.decode_raw(self.denormalize(z), state, **kw)

    def encode_raw(
        self,
        video: Tensor,
        state: VAEStreamState | None = None,
        *,
        tiling: Tiling | None = None,
        frames_per_pass: int | None = None,
    ) -> Tensor:
        """Video -> mu (the posterior mean, unnormalised); T frames -> T / 4 latent frames (1 + (T-1)/4 first).

        Without ``state`` the video is one whole stream. With one, chunks continue the stream: the first
        needs 1 + 4k frames, later ones multiples of 4. ``frames_per_pass`` (in latent frames) bounds
        memory by encoding in smaller passes; the result is the same.
        """
        state = state if state is not None else VAEStreamState("encode")
        self._check_video(video, state)
        x = video.to(self._dtype())
        if tiling is not None:
            mu = tiled_apply(lambda t, s: self._encode_passes(t, s, frames_per_pass), x, state, tiling, 8, 1)
        else:
            mu = self._encode_passes(x, state, frames_per_pass)
        state.frames_in += video.shape[2]
        state.frames_out += mu.shape[2]
        return mu

    def decode_raw(
        self,
        mu: Tensor,
        state: VAEStreamState | None = None,
        *,
        tiling: Tiling | None = None,
        frames_per_pass: int | None = None,
        clamp: bool = True,
    ) -> Tensor:
        """mu -> video clamped to -1..1; f latent frames -> 4f frames (1 + 4(f-1) for the stream's first chunk).

        Without ``state`` the latent is one whole stream; with one, chunks continue it and the frames
        equal those of one full decode. ``frames_per_pass`` bounds memory (same result).
        """
        state = state if state is not None else VAEStreamState("decode")
        self._check_latent(mu)
        if state.mode != "decode":
            raise ValueError("this state belongs to an encode stream: make one with VAEStreamState('decode')")
        state.check_size(tuple(mu.shape[-2:]))
        x = mu.to(self._dtype())
        if tiling is not None:
            out = tiled_apply(lambda t, s: self._decode_passes(t, s, frames_per_pass), x, state, tiling, 1, 8)
        else:
            out = self._decode_passes(x, state, frames_per_pass)
        state.frames_in += mu.shape[2]
        state.frames_out += out.shape[2]
        return out.clamp(-1.0, 1.0) if clamp else out

    def _encode_passes(self, x: Tensor, state: VAEStreamState, frames_per_pass: int | None) -> Tensor:
        outs, start = [], 0
        while start < x.shape[2]:
            n = x.shape[2] if frames_per_pass is None else 4 * frames_per_pass + (1 if start == 0 else 0)
            h = self.encoder(x[:, :, start : start + n], state)  # [B, 2 z_dim, t, h, w]
            outs.append(self.conv1(h, state)[:, : self.z_dim])
            start += n
        return torch.cat(outs, dim=2)

    def _decode_passes(self, z: Tensor, state: VAEStreamState, frames_per_pass: int | None) -> Tensor:
        step = frames_per_pass or z.shape[2]
        outs = [
            self.decoder(self.conv2(z[:, :, i : i + step], state), state) for i in range(0, z.shape[2], step)
        ]
        return torch.cat(outs, dim=2)

    def stream_decoder(self, tiling: Tiling | None = None) -> StreamDecoder:
        """A decoder object that carries its own state from chunk to chunk (the pipeline's ``decoder``)."""
        return StreamDecoder(self, tiling)

    def stream_encoder(self, tiling: Tiling | None = None) -> StreamEncoder:
        """An encoder object for video-to-video: chunks of 1 + 4k frames first, then multiples of 4."""
        return StreamEncoder(self, tiling)

    def _dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def _check_latent(self, z: Tensor) -> Tensor:
        if z.ndim != 5 or z.shape[1] != self.z_dim:
            raise ValueError(
                f"expected a latent [B, {self.z_dim}, frames, h, w], got shape {list(z.shape)}: a Wan2.1 latent "
                f"has {self.z_dim} channels (a 48-channel latent comes from the Wan2.2 VAE, which this is not)"
            )
        return z

    def _check_video(self, video: Tensor, state: VAEStreamState) -> None:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(
                f"expected video [B, 3, frames, H, W] in -1..1, got shape {list(video.shape)}; "
                "convert ComfyUI IMAGE [F, H, W, 3] with video_io.image_to_vae"
            )
        if state.mode != "encode":
            raise ValueError("this state belongs to a decode stream: make one with VAEStreamState('encode')")
        h, w, t = video.shape[3], video.shape[4], video.shape[2]
        if h % 8 or w % 8:
            raise ValueError(
                f"frame size {h}x{w} is not a multiple of 8: crop or pad to {h - h % 8}x{w - w % 8}"
            )
        if state.frames_in == 0 and (t - 1) % 4:
            lo = t - (t - 1) % 4
            raise ValueError(
                f"the first chunk of a video needs 1 + 4k frames (1, 5, 9, ...), got {t}: use {lo} or {lo + 4}"
            )
        if state.frames_in > 0 and (t == 0 or t % 4):
            raise ValueError(f"chunks after the first need a multiple of 4 frames, got {t}")
        lo_val, hi_val = video.aminmax()
        if lo_val < -1.01 or hi_val > 1.01:
            raise ValueError(
                f"video values must lie in -1..1, got {lo_val.item():.3g}..{hi_val.item():.3g}; "
                "convert 0..1 images with video_io.image_to_vae"
            )
        state.check_size((h, w))


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a .safetensors or a torch pickle (.pth/.pt/.ckpt, read with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VAE file not found: {path}")
    if path.suffix == ".safetensors":
        from .checkpoint import load_safetensors

        return load_safetensors(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path.name} is a pickle that needs to run code to load, which is refused for safety "
            f"(torch.load weights_only=True failed: {str(err).splitlines()[0][:200]}). Use a file holding only "
            "tensors: Wan2.1_VAE.pth from the Wan release, or ComfyUI's wan_2.1_vae.safetensors"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(
            f"cannot read {path.name} as a torch checkpoint ({err}); is the file complete?"
        ) from err
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path.name} does not hold a state dict of tensors")
    return dict(obj)


_STRIP_PREFIXES = ("first_stage_model.", "vae.", "model.")
_DIFFUSERS_RESNET = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                     "conv_shortcut": "shortcut"}  # fmt: skip
_DIFFUSERS_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2", "encoder.conv_in": "encoder.conv1",
                  "decoder.conv_in": "decoder.conv1", "encoder.norm_out": "encoder.head.0",
                  "encoder.conv_out": "encoder.head.2", "decoder.norm_out": "decoder.head.0",
                  "decoder.conv_out": "decoder.head.2"}  # fmt: skip


def _wan_name(key: str, num_res_blocks: int) -> str:
    """One diffusers ``AutoencoderKLWan`` key -> Wan's name."""
    module, _, param = key.rpartition(".")
    if module in _DIFFUSERS_TOP:
        return f"{_DIFFUSERS_TOP[module]}.{param}"
    parts = module.split(".")
    side = parts[0]
    if parts[1] == "mid_block":  # {side}.mid_block.resnets.N / attentions.0
        index = 1 if parts[2] == "attentions" else 2 * int(parts[3])
        rest = parts[4:]
        prefix = f"{side}.middle.{index}"
    elif parts[1] == "down_blocks":  # the encoder's list is flat in both layouts
        prefix, rest = f"{side}.downsamples.{parts[2]}", parts[3:]
    elif parts[1] == "up_blocks":  # up_blocks.i.resnets.j / up_blocks.i.upsamplers.0
        per_stage = num_res_blocks + 2
        j = int(parts[4]) if parts[3] == "resnets" else num_res_blocks + 1
        prefix, rest = f"{side}.upsamples.{int(parts[2]) * per_stage + j}", parts[5:]
    else:
        return key
    if rest and rest[0] in _DIFFUSERS_RESNET:
        rest = [_DIFFUSERS_RESNET[rest[0]], *rest[1:]]
    return ".".join([prefix, *rest, param])


def to_wan_keys(sd: dict[str, Tensor], num_res_blocks: int = 2) -> dict[str, Tensor]:
    """Bring a state dict to Wan's names: strip a wrapper prefix, rename diffusers' ``AutoencoderKLWan`` keys."""
    for prefix in _STRIP_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    if "decoder.conv_in.weight" in sd or "post_quant_conv.weight" in sd:
        sd = {_wan_name(k, num_res_blocks): v for k, v in sd.items()}
    return sd


def latent_stats_of(path: str | Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) per latent channel stored in a safetensors' ``causvid_latents`` metadata (our trained
    VAEs carry them), or None."""
    from .bundle import file_metadata  # lazily: the bundle imports the DiT, which a VAE alone does not need

    meta = file_metadata(Path(path))  # {} for other formats and missing files
    if "causvid_latents" not in meta:
        return None
    data = json.loads(meta["causvid_latents"])
    return tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"])


def _warn_if_unfinished(path: Path) -> None:
    """Warn when ``path`` is a checkpoint of our own vae stage that carries no latent statistics (a
    full run's step_*.safetensors: they are measured at its end): Wan2.1's statistics stand in, and a DiT
    trained on the finished VAE's latents will not fit them. Round trips through the VAE alone are fine."""
    from .bundle import file_metadata

    meta = file_metadata(path)
    if "causvid_vae_config" in meta:
        warnings.warn(
            f"{path} is a checkpoint of a vae run (step {meta.get('causvid_step', '?')}) without latent "
            "statistics; Wan2.1's stand in, so a DiT's latents will be scaled wrongly through it. Use the "
            "run's final.safetensors (or a --decoder-only run's checkpoint, which carries its init's)",
            stacklevel=3,
        )


def infer_vae_config(
    sd: dict[str, Tensor], stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None
) -> VAEConfig:
    """VAEConfig of a Wan-layout state dict: widths, z_dim and blocks per stage read from the shapes;
    ``stats`` (mean, std) replace Wan2.1's latent statistics."""
    try:
        base_dim = sd["encoder.conv1.weight"].shape[0]
        z_dim = sd["conv2.weight"].shape[0]
        top = sd["decoder.conv1.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"not a Wan2.1 VAE state dict: no {err.args[0]!r}") from None
    blocks = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples.")}
    resamples = {
        int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples.") and ".resample." in k
    }
    num_res_blocks = min(resamples) if resamples else len(blocks)
    stages = len(resamples) + 1
    mult = []
    for s in range(stages):
        w = sd[f"encoder.downsamples.{s * (num_res_blocks + 1)}.residual.2.weight"].shape[0]
        mult.append(w // base_dim)
    temporal = tuple(f"encoder.downsamples.{r}.time_conv.weight" in sd for r in sorted(resamples))
    decoder_mult = []  # the decoder's stages run the other way: its first stage is the encoder's last
    for s in range(stages):
        key = f"decoder.upsamples.{s * (num_res_blocks + 2)}.residual.2.weight"
        if key not in sd:
            raise ValueError(f"not a Wan2.1 VAE state dict: no {key!r}")
        decoder_mult.insert(0, sd[key].shape[0] // base_dim)
    if decoder_mult[-1] * base_dim != top:
        raise ValueError("the decoder's widths disagree with each other: not a Wan2.1 VAE state dict")
    cfg = VAEConfig(z_dim=z_dim, base_dim=base_dim, dim_mult=tuple(mult), num_res_blocks=num_res_blocks,
                    temporal_downsample=temporal,
                    decoder_dim_mult=None if decoder_mult == mult else tuple(decoder_mult))  # fmt: skip
    if stats is not None:
        if len(stats[0]) != z_dim or len(stats[1]) != z_dim:
            raise ValueError(f"the file's latent statistics have {len(stats[0])} channels, its weights {z_dim}")
        cfg = dataclasses.replace(cfg, latents_mean=stats[0], latents_std=stats[1])
    if z_dim != len(cfg.latents_mean):
        raise ValueError(f"z_dim {z_dim} has no built-in latent statistics; pass a VAEConfig with them")
    return cfg


def check_state_dict(model: nn.Module, sd: dict[str, Tensor]) -> None:
    """Raise naming every missing, unexpected or wrongly shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: file {list(sd[k].shape)} vs model {list(own[k].shape)}"
              for k in sorted(set(own) & set(sd)) if sd[k].shape != own[k].shape]  # fmt: skip
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:8])}{more}")
    if problems:
        raise ValueError("the state dict does not fit this Wan2.1 VAE; " + "; ".join(problems))


def load_wan_vae(
    source: str | Path | dict[str, Tensor],
    config: VAEConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> WanVAE:
    """Build a WanVAE from a file (Wan .pth, ComfyUI/diffusers .safetensors) or a state dict; every key checked."""
    sd = read_state_dict(source) if isinstance(source, (str, Path)) else dict(source)
    sd = to_wan_keys(sd, (config or VAEConfig()).num_res_blocks)
    stats = latent_stats_of(source) if isinstance(source, (str, Path)) else None
    if stats is None and config is None and isinstance(source, (str, Path)):
        _warn_if_unfinished(Path(source))
    if config is None:
        config = infer_vae_config(sd, stats)
    with torch.device("meta"):
        model = WanVAE(config)
    check_state_dict(model, sd)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, assign=True)
    return model.eval().requires_grad_(False)
