"""Frozen configuration dataclasses and the preset table (Wan2.1 sizes, tiny test sizes).

Everything a model needs to be rebuilt is here, so a config can be saved next to weights
(``asdict``) and restored (``from_dict``) without guessing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

# Wan2.1 VAE per-channel latent statistics (z = (mu - mean) / std); from Wan's VAE wrapper and
# ComfyUI's latent_formats.Wan21.
WAN21_LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

RopeMode = Literal["absolute", "window"]


@dataclass(frozen=True)
class DiTConfig:
    """Wan2.1 diffusion-transformer sizes (names follow Wan's ``WanModel`` arguments)."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    model_type: Literal["t2v", "i2v"] = "t2v"
    image_dim: int = 1280  # CLIP feature size of i2v models (img_emb.proj)
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim {self.head_dim} must be even and at least 6 for 3D RoPE")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim {self.freq_dim} must be even")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        """Tokens one latent frame becomes after patchify."""
        _, ph, pw = self.patch_size
        if latent_height % ph or latent_width % pw:
            raise ValueError(
                f"latent size {latent_height}x{latent_width} is not divisible by the patch "
                f"{ph}x{pw}; use a pixel size that is a multiple of {8 * ph}x{8 * pw}"
            )
        return (latent_height // ph) * (latent_width // pw)


@dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 VAE sizes: causal 3D convolutions, 4x temporal and 8x spatial compression."""

    z_dim: int = 16
    base_dim: int = 96
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    # the decoder's own widths per stage (as dim_mult; None: the encoder's). The latents are the same for any
    # decoder, so a wider one can be fitted to a trained encoder (and every DiT on its latents) alone
    decoder_dim_mult: tuple[int, ...] | None = None
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_stride(self) -> int:
        return 2 ** len(self.temporal_downsample)


@dataclass(frozen=True)
class SamplingConfig:
    """Few-step flow-matching schedule of the causal student (REFERENCE: [1000, 757, 522], shift 8)."""

    denoising_steps: tuple[int, ...] = (1000, 757, 522)
    shift: float = 8.0
    warp: bool = False  # map the list through the shifted 1000-step schedule (Self-Forcing style)
    num_train_timesteps: int = 1000
    exact_sigma: bool = False  # False: nearest grid sigma, as the released weights expect

    def __post_init__(self) -> None:
        steps = list(self.denoising_steps)
        if not steps or any(not 0 < s <= self.num_train_timesteps for s in steps):
            raise ValueError(f"denoising_steps {steps} must lie in (0, {self.num_train_timesteps}]")
        if steps != sorted(steps, reverse=True) or len(set(steps)) != len(steps):
            raise ValueError(f"denoising_steps {steps} must be strictly decreasing")


@dataclass(frozen=True)
class CausalConfig:
    """Chunking and the rolling KV window of streaming inference."""

    chunk_frames: int = 3  # latent frames per chunk (1 for frame-wise checkpoints)
    first_chunk_frames: int | None = None  # e.g. 1 for image-to-video ([1, 3, 3, ...])
    sink_chunks: int = 1  # the first chunks stay in the cache forever
    # most recent chunks kept besides the sink; a new chunk attends to sink + window + itself,
    # so 1 + 5 + 1 chunks of 3 = 21 latent frames, the released model's trained horizon
    window_chunks: int = 5
    rope_mode: RopeMode = "absolute"

    def __post_init__(self) -> None:
        if self.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be at least 1, got {self.chunk_frames}")
        if self.first_chunk_frames is not None and self.first_chunk_frames < 1:
            raise ValueError(f"first_chunk_frames must be at least 1, got {self.first_chunk_frames}")
        if self.sink_chunks < 0 or self.window_chunks < 1:
            raise ValueError(
                f"need sink_chunks >= 0 and window_chunks >= 1, got {self.sink_chunks} and "
                f"{self.window_chunks}"
            )
        if self.rope_mode not in ("absolute", "window"):
            raise ValueError(f"rope_mode must be 'absolute' or 'window', got {self.rope_mode!r}")


@dataclass(frozen=True)
class ModelPreset:
    """A whole model family: transformer, VAE, sampler and streaming defaults."""

    name: str
    dit: DiTConfig = field(default_factory=DiTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    causal: CausalConfig = field(default_factory=CausalConfig)
    fps: int = 16


PRESETS: dict[str, ModelPreset] = {
    "wan2.1-t2v-1.3b": ModelPreset(
        name="wan2.1-t2v-1.3b",
        dit=DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    ),
    "wan2.1-t2v-14b": ModelPreset(
        name="wan2.1-t2v-14b",
        dit=DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    ),
    "tiny": ModelPreset(
        name="tiny",
        dit=DiTConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, freq_dim=32, text_dim=32, text_len=16),
        vae=VAEConfig(z_dim=16, base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
        causal=CausalConfig(chunk_frames=3, sink_chunks=1, window_chunks=2),
    ),
    # the embedded Shapes model (embedded:shapes, trained by training/ on ../shared/SHAPES.md): 64x64
    # video, 16 tokens per latent frame; also the CPU-sized preset of the speed benchmark
    "shapes": ModelPreset(
        name="shapes",
        dit=DiTConfig(dim=192, ffn_dim=512, num_heads=4, num_layers=6, freq_dim=64, text_dim=64, text_len=16),
        vae=VAEConfig(base_dim=16, num_res_blocks=1),
        # streams on the horizon it is distilled on (3 chunks of 3 latent frames): a new chunk sees the 2
        # before it at the positions it was trained at (docs/reproduction.md, Figure 8)
        causal=CausalConfig(chunk_frames=3, sink_chunks=0, window_chunks=2, rope_mode="window"),
    ),
}


def get_preset(name: str) -> ModelPreset:
    """Return a preset by name, with an error listing the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def chunk_layout(num_frames: int, chunk_frames: int, first_chunk_frames: int | None = None) -> list[int]:
    """Split ``num_frames`` latent frames into chunks: ``[first, k, k, ...]``, the last may be short."""
    if num_frames < 1:
        raise ValueError(f"need at least one latent frame, got {num_frames}")
    sizes: list[int] = []
    remaining = num_frames
    if first_chunk_frames is not None:
        sizes.append(min(first_chunk_frames, remaining))
        remaining -= sizes[-1]
    while remaining > 0:
        sizes.append(min(chunk_frames, remaining))
        remaining -= sizes[-1]
    return sizes


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-safe dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(cfg)


def _coerce(cls: type, data: dict[str, Any]) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        if isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**kwargs)


def dit_config_from_dict(data: dict[str, Any]) -> DiTConfig:
    """Rebuild a DiTConfig saved with ``to_dict``."""
    return _coerce(DiTConfig, data)


def preset_from_dict(data: dict[str, Any]) -> ModelPreset:
    """Rebuild a ModelPreset saved with ``to_dict``."""
    return ModelPreset(
        name=data.get("name", "custom"),
        dit=_coerce(DiTConfig, data.get("dit", {})),
        vae=_coerce(VAEConfig, data.get("vae", {})),
        sampling=_coerce(SamplingConfig, data.get("sampling", {})),
        causal=_coerce(CausalConfig, data.get("causal", {})),
        fps=data.get("fps", 16),
    )
