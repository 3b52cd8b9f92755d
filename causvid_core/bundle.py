"""A loaded model with everything needed to stream from it: sampling and chunk settings, fps, and
(for the embedded models) its text encoder. Loader nodes and the command line share this.

Settings come, in order of precedence, from the caller, from the file (our safetensors carry them
as metadata), or from the defaults of the released CausVid weights (chunks of 3, [1000, 757, 522]).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, CausalConfig, SamplingConfig, to_dict
from .model import CausalWanModel

SAMPLING_META = "causvid_sampling"
CAUSAL_META = "causvid_causal"
FPS_META = "causvid_fps"
LATENTS_META = "causvid_latents"  # {"mean": [...], "std": [...]} of the VAE the model was trained with

EMBEDDED_ROOT = Path(__file__).resolve().parent / "embedded"
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_ENV = "CAUSVID_EMBEDDED_PATH"  # extra folders (os.pathsep-separated) searched for embedded models


def embedded_roots() -> list[Path]:
    """Folders holding embedded models: those named in $CAUSVID_EMBEDDED_PATH first (so a local copy,
    e.g. a retrained embedded:shapes or the tests' tiny one, overrides the shipped model), then the
    package's own."""
    extra = [Path(p) for p in os.environ.get(EMBEDDED_ENV, "").split(os.pathsep) if p]
    return [*extra, EMBEDDED_ROOT]


@dataclass
class ModelBundle:
    """What a loader hands to samplers: the model and how to stream from it."""

    model: CausalWanModel
    sampling: SamplingConfig
    causal: CausalConfig
    fps: int = 16
    name: str = ""
    text_encoder: Any = None  # a causvid_core.text.TextEncoder for embedded models, else None
    report: Any = None  # checkpoint.LoadReport
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if like.shape[1] != len(self.latents_mean):
            raise ValueError(
                f"latent has {like.shape[1]} channels but the model works on {len(self.latents_mean)}: "
                "was it made by this model's VAE?"
            )
        shape = (1, -1) + (1,) * (like.ndim - 2)
        mean = torch.tensor(self.latents_mean, dtype=torch.float32, device=like.device).view(shape)
        std = torch.tensor(self.latents_std, dtype=torch.float32, device=like.device).view(shape)
        return mean, std

    def to_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> raw VAE latents (ComfyUI's LATENT): raw = z * std + mean."""
        mean, std = self._stats(z)
        return z.float() * std + mean

    def to_model(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (ComfyUI's LATENT) -> model space: z = (raw - mean) / std."""
        mean, std = self._stats(raw)
        return (raw.float() - mean) / std


def embedded_names() -> list[str]:
    """Names usable as ``embedded:NAME`` (folders with a dit.safetensors in the embedded roots)."""
    names = {p.name for root in embedded_roots() if root.is_dir() for p in root.iterdir()
             if (p / "dit.safetensors").is_file()}  # fmt: skip
    return sorted(names)


def embedded_file(name: str, part: str) -> Path:
    """Path of one part ('dit', 'vae', 'text') of an embedded model, with a clear error if absent."""
    candidates = [root / name / f"{part}.safetensors" for root in embedded_roots()]
    path = next((c for c in candidates if c.is_file()), candidates[0])
    if not path.is_file():
        known = ", ".join(f"embedded:{n}" for n in embedded_names()) or "none are installed"
        raise FileNotFoundError(
            f"embedded model '{EMBEDDED_PREFIX}{name}' has no {part} weights at {path} (known: {known}); "
            "reinstall the package or train it with the recipe in docs/training.md"
        )
    return path


def part_file(source: str | Path, part: str) -> Path:
    """The weights file ``source`` names: for ``embedded:NAME`` its ``part`` ('dit', 'vae', 'text',
    'teacher'; a clear error when that model lacks it), otherwise ``source`` itself as a path."""
    source = str(source)
    if source.startswith(EMBEDDED_PREFIX):
        return embedded_file(source[len(EMBEDDED_PREFIX) :], part)
    return Path(source)


def vae_file(vae: str | None, model: str = "") -> Path | None:
    """The VAE weights named by ``vae`` (a file or ``embedded:NAME``); without one, the VAE of an embedded
    ``model``, or None when the model is a checkpoint (the caller says which VAE it needs)."""
    if not vae:
        if not model.startswith(EMBEDDED_PREFIX):
            return None
        vae = model
    path = part_file(vae, "vae")
    if not path.is_file():
        raise FileNotFoundError(
            f"VAE file {vae} not found: give a Wan2.1 VAE .pth/.safetensors or embedded:NAME"
        )
    return path


def file_metadata(path: Path) -> dict[str, str]:
    """This package's metadata of a safetensors or GGUF file (headers only); {} for other formats."""
    if path.suffix == ".gguf" and path.is_file():
        from .gguf import read_gguf

        return {k: v for k, v in read_gguf(path)[1].items() if k.startswith("causvid_") and isinstance(v, str)}
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    from .checkpoint import reading_safetensors

    with reading_safetensors(path), safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _latent_stats(metadata: dict[str, str]) -> dict[str, tuple[float, ...]]:
    if LATENTS_META not in metadata:
        return {}
    data = json.loads(metadata[LATENTS_META])
    return {"latents_mean": tuple(data["mean"]), "latents_std": tuple(data["std"])}


def _settings_from(metadata: dict[str, str]) -> tuple[SamplingConfig, CausalConfig, int]:
    sampling, causal, fps = SamplingConfig(), CausalConfig(), 16
    if SAMPLING_META in metadata:
        sampling = _replace_from_json(sampling, metadata[SAMPLING_META])
    if CAUSAL_META in metadata:
        causal = _replace_from_json(causal, metadata[CAUSAL_META])
    if FPS_META in metadata:
        fps = int(json.loads(metadata[FPS_META]))
    return sampling, causal, fps


def _replace_from_json(cfg: Any, text: str) -> Any:
    data = json.loads(text)
    fields = {f.name for f in dataclasses.fields(cfg)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
    return dataclasses.replace(cfg, **values)


def settings_metadata(
    sampling: SamplingConfig,
    causal: CausalConfig,
    fps: int,
    latents_mean: tuple[float, ...] | None = None,
    latents_std: tuple[float, ...] | None = None,
) -> dict[str, str]:
    """Metadata entries that make a saved model carry its streaming defaults (and its VAE's latent stats)."""
    meta = {
        SAMPLING_META: json.dumps(to_dict(sampling)),
        CAUSAL_META: json.dumps(to_dict(causal)),
        FPS_META: json.dumps(fps),
    }
    if latents_mean is not None and latents_std is not None:
        meta[LATENTS_META] = latent_stats_json(latents_mean, latents_std)
    return meta


def latent_stats_json(mean: Sequence[float], std: Sequence[float]) -> str:
    """The ``causvid_latents`` metadata value: per-channel latent mean and std as JSON."""
    return json.dumps({"mean": list(mean), "std": list(std)})


def parse_steps(text: str) -> tuple[int, ...]:
    """'1000, 757, 522' -> (1000, 757, 522), with an error that shows the expected form."""
    try:
        steps = tuple(int(s) for s in text.replace(";", ",").split(",") if s.strip())
    except ValueError:
        raise ValueError(
            f"denoising steps {text!r} must be comma-separated integers like '1000, 757, 522'"
        ) from None
    if not steps:
        raise ValueError("denoising steps are empty: write them like '1000, 757, 522'")
    return steps


def load_bundle(
    source: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    attention: str = "auto",
    chunk_frames: int | None = None,
    denoising_steps: tuple[int, ...] | str | None = None,
    lora: list[tuple[str | Path, float]] | None = None,
    packed: bool | None = None,
) -> ModelBundle:
    """Load a model (a file, folder, ``hf://`` reference or ``embedded:NAME``) with its streaming settings.

    ``packed``: keep a GGUF file's quantised block weights in their blocks (``load_model(packed=True)``: the
    file's size in memory, unpacked per matmul). None: packed on a GPU, where memory is short and unpacking
    is cheap; unpacked on a CPU, where unpacking every layer for every forward pass costs more than the
    memory it saves (bench/gguf.py)."""
    from .checkpoint import load_model

    text_encoder = None
    name = str(source)
    if name.startswith(EMBEDDED_PREFIX):
        embedded = name[len(EMBEDDED_PREFIX) :]
        path = embedded_file(embedded, "dit")
        text_encoder = embedded_text_encoder(embedded)
        if dtype is None:  # shipped in float16 to stay small; computed in float32 unless asked otherwise
            dtype = torch.float32
    else:
        path = Path(source) if not name.startswith("hf://") else source
    if packed is None:
        packed = torch.device(device).type != "cpu"
    model, report = load_model(path, dtype=dtype, device=device, lora=lora, packed=packed)
    model.set_attention_backend(attention)
    metadata = file_metadata(Path(path)) if isinstance(path, Path) else {}
    sampling, causal, fps = _settings_from(metadata)
    if chunk_frames:
        causal = dataclasses.replace(causal, chunk_frames=chunk_frames)
    if denoising_steps:
        steps = parse_steps(denoising_steps) if isinstance(denoising_steps, str) else tuple(denoising_steps)
        sampling = dataclasses.replace(sampling, denoising_steps=steps)
    return ModelBundle(model, sampling, causal, fps, name, text_encoder, report, **_latent_stats(metadata))


def embedded_text_encoder(name: str) -> Any:
    """The text encoder an embedded model ships (its text.safetensors)."""
    from safetensors.torch import load_file

    from .text import ShapesTextEncoder

    return ShapesTextEncoder.from_state_dict(load_file(str(embedded_file(name, "text"))))
