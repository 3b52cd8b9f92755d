"""Test helpers: small random models laid out like the shipped ones, and the scripts/ modules."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import save_file

from causvid_core.bundle import settings_metadata
from causvid_core.checkpoint import save_model
from causvid_core.config import PRESETS, CausalConfig, DiTConfig, SamplingConfig
from causvid_core.model import CausalWanModel
from causvid_core.text import ShapesTextEncoder
from causvid_core.vae import VAE_PRESETS, WanVAE


def make_embedded(root: Path, name: str = "testshapes", seed: int = 0) -> Path:
    """Write a tiny random DiT + Shapes text encoder as ``root/name`` (use with CAUSVID_EMBEDDED_PATH)."""
    torch.manual_seed(seed)
    tiny = PRESETS["tiny"]
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    model = CausalWanModel(tiny.dit)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    meta = settings_metadata(SamplingConfig(), CausalConfig(chunk_frames=3, window_chunks=2), 16)
    save_model(model, folder / "dit.safetensors", extra_metadata=meta)
    text = ShapesTextEncoder(text_dim=tiny.dit.text_dim, text_len=tiny.dit.text_len, seed=seed)
    save_file(text.state_dict(), str(folder / "text.safetensors"))
    vae = WanVAE(VAE_PRESETS["tiny"])
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(folder / "vae.safetensors"))
    return folder


def comfy_wan(cfg: DiTConfig, device: str | torch.device = "cpu") -> torch.nn.Module:
    """ComfyUI's WanModel at ``cfg``'s sizes, built the way model_base.WAN21 builds it (fp32)."""
    import comfy.ldm.wan.model
    import comfy.ops

    return comfy.ldm.wan.model.WanModel(
        model_type="t2v",
        patch_size=cfg.patch_size,
        text_len=cfg.text_len,
        in_dim=cfg.in_dim,
        dim=cfg.dim,
        ffn_dim=cfg.ffn_dim,
        freq_dim=cfg.freq_dim,
        text_dim=cfg.text_dim,
        out_dim=cfg.out_dim,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        qk_norm=cfg.qk_norm,
        cross_attn_norm=cfg.cross_attn_norm,
        eps=cfg.eps,
        device=device,
        dtype=torch.float32,
        operations=comfy.ops.disable_weight_init,
    )


def load_script(name: str) -> ModuleType:
    """scripts/NAME.py as a module (scripts/ is not a package), for tests of its functions."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_gguf(
    path: Path,
    sd: dict[str, torch.Tensor],
    qtype: int,
    *,
    prefix: str = "",
    arch: str = "wan",
    flatten_5d: bool = True,
) -> dict[str, int]:
    """A GGUF as ComfyUI-GGUF's convert.py writes one: 2-D weights quantised, small and 1-D tensors in F32,
    the 5-D patch embedding flattened with its shape in ``comfy.gguf.orig_shape.NAME`` (or stored whole, as
    its fix_5d_tensors.py does). Returns the type written per key. Needs the ``gguf`` package (test extra)."""
    import gguf

    T = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(str(path), arch=arch)
    types = {}
    for key, value in sd.items():
        data = value.float().numpy()
        kind = T.F32
        if data.ndim == 2 and data.shape[-1] % 32 == 0 and data.size > 1024:
            kind = T(qtype)
        elif data.ndim > 4 and flatten_5d:
            writer.add_array(f"comfy.gguf.orig_shape.{prefix}{key}", [int(d) for d in data.shape])
            data = data.reshape(-1, 64)
        writer.add_tensor(prefix + key, gguf.quants.quantize(data, kind), raw_dtype=kind)
        types[key] = int(kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def vae_round_trip(frames):
    """What embedded:shapes' VAE (CAUSVID_EMBEDDED_PATH's in tests) makes of uint8 [T, H, W, 3] frames:
    encoded, then decoded, as uint8."""
    from causvid_core.bundle import embedded_file
    from causvid_core.vae import load_wan_vae

    vae = load_wan_vae(embedded_file("shapes", "vae"))
    video = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    with torch.no_grad():
        out = vae.decode(vae.encode(video))[0]
    return ((out.permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
