"""Wan2.1's diffusion transformer with block-causal attention and an explicit KV cache.

Parameter names are Wan's checkpoint keys exactly (``blocks.N.self_attn.q.weight``, ...), so the
official, ComfyUI and CausVid files load with at most a prefix strip. One ``forward`` serves three
attention modes:

- bidirectional (the teacher): no mask, no cache;
- block-causal over a whole sequence (training): ``chunk_sizes`` gives the mask
  ``chunk(key) <= chunk(query)``, timesteps per latent frame ``[B, F]``;
- incremental (inference): a ``KVCache``; the new chunk attends to the cached chunks and itself,
  and with ``write_cache=True`` its keys/values are appended after the pass.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import (
    RopeTable,
    attention,
    backend_context,
    block_causal_frame_mask,
    check_backend,
    token_mask,
)
from .config import DiTConfig
from .kv_cache import KVCache


def sinusoidal_embedding(dim: int, positions: Tensor) -> Tensor:
    """Wan's timestep embedding [N, dim], computed in float64: cat(cos(t w), sin(t w)), w = 10000^(-i/half)."""
    half = dim // 2
    pos = positions.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=pos.device) / half)
    sinusoid = torch.outer(pos, freqs)
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, normalised in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (no affine parameters unless asked, as in Wan)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False) -> None:
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()  # bf16 weights: normalise in fp32 too
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


def _compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a linear layer multiplies in: its weights' own, or an FP8Linear's compute dtype."""
    return getattr(layer, "compute_dtype", None) or layer.weight.dtype


def _linear(layer: nn.Module, x: Tensor) -> Tensor:
    """Apply a linear layer in its own (compute) dtype."""
    return layer(x.to(_compute_dtype(layer)))


def _version(t: Tensor) -> int:
    """In-place edit counter of a tensor; -1 for inference tensors (ComfyUI runs nodes under
    ``torch.inference_mode``), which keep none: their weights are loaded, and merged, before any forward."""
    return -1 if t.is_inference() else t._version


def _require_cuda(what: str) -> None:
    """GPU-only options fail on a CPU with the reason and what to use instead."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{what} needs a CUDA GPU and torch.cuda.is_available() is False; on the CPU leave it off "
            "(use float32 or bfloat16 weights and the eager path)"
        )


class FP8Linear(nn.Module):
    """A linear layer whose weight is stored in float8 (e4m3) with one scale per output row.

    w ~ w8 * scale, scale = max|w_row| / 448 (e4m3's largest value); the weight is expanded to
    ``compute_dtype`` for each matmul, so only memory shrinks (14B: about 14 GB of weights, not 28).
    """

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        w8, scale = fp8_quantize(linear.weight.detach())
        self.register_buffer("weight", w8)  # [out, in] float8_e4m3fn
        self.register_buffer("scale", scale)  # [out, 1] float32
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(compute_dtype))
        self.compute_dtype = compute_dtype

    def forward(self, x: Tensor) -> Tensor:
        weight = (self.weight.to(torch.float32) * self.scale).to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), weight, self.bias)


def fp8_quantize(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric float8 e4m3 quantisation: (w8, scale) with w ~ w8 * scale."""
    fp8 = torch.float8_e4m3fn
    amax = weight.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    scale = amax / torch.finfo(fp8).max
    return (weight.float() / scale).to(fp8), scale


@dataclass
class CrossKV:
    """Cross-attention keys/values of one prompt for every block: computed once per prompt."""

    keys: list[Tensor]  # [B, text_len, heads, head_dim] per block
    values: list[Tensor]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def lerp(self, other: CrossKV, weight: float) -> CrossKV:
        """Blend towards ``other`` (weight 0 -> self, 1 -> other)."""
        return CrossKV(
            [torch.lerp(a, b, weight) for a, b in zip(self.keys, other.keys, strict=True)],
            [torch.lerp(a, b, weight) for a, b in zip(self.values, other.values, strict=True)],
        )


@dataclass
class _AttnPlan:
    """How self-attention runs in this forward pass."""

    rope: RopeTable  # for the new tokens' queries and keys
    mask: Tensor | None = None  # block-causal token mask (full-sequence mode)
    cache: KVCache | None = None
    cache_rope: RopeTable | None = None  # re-rotation of cached keys ("window" rope mode)
    write_cache: bool = False


class _Projections(nn.Module):
    """q, k, v, o projections with Wan's q/k RMSNorm (names as in Wan's checkpoints)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, cfg.eps) if cfg.qk_norm else nn.Identity()


