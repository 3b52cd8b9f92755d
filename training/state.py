"""Checkpoints and exact resume.

A checkpoint of step N in a stage folder is ``step_N.safetensors`` (the trained model: teacher,
student or DMD generator; loadable by ``causvid_core.checkpoint.load_model``), ``critic_N.safetensors``
for DMD, and ``state_N.pt`` (optimisers, step, RNG states, data position, config). The state file
is written last, so its presence marks a complete checkpoint; every file is written to a temporary
name and renamed (atomic). ``final.safetensors`` is the copy the next stage reads.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from causvid_core.checkpoint import META_KEY
from causvid_core.config import DiTConfig, ModelPreset, to_dict

from . import dist
from .config import ConfigError, RunConfig, to_json


@dataclass
class Trainable:
    """A trained model with its optimiser; ``prefix`` names its weight files (``step`` or ``critic``)."""

    prefix: str
    model: nn.Module  # possibly DDP / FSDP wrapped
    opt: torch.optim.Optimizer
    raw: nn.Module  # the CausalWanModel inside


def rng_state() -> dict[str, Any]:
    """torch / CUDA / numpy / python RNG states."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_weights(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, Any]) -> None:
    """Atomic safetensors write with this package's config metadata (what ``save_model`` writes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    meta = {"format": "pt", **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


class CheckpointManager:
    """Writes and finds a stage's checkpoints; rank 0 writes, every rank takes part in gathering."""

    def __init__(self, folder: Path, stage: str, cfg: RunConfig, ctx: dist.DistContext) -> None:
        self.folder, self.stage, self.cfg, self.ctx = folder, stage, cfg, ctx

    def latent_stats(self) -> tuple[Any, Any]:
        """(mean, std) of the run's VAE when it is a file with stored statistics (our trained VAEs), so the
        DiT checkpoints carry the normalisation they were trained with; (None, None) otherwise."""
        from causvid_core.vae import latent_stats_of

        vae = self.cfg.vae
        if vae == "run":
            from .data import run_vae_path

            try:
                vae = str(run_vae_path(self.cfg))
            except ValueError:
                return None, None
        from causvid_core.bundle import part_file

        try:
            vae = str(part_file(vae, "vae"))
        except FileNotFoundError:  # an embedded model without a VAE
            return None, None
        stats = latent_stats_of(vae) if Path(vae).suffix == ".safetensors" else None
        return stats if stats is not None else (None, None)

    def weights_path(self, prefix: str, step: int) -> Path:
        return self.folder / f"{prefix}_{step:06d}.safetensors"

    def state_path(self, step: int) -> Path:
        return self.folder / f"state_{step:06d}.pt"

    def latest(self) -> Path | None:
        """The newest complete checkpoint's state file."""
        found = sorted(self.folder.glob("state_*.pt"), key=lambda p: int(re.findall(r"\d+", p.stem)[-1]))
        return found[-1] if found else None

    def metadata(self, model: nn.Module, step: int) -> dict[str, Any]:
        cfg = self.cfg
        if not isinstance(getattr(model, "config", None), DiTConfig):  # the VAE stage (and its discriminator)
            from .vae_stage import vae_metadata

            return vae_metadata(model, self.stage, step, to_json(cfg))
        preset = ModelPreset(name=cfg.preset, dit=model.config, sampling=cfg.sampling, causal=cfg.causal)
        try:  # streaming defaults that causvid_core.bundle reads back (sampling list, chunks, fps)
            from causvid_core.bundle import settings_metadata

            settings = settings_metadata(cfg.sampling, cfg.causal, 16, *self.latent_stats())
        except ImportError:
            settings = {}
        return {
            **settings,
            META_KEY: json.dumps(to_dict(model.config)),
            "causvid_preset": to_dict(preset),
            "causvid_stage": self.stage,
            "causvid_step": step,
            "causvid_training": to_json(cfg),
        }

    def save(self, step: int, trainables: list[Trainable], extra: dict[str, Any]) -> Path | None:
        """Write weights, then the state file (rank 0). Collective under FSDP."""
        sds = [dist.full_state_dict(t.model) for t in trainables]
        optims = [dist.optim_state(t.model, t.opt) for t in trainables]
        path = None
        if self.ctx.is_main:
            for t, sd in zip(trainables, sds, strict=True):
                save_weights(sd, self.weights_path(t.prefix, step), self.metadata(t.raw, step))
            state = {
                "stage": self.stage, "step": step, "config": to_json(self.cfg),
                "weights": {t.prefix: self.weights_path(t.prefix, step).name for t in trainables},
                "optimizers": {t.prefix: o for t, o in zip(trainables, optims, strict=True)},
                "rng": rng_state(), "data_position": step, **extra,
            }  # fmt: skip
            path = self.state_path(step)
            tmp = path.with_name(f".tmp-{path.name}")
            torch.save(state, tmp)
            os.replace(tmp, path)
        dist.barrier(self.ctx)
        return path

    def read_state(self, path: Path) -> dict[str, Any]:
        """A state file's contents (stage, step, config, optimisers, RNG)."""
        return torch.load(path, map_location="cpu", weights_only=False)

    def load(self, path: Path, trainables: list[Trainable], state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Restore weights, optimisers and RNG states from a state file; returns the state dict."""
        state = self.read_state(path) if state is None else state
        if state.get("stage") != self.stage:
            raise ConfigError(f"{path} is a checkpoint of stage {state.get('stage')!r}, not {self.stage!r}: "
                              "choose another --out-dir")  # fmt: skip
        for t in trainables:
            sd = load_file(str(self.folder / state["weights"][t.prefix]))
            dist.load_full_state_dict(t.model, sd)
            dist.load_optim_state(t.model, t.opt, state["optimizers"][t.prefix])
        set_rng_state(state["rng"])
        return state

    def finalize(self, step: int, trainables: list[Trainable]) -> list[Path]:
        """Copy the step's weights to ``final.safetensors`` / ``final_critic.safetensors`` (rank 0)."""
        out = []
        if self.ctx.is_main:
            for t in trainables:
                name = "final.safetensors" if t.prefix == "step" else f"final_{t.prefix}.safetensors"
                dst = self.folder / name
                tmp = dst.with_name(f".tmp-{name}")
                shutil.copyfile(self.weights_path(t.prefix, step), tmp)
                os.replace(tmp, dst)
                out.append(dst)
        dist.barrier(self.ctx)
        return out
