"""Training data: latents + text embeddings, deterministic in (seed, step, rank).

Sources: Shapes videos rendered on the fly and encoded (``ShapesSource``), or sharded safetensors
files written once by ``precompute`` (``ShardSource``): from Shapes, or from a folder of videos with
captions. A shard holds ``latents`` [N, C, F, h, w] and ``context`` [N, L, D] with the prompts and
seeds in its metadata; ODE-pair shards hold ``trajectory`` [N, K+1, C, F, h, w] instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from causvid_core.bundle import file_metadata
from causvid_core.text import ShapesTextEncoder

from .config import ConfigError, RunConfig

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif")


class LatentCodec(Protocol):
    """Video [B, 3, T, H, W] in -1..1 <-> latents [B, C, 1 + (T-1)/4, H/8, W/8]."""

    def encode(self, video: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...


class PoolCodec:
    """Weight-free stand-in for the VAE (tests, quick runs): frame subsampling, 8x8 mean pooling and a
    fixed orthonormal lift of the 3 colour channels to ``channels``; ``decode`` is its pseudo-inverse."""

    def __init__(self, channels: int = 16, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(channels, 3, generator=gen, dtype=torch.float64))
        self.lift = (q * (channels / 3) ** 0.5).float()  # [C, 3], columns orthogonal

    def encode(self, video: Tensor) -> Tensor:
        frames = video[:, :, ::4]  # [B, 3, 1 + (T-1)/4, H, W]
        b, c, f, h, w = frames.shape
        pooled = torch.nn.functional.avg_pool3d(frames.float(), (1, 8, 8))  # [B, 3, F, H/8, W/8]
        return torch.einsum("kc,bcfhw->bkfhw", self.lift, pooled)

    def decode(self, latents: Tensor) -> Tensor:
        rgb = torch.einsum("kc,bkfhw->bcfhw", self.lift, latents.float()) / (self.lift.shape[0] / 3)
        rgb = rgb.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)
        first, rest = rgb[:, :, :1], rgb[:, :, 1:].repeat_interleave(4, dim=2)
        return torch.cat([first, rest], dim=2).clamp(-1, 1)


class CoreVAECodec:
    """The core Wan VAE (causvid_core/vae.py) behind the codec interface."""

    def __init__(self, vae: Any) -> None:
        self.vae = vae

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        return self.vae.encode(video)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents)


def run_vae_path(cfg: RunConfig) -> Path:
    """``--vae run``: the VAE this run's ``vae`` stage trained, with the command that makes it if absent."""
    from .config import stage_dir

    path = stage_dir(dataclasses.replace(cfg, out_dir=None), "vae") / "final.safetensors"
    if not path.is_file():
        raise ConfigError(
            f"--vae run: {path} not found; train it first with "
            f"python -m training.distill vae --preset {cfg.preset} --name {cfg.name} --runs-dir {cfg.runs_dir} "
            "(or pass --vae PATH / embedded:NAME)"
        )
    return path


def build_codec(cfg: RunConfig, device: torch.device | str = "cpu") -> LatentCodec:
    """'pool', 'run' (this run's ``vae`` stage), 'embedded:NAME', a VAE checkpoint (Wan .pth,
    ComfyUI/diffusers safetensors) or a VAE preset name (random weights: for pipeline tests only)."""
    from causvid_core.vae import VAE_PRESETS, WanVAE, load_wan_vae

    if cfg.vae == "pool":
        return PoolCodec(cfg.dit.in_dim, cfg.text_seed)
    if cfg.vae == "run":
        return CoreVAECodec(load_wan_vae(run_vae_path(cfg), device=device))
    if cfg.vae.startswith("embedded:"):
        from causvid_core.bundle import part_file

        try:
            path = part_file(cfg.vae, "vae")
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
        return CoreVAECodec(load_wan_vae(path, device=device))
    if Path(cfg.vae).exists():
        return CoreVAECodec(load_wan_vae(cfg.vae, device=device))
    if cfg.vae not in VAE_PRESETS:
        raise ConfigError(
            f"--vae {cfg.vae!r} is neither a file nor a VAE preset ({', '.join(VAE_PRESETS)}) nor 'pool'"
        )
    warnings.warn(f"VAE preset {cfg.vae!r} built with random weights: pass a trained checkpoint path",
                  stacklevel=2)  # fmt: skip
    return CoreVAECodec(WanVAE(VAE_PRESETS[cfg.vae]).to(device).eval())