class SelfAttention(_Projections):
    fused_qkv = False  # one [3*dim, dim] projection instead of three (``set_fused_qkv``)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projections q, k, v [B, L, dim]; fused: one matmul against the concatenated weights."""
        plain = all(type(layer) is nn.Linear for layer in (self.q, self.k, self.v))  # not fp8 / GGUF-packed
        if not self.fused_qkv or not plain or torch.is_grad_enabled():  # fused: an inference snapshot
            return _linear(self.q, x), _linear(self.k, x), _linear(self.v, x)
        params = (self.q.weight, self.k.weight, self.v.weight, self.q.bias, self.k.bias, self.v.bias)
        stamp = tuple((id(t), _version(t), t.dtype, t.device) for t in params)
        if getattr(self, "_fused_stamp", None) != stamp:  # (re)build after loading or editing weights
            with torch.no_grad():
                self._fused = (torch.cat(params[:3]), torch.cat(params[3:]))
            self._fused_stamp = stamp
        weight, bias = self._fused
        qkv = F.linear(x.to(weight.dtype), weight, bias)  # [B, L, 3 * dim]
        return qkv.chunk(3, dim=-1)

    def forward(self, x: Tensor, layer: int, plan: _AttnPlan) -> Tensor:
        b, n, _ = x.shape
        shape = (b, n, self.num_heads, self.head_dim)
        q, k, v = self._qkv(x)
        q = self.norm_q(q).view(shape)  # [B, L, heads, head_dim]
        k = self.norm_k(k).view(shape)
        v = v.view(shape)
        q, k_rot = plan.rope.apply(q), plan.rope.apply(k)
        cache = plan.cache
        views = None
        if cache is not None and cache.rope_mode == "absolute":
            views = cache.read_with(layer, k_rot, v)  # ring layout: new keys written in place
        if views is not None:
            k_all, v_all = views  # [B, cached + L, heads, head_dim]
            if plan.write_cache:
                cache.stage(layer, k_all[:, -n:], v_all[:, -n:])
        elif cache is not None:
            ck, cv = cache.read(layer)
            if plan.cache_rope is not None:
                ck = plan.cache_rope.apply(ck)
            if plan.write_cache:
                cache.stage(layer, k if cache.rope_mode == "window" else k_rot, v)
            k_all = torch.cat([ck.to(k_rot.dtype), k_rot], dim=1)
            v_all = torch.cat([cv.to(v.dtype), v], dim=1)
        else:
            k_all, v_all = k_rot, v
        out = attention(q, k_all, v_all, plan.mask)
        return _linear(self.o, out)


