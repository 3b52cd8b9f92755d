"""Merge Wan LoRA files into DiT weights: W' = W + strength * (alpha / rank) * up @ down.

Accepted key styles (each followed by ``.lora_down.weight`` / ``.lora_up.weight``, ``.lora_A.weight``
/ ``.lora_B.weight``, optional ``.alpha``, and full-difference ``.diff`` / ``.diff_b`` keys):
``diffusion_model.blocks.0.self_attn.q`` (Wan names, the usual ComfyUI LoRA), the same without a
prefix, ``lora_unet_blocks_0_self_attn_q`` (underscores), and ``transformer.blocks.0.attn1.to_q``
(diffusers names). Every LoRA key is either merged or reported as unmatched with the reason.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import diffusers_to_wan_key, safe_torch_load, wan_to_diffusers_key
from .hub import resolve_source

_ROLES: tuple[tuple[str, str], ...] = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff", "diff"),
    (".dora_scale", "unsupported"), (".lora_mid.weight", "unsupported"),
)  # fmt: skip
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.",
             "lora_unet_", "lycoris_")  # fmt: skip


class LoraError(ValueError):
    """A LoRA that cannot be merged (it matches nothing, or a weight does not fit)."""


@dataclass
class LoraReport:
    """Which modules a LoRA changed and which of its keys were not used (with the reason)."""

    name: str
    strength: float
    num_keys: int
    matched: list[str] = field(default_factory=list)  # Wan module names that were patched
    unmatched: list[tuple[str, str]] = field(default_factory=list)  # (LoRA key, reason)

    def summary(self) -> str:
        """One line, plus the first unmatched keys."""
        line = (
            f"LoRA {self.name} @ {self.strength:g}: {len(self.matched)} modules patched, "
            f"{len(self.unmatched)} of {self.num_keys} keys unmatched"
        )
        shown = [f"{k} ({why})" for k, why in self.unmatched[:10]]
        return line + "".join(f"\n  unmatched: {s}" for s in shown)


def read_lora(source: str | Path) -> dict[str, Tensor]:
    """Tensors of a LoRA file (safetensors, or a pickle read with weights_only=True)."""
    path = resolve_source(source)
    if path.suffix == ".safetensors":
        from .checkpoint import load_safetensors

        return load_safetensors(path)
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise LoraError(f"{path} is not a LoRA state dict (a flat dict of tensors)")
    return obj


def _split_key(key: str) -> tuple[str, str] | None:
    """(raw module name, role) of a LoRA key, or None for an unknown key type."""
    for suffix, role in _ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _module_table(weights: dict[str, Tensor]) -> dict[str, str]:
    """Every accepted spelling of a module name (Wan, diffusers, underscored) -> Wan name."""
    table: dict[str, str] = {}
    for key in weights:
        if not key.endswith(".weight"):
            continue
        name = key[: -len(".weight")]
        table[name] = table[name.replace(".", "_")] = name
        diff = wan_to_diffusers_key(key)
        if diff is not None:
            dname = diff[: -len(".weight")]
            table[dname] = table[dname.replace(".", "_")] = name
    return table


def _resolve(raw: str, table: dict[str, str]) -> str | None:
    name = raw
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    if name in table:
        return table[name]
    mapped = diffusers_to_wan_key(name + ".weight")
    return table.get(mapped[: -len(".weight")]) if mapped else None


def _delta(parts: dict[str, Tensor], weight: Tensor) -> Tensor:
    """alpha / rank * up @ down as a float32 tensor shaped like ``weight`` (raises on misfit)."""
    down, up = parts["down"].float(), parts["up"].float()
    rank = down.shape[0]
    if up.flatten(1).shape[1] != rank:
        raise LoraError(f"lora_up {list(up.shape)} and lora_down {list(down.shape)} disagree on the rank")
    delta = up.flatten(1) @ down.flatten(1)  # [out, r] @ [r, in*k] -> [out, in*k]
    if delta.numel() != weight.numel() or delta.shape[0] != weight.shape[0]:
        raise LoraError(f"up @ down is {list(delta.shape)}, the weight is {list(weight.shape)}")
    scale = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
    return delta.reshape(weight.shape) * scale


def _plan(lora_sd: dict[str, Tensor], table: dict[str, str], report: LoraReport) -> dict[str, dict]:
    """Group LoRA tensors by target module; unknown keys go to the report."""
    groups: dict[str, dict[str, Tensor]] = defaultdict(dict)
    keys: dict[str, list[str]] = defaultdict(list)
    for key, tensor in lora_sd.items():
        split = _split_key(key)
        if split is None:
            report.unmatched.append((key, "not a LoRA key (expected .lora_down/.lora_up/.lora_A/.lora_B)"))
            continue
        module = _resolve(split[0], table)
        if module is None:
            report.unmatched.append((key, "no such module in this model"))
            continue
        groups[module][split[1]] = tensor
        keys[module].append(key)
    return {m: {"parts": groups[m], "keys": keys[m]} for m in groups}


def _new_weights(
    module: str, parts: dict[str, Tensor], weights: dict[str, Tensor], strength: float
) -> dict[str, Tensor]:
    """The patched ``module.weight`` / ``module.bias`` tensors (raises LoraError on misfit)."""
    if "unsupported" in parts:
        raise LoraError("DoRA / LoCon mid keys are not supported")
    if ("down" in parts) != ("up" in parts):
        raise LoraError("lora_down/lora_A without its lora_up/lora_B (or the reverse)")
    out: dict[str, Tensor] = {}
    wkey, bkey = f"{module}.weight", f"{module}.bias"
    weight = weights[wkey]
    delta = torch.zeros((), device=weight.device)
    if "down" in parts:
        delta = delta + _delta(parts, weight).to(weight.device)
    if "diff" in parts:
        if parts["diff"].shape != weight.shape:
            raise LoraError(f"diff {list(parts['diff'].shape)} does not fit weight {list(weight.shape)}")
        delta = delta + parts["diff"].float().to(weight.device)
    if "down" in parts or "diff" in parts:
        out[wkey] = (weight.float() + strength * delta).to(weight.dtype)
    if "diff_b" in parts:
        if bkey not in weights or weights[bkey].shape != parts["diff_b"].shape:
            raise LoraError(f"diff_b {list(parts['diff_b'].shape)} does not fit {bkey}")
        bias = weights[bkey]
        out[bkey] = (bias.float() + strength * parts["diff_b"].float().to(bias.device)).to(bias.dtype)
    if not out:
        raise LoraError("alpha without lora weights")
    return out


def merge_lora(
    target: nn.Module | dict[str, Tensor],
    lora_sd: dict[str, Tensor],
    strength: float = 1.0,
    *,
    name: str = "lora",
) -> LoraReport:
    """Merge a LoRA into a model (in place) or a Wan-named state dict (entries replaced).

    W' = W + strength * (alpha / rank) * up @ down (+ strength * diff); unmatched keys are
    reported (and warned about); a LoRA that matches no weight of the model is an error.
    """
    params = dict(target.named_parameters()) if isinstance(target, nn.Module) else target
    report = LoraReport(name, strength, len(lora_sd))
    for module, item in _plan(lora_sd, _module_table(params), report).items():
        try:
            new = _new_weights(module, item["parts"], params, strength)
        except LoraError as err:
            report.unmatched += [(k, str(err)) for k in item["keys"]]
            continue
        for key, value in new.items():
            if isinstance(target, nn.Module):
                with torch.no_grad():
                    params[key].copy_(value)
            else:
                target[key] = value
        report.matched.append(module)
    if not report.matched:
        examples = ", ".join(f"{k} ({why})" for k, why in report.unmatched[:5])
        raise LoraError(
            f"LoRA {name} matches no weight of this model ({len(lora_sd)} keys, e.g. {examples}). "
            "Expected Wan2.1 DiT LoRA keys such as diffusion_model.blocks.0.self_attn.q.lora_down.weight; "
            "is it a LoRA for another model (or for a different Wan size)?"
        )
    if report.unmatched:
        warnings.warn(report.summary(), stacklevel=2)
    return report