def text_encoder(cfg: RunConfig) -> ShapesTextEncoder:
    """The small Shapes text encoder sized for the model's text_dim / text_len."""
    return ShapesTextEncoder(cfg.dit.text_dim, cfg.dit.text_len, seed=cfg.text_seed)


def checkpoint_text_encoder(source: str | Path, config: Any | None = None) -> ShapesTextEncoder:
    """The Shapes text encoder a model was trained with: ``embedded:NAME`` or a training checkpoint.

    An embedded model ships its encoder (text.safetensors). A checkpoint of ``runs/`` carries none, so
    this rebuilds the one its run used: the checkpoint's text_dim / text_len (``config``, its DiTConfig
    when already loaded, else read from the file) and the run's ``--text-seed`` from its
    ``causvid_training`` metadata (0 when the file has none).
    """
    name = str(source)
    if name.startswith("embedded:"):
        from causvid_core.bundle import embedded_text_encoder

        return embedded_text_encoder(name[len("embedded:") :])
    if config is None:
        from causvid_core.checkpoint import describe

        config = describe(source).config
    seed = 0
    raw = file_metadata(Path(source)).get("causvid_training") if Path(source).is_file() else None
    if raw:
        seed = int(json.loads(raw).get("text_seed", 0))
    return ShapesTextEncoder(config.text_dim, config.text_len, seed=seed)


def uncond_context(cfg: RunConfig, path: str | None = None) -> Tensor:
    """The negative / empty-prompt embedding [1, L, D]: zeros (the empty Shapes prompt) or a file."""
    if path is None:
        return torch.zeros(1, cfg.dit.text_len, cfg.dit.text_dim)
    if not Path(path).exists():
        raise ConfigError(
            f"negative prompt embedding {path} not found (a safetensors with 'context' [1, L, D])"
        )
    with safe_open(path, "pt") as f:
        return f.get_tensor("context")[:1].float()


def latent_shape(cfg: RunConfig) -> tuple[int, int, int, int]:
    """[C, F, h, w] of one training sample."""
    return cfg.dit.in_dim, 1 + (cfg.num_frames - 1) // 4, cfg.height // 8, cfg.width // 8


# -- deterministic sampling ------------------------------------------------------------------
def sample_indices(step: int, rank: int, world: int, batch: int, seed: int, size: int | None) -> list[int]:
    """Dataset indices of (step, rank): global positions (step*world + rank)*batch + k, shuffled per epoch."""
    pos = [(step * world + rank) * batch + k for k in range(batch)]
    if not size:
        return pos
    out = []
    for p in pos:
        epoch, i = divmod(p, size)
        perm = np.random.default_rng([seed, epoch]).permutation(size)
        out.append(int(perm[i]))
    return out


@dataclass
class Batch:
    latents: Tensor  # [B, C, F, h, w] (or [B, K+1, C, F, h, w] for ODE pairs)
    context: Tensor  # [B, L, D]
    prompts: list[str]


class ShapesSource:
    """Shapes videos rendered and encoded on the fly; sample i depends only on (seed, i)."""

    def __init__(self, cfg: RunConfig, codec: LatentCodec) -> None:
        from .shapes import ShapesDataset

        if cfg.height != cfg.width:
            raise ConfigError(f"Shapes videos are square; got --height {cfg.height} --width {cfg.width}")
        self.dataset = ShapesDataset(cfg.num_frames, cfg.height, seed=cfg.seed)
        self.codec, self.text = codec, text_encoder(cfg)
        self.size = cfg.data_size or None

    def __len__(self) -> int:
        return self.size or 0

    def prompts(self, indices: Sequence[int]) -> tuple[list[str], Tensor]:
        prompts = [self.dataset.sample(i)[1] for i in indices]
        return prompts, self.text.encode(prompts)

    def get(self, indices: Sequence[int]) -> Batch:
        items = [self.dataset.sample(i) for i in indices]
        video = torch.stack([v for v, _ in items])  # [B, 3, T, H, W]
        prompts = [p for _, p in items]
        return Batch(self.codec.encode(video).float(), self.text.encode(prompts), prompts)