class CrossAttention(_Projections):
    def context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [B, Lt, heads, head_dim] of embedded text ``context`` [B, Lt, dim]."""
        b, n, _ = context.shape
        shape = (b, n, self.num_heads, self.head_dim)
        k = self.norm_k(_linear(self.k, context)).view(shape)
        v = _linear(self.v, context).view(shape)
        return k, v

    def forward(self, x: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b, n, _ = x.shape
        q = self.norm_q(_linear(self.q, x)).view(b, n, self.num_heads, self.head_dim)
        return _linear(self.o, attention(q, k.to(q.dtype), v.to(q.dtype)))


class WanBlock(nn.Module):
    """One Wan transformer block with per-frame adaLN modulation (``e`` is [B, F, 6, dim])."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.norm1 = WanLayerNorm(dim, cfg.eps)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = (
            WanLayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        )
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = WanLayerNorm(dim, cfg.eps)
        self.ffn = nn.Sequential(
            nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self, x: Tensor, e: Tensor, cross_k: Tensor, cross_v: Tensor, layer: int, plan: _AttnPlan
    ) -> Tensor:
        b, n, d = x.shape
        frames = e.shape[1]
        mod = (self.modulation.float().unsqueeze(1) + e).unsqueeze(3)  # [B, F, 6, 1, dim]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(2)  # each [B, F, 1, dim]

        def modulate(h: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
            h = h.float().view(b, frames, n // frames, d)
            return (h * (1 + scale) + shift).view(b, n, d)

        def gated(y: Tensor, gate: Tensor) -> Tensor:
            return (y.float().view(b, frames, n // frames, d) * gate).view(b, n, d)

        y = self.self_attn(modulate(self.norm1(x), shift1, scale1), layer, plan)
        x = x + gated(y, gate1)
        x = x + self.cross_attn(self.norm3(x), cross_k, cross_v).float()
        y = self.ffn(modulate(self.norm2(x), shift2, scale2).to(_compute_dtype(self.ffn[0])))
        return x + gated(y, gate2)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        out = cfg.out_dim * math.prod(cfg.patch_size)
        self.norm = WanLayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, out)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """``e`` is the time embedding before ``time_projection`` [B, F, dim]."""
        b, n, d = x.shape
        frames = e.shape[1]
        mod = self.modulation.float().unsqueeze(1) + e.unsqueeze(2)  # [B, F, 2, dim]
        shift, scale = mod[:, :, 0:1], mod[:, :, 1:2]
        h = self.norm(x).float().view(b, frames, n // frames, d) * (1 + scale) + shift
        return _linear(self.head, h.view(b, n, d))


class CausalWanModel(nn.Module):
    """Wan2.1 DiT (T2V) predicting the flow velocity v = eps - x0."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        if cfg.model_type != "t2v":
            raise NotImplementedError(
                "Wan image-to-video (i2v) transformers are not supported: CausVid uses the T2V "
                "model, and image-to-video is done by seeding the stream with the image's latent"
            )
        self.config = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.gradient_checkpointing = False
        self.attn_backend = "auto"
        self.rope_cache = True  # reuse RoPE tables across steps (identical values; False recomputes)
        self.cache_layout = "compact"  # KV cache layout StreamingGenerator allocates ("ring": set_speed)
        self._rope_override: RopeTable | None = None  # static table while a CUDA graph is captured

    def set_attention_backend(self, name: str) -> None:
        """Pick the attention kernel ('auto', 'math', 'flash', 'efficient', 'cudnn'); checked against the device."""
        check_backend(name, self.patch_embedding.weight.device)
        self.attn_backend = name

    # -- speed options (the plain path is the reference; see tests/core/test_speed_options.py) -----
    def set_speed(self, options: str | Sequence[str]) -> list[str]:
        """Turn on speed options by name (a comma list or a sequence; "" or "reference" = the plain path):
        ``ring`` (KV cache that moves an index, not memory), ``fused_qkv``, ``compile`` (torch.compile of
        the blocks), ``fp8`` (float8 weights, CUDA only). Returns the options now on."""
        names = [o.strip() for o in (options.split(",") if isinstance(options, str) else options)]
        names = [o for o in names if o and o != "reference"]
        unknown = sorted(set(names) - set(SPEED_OPTIONS))
        if unknown:
            raise ValueError(f"unknown speed options {unknown}: choose from {', '.join(SPEED_OPTIONS)}")
        self.cache_layout = "ring" if "ring" in names else "compact"
        self.set_fused_qkv("fused_qkv" in names)
        if "fp8" in names:  # matmuls in the model's half dtype (bfloat16 for a float32 model)
            dtype = self.patch_embedding.weight.dtype
            self.quantize_fp8(dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16)
        if "compile" in names:
            self.compile_blocks()
        return names

    def set_fused_qkv(self, enabled: bool = True) -> None:
        """Project q, k, v of self-attention with one matmul (inference only; same result within 1e-5)."""
        for block in self.blocks:
            block.self_attn.fused_qkv = enabled

    def compile_blocks(self, **compile_kwargs: object) -> None:
        """``torch.compile`` every transformer block (the cache calls stay eager at graph breaks)."""
        for block in self.blocks:
            block.compile(**compile_kwargs)

    def quantize_fp8(self, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        """Store the blocks' linear weights in float8 e4m3 (the 14B model in half the memory); GPU only.

        Call it last: a later ``.to(dtype)`` would cast the float8 weights back to ``dtype``.
        """
        _require_cuda("fp8 weights")
        for block in self.blocks:
            for parent in (block.self_attn, block.cross_attn):
                for name in ("q", "k", "v", "o"):
                    if type(getattr(parent, name)) is nn.Linear:  # GGUF-packed layers are smaller already
                        setattr(parent, name, FP8Linear(getattr(parent, name), compute_dtype))
            for i in (0, 2):
                if type(block.ffn[i]) is nn.Linear:
                    block.ffn[i] = FP8Linear(block.ffn[i], compute_dtype)

    # -- text ------------------------------------------------------------------------------
    def encode_context(self, context: Tensor) -> CrossKV:
        """Embed text features [B, L<=text_len, text_dim] (zero-padded to text_len, unmasked as in
        the reference) and compute every block's cross-attention keys and values."""
        cfg = self.config
        if context.ndim != 3 or context.shape[-1] != cfg.text_dim:
            raise ValueError(
                f"text context must be [B, L, {cfg.text_dim}], got {list(context.shape)}; "
                "was it made by the text encoder this model was trained with?"
            )
        if context.shape[1] > cfg.text_len:
            # Wan's tokenizer truncates at text_len; ComfyUI's does not, so long prompts arrive longer
            warnings.warn(
                f"text context has {context.shape[1]} tokens; the model was trained on at most "
                f"{cfg.text_len}, so the rest is cut (shorten the prompt to keep all of it)",
                stacklevel=2,
            )
            context = context[:, : cfg.text_len]
        if context.shape[1] < cfg.text_len:
            context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        emb = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))
        keys, values = [], []
        for block in self.blocks:
            k, v = block.cross_attn.context_kv(emb)
            keys.append(k)
            values.append(v)
        return CrossKV(keys, values)

    # -- time ------------------------------------------------------------------------------
    def embed_time(self, t: Tensor, batch: int, frames: int) -> tuple[Tensor, Tensor]:
        """Per-frame time embedding e [B, F, dim] and block modulation e0 [B, F, 6, dim] (float32)."""
        if t.numel() == 1:
            t = t.reshape(1, 1).expand(batch, frames)
        elif t.numel() == batch:
            t = t.reshape(batch, 1).expand(batch, frames)
        elif t.numel() == batch * frames:
            t = t.reshape(batch, frames)
        else:
            raise ValueError(
                f"timesteps must be a scalar, [B] or [B, F] = [{batch}, {frames}], got {list(t.shape)}"
            )
        sin = sinusoidal_embedding(self.config.freq_dim, t.reshape(-1))
        lin = self.time_embedding[0]
        e = self.time_embedding(sin.to(lin.weight.dtype)).float()
        e0 = _linear(self.time_projection[1], F.silu(e)).float()
        return e.view(batch, frames, -1), e0.view(batch, frames, 6, -1)

    # -- main ------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | CrossKV,
        *,
        start_frame: int | None = None,
        chunk_sizes: list[int] | None = None,
        sink_chunks: int | None = None,
        window_chunks: int | None = None,
        cache: KVCache | None = None,
        write_cache: bool = False,
    ) -> Tensor:
        """Predict v = eps - x0 for latents ``x`` [B, C, F, H, W] at raw timesteps ``t`` (0..1000).

        ``start_frame``: absolute latent index of x's first frame (RoPE); with a cache it defaults
        to the frame after the cached ones. ``chunk_sizes`` (no cache): block-causal mask, with an
        optional rolling window (``sink_chunks``/``window_chunks``) to match a rolling cache.
        """
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_dim:
            raise ValueError(f"latents must be [B, {cfg.in_dim}, F, H, W], got {list(x.shape)}")
        b, _, frames, lat_h, lat_w = x.shape
        pt, ph, pw = cfg.patch_size
        grid = (frames // pt, lat_h // ph, lat_w // pw)
        if frames % pt or lat_h % ph or lat_w % pw:
            raise ValueError(f"latent {frames}x{lat_h}x{lat_w} is not divisible by patch {cfg.patch_size}")
        if chunk_sizes is not None and cache is not None:
            raise ValueError("pass chunk_sizes (full-sequence training) or cache (streaming), not both")
        if write_cache and cache is None:
            raise ValueError("write_cache=True needs a cache")

        cross = context if isinstance(context, CrossKV) else self.encode_context(context)
        if cross.batch != b:
            raise ValueError(f"prompt batch {cross.batch} does not match latent batch {b}")
        if start_frame is None:
            start_frame = cache.next_frame if cache is not None else 0
        plan = self._plan(
            grid, x.device, start_frame, chunk_sizes, sink_chunks, window_chunks, cache, write_cache
        )

        h = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))  # [B, dim, F, H/2, W/2]
        h = h.flatten(2).transpose(1, 2).float()  # [B, L, dim]
        e, e0 = self.embed_time(t.to(x.device), b, grid[0])
        with backend_context(self.attn_backend):
            for i, block in enumerate(self.blocks):
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    h = checkpoint(block, h, e0, cross.keys[i], cross.values[i], i, plan, use_reentrant=False)
                else:
                    h = block(h, e0, cross.keys[i], cross.values[i], i, plan)
        if write_cache:
            cache.commit(start_frame, grid[0])
        out = self.head(h, e)  # [B, L, out_dim * prod(patch)]
        return self.unpatchify(out.float(), grid)

    def _plan(
        self,
        grid: tuple[int, int, int],
        device: torch.device,
        start_frame: int,
        chunk_sizes: list[int] | None,
        sink_chunks: int | None,
        window_chunks: int | None,
        cache: KVCache | None,
        write_cache: bool,
    ) -> _AttnPlan:
        frames, gh, gw = grid
        mask = cache_rope = None
        if cache is not None:
            if cache.chunks and start_frame < cache.next_frame:
                raise ValueError(
                    f"chunk starts at frame {start_frame} but the cache already holds frames up to "
                    f"{cache.next_frame - 1}: chunks are generated in order"
                )
            if cache.tokens_per_frame != gh * gw:
                raise ValueError(
                    f"cache was allocated for {cache.tokens_per_frame} tokens per frame, "
                    f"this chunk has {gh * gw}: allocate the cache for this resolution"
                )
            if cache.rope_mode == "window":
                # cached keys re-rotated at their place in time order (sink first), in buffer order
                slots = cache.logical_positions()
                cache_rope = self._rope(slots, gh, gw, device) if slots else None
                start_frame = cache.num_frames  # re-indexed inside the window
        rope = self._rope_override or self._rope(range(start_frame, start_frame + frames), gh, gw, device)
        if chunk_sizes is not None:
            if sum(chunk_sizes) != frames:
                raise ValueError(f"chunk_sizes {chunk_sizes} sum to {sum(chunk_sizes)}, not {frames} frames")
            fmask = block_causal_frame_mask(chunk_sizes, sink_chunks, window_chunks)
            mask = token_mask(fmask, gh * gw).to(device)
        return _AttnPlan(rope, mask, cache, cache_rope, write_cache)

    def _rope(self, frames: Sequence[int], gh: int, gw: int, device: torch.device) -> RopeTable:
        """The RoPE table of these frame positions: shared across steps when ``rope_cache`` is on."""
        cfg = self.config
        if self.rope_cache:
            return RopeTable.cached(frames, gh, gw, cfg.head_dim, cfg.rope_theta, device)
        positions = torch.tensor(list(frames), dtype=torch.long, device=device)
        return RopeTable.for_frames(positions, gh, gw, cfg.head_dim, cfg.rope_theta)

    def unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """[B, L, C*pt*ph*pw] -> [B, C, F*pt, H*ph, W*pw] (Wan's 'fhwpqrc->cfphqwr')."""
        b = x.shape[0]
        pt, ph, pw = self.config.patch_size
        c = self.config.out_dim
        x = x.view(b, *grid, pt, ph, pw, c)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(b, c, grid[0] * pt, grid[1] * ph, grid[2] * pw)


SPEED_OPTIONS = ("ring", "fused_qkv", "compile", "fp8")


class CudaGraphStep:
    """The per-chunk forward replayed from a CUDA graph once a ring cache is full (fixed shapes).

    Call it like the model (``sample_chunk`` accepts it as ``model``). Until the window is full, for
    another cache, or for raw text context it runs the model eagerly. One graph is captured per input
    shape and prompt; before each replay the inputs and the new chunk's RoPE table are copied into
    the graph's static tensors, and a cache write commits what the graph wrote in place.
    """

    def __init__(self, model: CausalWanModel, cache: KVCache) -> None:
        _require_cuda("CUDA graphs")
        if cache.layout != "ring" or cache.rope_mode != "absolute":
            raise ValueError(
                "CUDA graphs need a KVCache allocated with layout='ring' and rope_mode 'absolute' "
                "(fixed buffers, keys rotated once); allocate the cache that way or run eagerly"
            )
        self.model, self.cache = model, cache
        self._graphs: dict[tuple, tuple] = {}

    def __call__(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | CrossKV,
        *,
        cache: KVCache | None = None,
        start_frame: int | None = None,
        write_cache: bool = False,
    ) -> Tensor:
        cache = cache or self.cache
        full = len(cache.chunks) >= cache.sink_chunks + cache.window_chunks  # shapes fixed from here on
        if cache is not self.cache or not full or not isinstance(context, CrossKV):
            return self.model(x, t, context, cache=cache, start_frame=start_frame, write_cache=write_cache)
        start = cache.next_frame if start_frame is None else start_frame
        frames = x.shape[2]
        key = (tuple(x.shape), tuple(t.shape), cache.num_tokens, id(context))
        entry = self._graphs.get(key)
        if entry is None or entry[0] is not context:
            entry = self._graphs[key] = self._capture(x, t, context, start)
        _, graph, x_s, t_s, rope_s, out_s = entry
        x_s.copy_(x)
        t_s.copy_(t)
        rope_s.rotation.copy_(self._rope_of(x, start).rotation)
        graph.replay()
        if write_cache:
            cache.commit_tail(start, frames)
        return out_s.clone()

    def _rope_of(self, x: Tensor, start: int) -> RopeTable:
        """The RoPE table of chunk ``x`` [B, C, F, H, W] starting at latent frame ``start``."""
        _, ph, pw = self.model.config.patch_size
        frames = range(start, start + x.shape[2])
        return self.model._rope(frames, x.shape[3] // ph, x.shape[4] // pw, x.device)

    def _capture(self, x: Tensor, t: Tensor, context: CrossKV, start: int) -> tuple:
        """Warm up on a side stream, then capture one forward with static inputs and RoPE table."""
        x_s, t_s = x.clone(), t.clone()
        table = self._rope_of(x, start)
        rope_s = copy.copy(table)
        rope_s.rotation = table.rotation.clone()
        self.model._rope_override = rope_s
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.model(x_s, t_s, context, cache=self.cache, start_frame=start)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out_s = self.model(x_s, t_s, context, cache=self.cache, start_frame=start)
        finally:
            self.model._rope_override = None
        return context, graph, x_s, t_s, rope_s, out_s