class ShardSource:
    """Samples of a folder of safetensors shards (``precompute`` or ``ode-pairs`` output)."""

    def __init__(self, folder: str | Path, key: str = "latents", made_by: str = "precompute") -> None:
        self.folder, self.key = Path(folder), key
        if not self.folder.is_dir():
            raise ConfigError(f"data folder {self.folder} does not exist; make it with: {made_by}")
        self.files = sorted(self.folder.glob("shard_*.safetensors"))
        if not self.files:
            raise ConfigError(
                f"data folder {self.folder} holds no shard_*.safetensors files; make them with: {made_by}"
            )
        self.counts, self.prompt_lists = [], []
        for path in self.files:
            with safe_open(str(path), "pt") as f:
                if key not in f.keys():
                    raise ConfigError(f"{path} has no '{key}' tensor: is it the right kind of shard?")
                self.counts.append(f.get_slice(key).get_shape()[0])
                self.prompt_lists.append(json.loads(f.metadata().get("prompts", "[]")))
        self.offsets = np.cumsum([0, *self.counts])
        self._cache: dict[int, dict[str, Tensor]] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _shard(self, j: int) -> dict[str, Tensor]:
        if j not in self._cache:
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            with safe_open(str(self.files[j]), "pt") as f:
                self._cache[j] = {k: f.get_tensor(k) for k in f.keys()}
        return self._cache[j]

    def _locate(self, i: int) -> tuple[int, int]:
        i %= len(self)
        j = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return j, i - int(self.offsets[j])

    def prompts(self, indices: Sequence[int]) -> tuple[list[str], Tensor]:
        b = self.get(indices)
        return b.prompts, b.context

    def get(self, indices: Sequence[int]) -> Batch:
        lat, ctx, prompts = [], [], []
        for i in indices:
            j, k = self._locate(i)
            shard = self._shard(j)
            lat.append(shard[self.key][k].float())
            ctx.append(shard["context"][k].float())
            plist = self.prompt_lists[j]
            prompts.append(plist[k] if k < len(plist) else "")
        return Batch(torch.stack(lat), torch.stack(ctx), prompts)

    def meta(self, key: str) -> Any:
        value = file_metadata(Path(self.files[0])).get(key)
        return None if value is None else json.loads(value)


def build_source(cfg: RunConfig, codec: LatentCodec | None = None) -> ShapesSource | ShardSource:
    """The stage's data: Shapes on the fly (``--data shapes``) or latent shards (``--data FOLDER``)."""
    if cfg.data == "shapes":
        return ShapesSource(cfg, codec or build_codec(cfg))
    made = f"python -m training.distill precompute --preset {cfg.preset} --name {cfg.name} --runs-dir {cfg.runs_dir}"
    src = ShardSource(cfg.data, "latents", made)
    c, f, h, w = latent_shape(cfg)
    got = tuple(src.get([0]).latents.shape[1:])
    if got[0] != c or got[2:] != (h, w):
        raise ConfigError(f"latents in {cfg.data} are {list(got)}, the config expects [{c}, F, {h}, {w}]")
    return src


def check_shard_settings(path: Path, expected: dict[str, Any]) -> None:
    """Refuse to keep (skip) an existing shard made with other settings than this run's: a folder of
    shards must be one dataset. ``expected``: setting -> value, looked up in the shard's metadata, then in
    its stored config; settings the shard does not record are not compared; paths compare resolved."""
    with safe_open(str(path), "pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    differ = []
    for key, want in expected.items():
        have = meta[key] if key in meta else config.get(key, want)
        if isinstance(want, Path):
            have, want = Path(str(have)).resolve(), want.resolve()
        if have != want:
            differ.append(f"{key} {have} here, {want} now")
    if differ:
        raise ConfigError(
            f"{path.parent} holds shards made with other settings ({'; '.join(differ)}): one folder is one "
            "dataset, so give another --out-dir, or delete the folder to make it again with these settings"
        )


def write_shard(path: Path, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> None:
    """Atomic safetensors write (tmp file, then rename); metadata values stored as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


# -- video folders -------------------------------------------------------------------------
def list_videos(folder: str | Path) -> list[tuple[Path, str]]:
    """(video, caption) pairs: captions from captions.json {file name: caption} or a .txt next to each video."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"video folder {folder} does not exist")
    videos = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_EXTS)
    if not videos:
        raise ConfigError(f"video folder {folder} holds no videos ({', '.join(VIDEO_EXTS)})")
    table = {}
    if (folder / "captions.json").exists():
        table = json.loads((folder / "captions.json").read_text())
    out = []
    for v in videos:
        caption = table.get(v.name, table.get(v.stem))
        if caption is None and v.with_suffix(".txt").exists():
            caption = v.with_suffix(".txt").read_text().strip()
        if caption is None:
            raise ConfigError(f"no caption for {v.name}: add it to captions.json or write {v.stem}.txt")
        out.append((v, caption))
    return out


def read_clip(path: Path, num_frames: int, height: int, width: int) -> Tensor:
    """The first ``num_frames`` frames, resized (cover) and centre-cropped: float [3, T, H, W] in -1..1."""
    import av

    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            img = frame.to_image()
            scale = max(width / img.width, height / img.height)
            img = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))))
            left, top = (img.width - width) // 2, (img.height - height) // 2
            frames.append(np.asarray(img.crop((left, top, left + width, top + height)).convert("RGB")))
            if len(frames) == num_frames:
                break
    if len(frames) < num_frames:
        raise ConfigError(f"{path} has {len(frames)} frames, fewer than --num-frames {num_frames}")
    video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float()
    return video / 127.5 - 1.0


# -- precompute ----------------------------------------------------------------------------
def _caption_context(cfg: Any, captions: list[str]) -> Tensor:
    """Text embeddings of captions: from ``--text-embeddings`` or the Shapes encoder."""
    if cfg.text_embeddings:
        with safe_open(cfg.text_embeddings, "pt") as f:
            table = f.get_tensor("context").float()
            known = json.loads(f.metadata().get("captions", "[]"))
        missing = [c for c in captions if c not in known]
        if missing:
            raise ConfigError(f"{cfg.text_embeddings} has no embedding for captions {missing[:3]}")
        return torch.stack([table[known.index(c)] for c in captions])
    if getattr(cfg, "text_encoder", None):
        from causvid_core.umt5 import UMT5TextEncoder

        encoder = UMT5TextEncoder.load(cfg.text_encoder, dtype=torch.float32)
        if encoder.text_dim != cfg.dit.text_dim:
            raise ConfigError(
                f"--text-encoder gives {encoder.text_dim}-dim features but the model takes {cfg.dit.text_dim}"
            )
        return encoder.encode(captions)[:, : cfg.dit.text_len]
    try:
        return text_encoder(cfg).encode(captions)
    except ValueError as err:
        raise ConfigError(
            f"{err}. Captions outside the Shapes vocabulary need a text encoder: --text-encoder "
            "umt5-xxl-enc.pth (Wan's umT5, tokenizer.json beside it) or --text-embeddings FILE "
            "(safetensors 'context' [N, L, D] + metadata 'captions')"
        ) from None


def run_precompute(cfg: Any, ctx: Any) -> dict[str, Any]:
    """Encode Shapes videos or a captioned video folder to ``latents`` shards (resumable, rank-split)."""
    from .config import stage_dir, to_json
    from .shapes import ShapesDataset

    folder = stage_dir(cfg, "latents")
    codec = build_codec(cfg, ctx.device)
    if cfg.videos == "shapes":
        shapes = ShapesDataset(cfg.num_frames, cfg.height, seed=cfg.seed)
        total = cfg.num_samples

        def load(i: int) -> tuple[Tensor, str]:
            return shapes.sample(i)
    else:
        items = list_videos(cfg.videos)
        total = min(cfg.num_samples, len(items))

        def load(i: int) -> tuple[Tensor, str]:
            return read_clip(items[i][0], cfg.num_frames, cfg.height, cfg.width), items[i][1]

    written = []
    n_shards = -(-total // cfg.shard_size)
    for j in range(ctx.rank, n_shards, ctx.world_size):
        out = folder / f"shard_{j:05d}.safetensors"
        if out.exists():
            check_shard_settings(out, {"source": cfg.videos, "vae": cfg.vae, "seed": cfg.seed,
                                       "shard_size": cfg.shard_size, "num_frames": cfg.num_frames,
                                       "height": cfg.height, "width": cfg.width})  # fmt: skip
            continue
        idx = list(range(j * cfg.shard_size, min(total, (j + 1) * cfg.shard_size)))
        lat, prompts = [], []
        for a in range(0, len(idx), cfg.batch_size):
            clips = [load(i) for i in idx[a : a + cfg.batch_size]]
            video = torch.stack([v for v, _ in clips]).to(ctx.device)
            lat.append(codec.encode(video).float().cpu())
            prompts += [p for _, p in clips]
        meta = {
            "prompts": prompts,
            "sample_indices": idx,
            "source": cfg.videos,
            "config": json.loads(to_json(cfg)),
        }
        write_shard(out, {"latents": torch.cat(lat), "context": _caption_context(cfg, prompts)}, meta)
        written.append(out)
        if ctx.rank == 0:
            print(f"wrote {out} ({len(idx)} samples)", flush=True)
    return {"stage": "precompute", "folder": folder, "written": written}
