"""Host glue shared by the nodes: device, progress with previews, interrupts, model folders, caches."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAUSVID_FOLDER = "causvid"
GGUF_FOLDER = "causvid_gguf"  # .gguf files of models/diffusion_models (models/unet) and models/causvid
EMBEDDED_MODELS = ("embedded:shapes",)
PREVIEW_MAX = 512
LOG = logging.getLogger("causvid")


def register_folders() -> None:
    """Add ``models/causvid`` (DiT weights of this package) to the host's model folders."""
    if CAUSVID_FOLDER not in folder_paths.folder_names_and_paths:
        path = os.path.join(folder_paths.models_dir, CAUSVID_FOLDER)
        folder_paths.folder_names_and_paths[CAUSVID_FOLDER] = (
            [path],
            set(folder_paths.supported_pt_extensions),
        )
    sync_gguf_folder()


def sync_gguf_folder() -> None:
    """List ``.gguf`` DiTs (ComfyUI-GGUF's Wan files) from the DiT folders under a key of our own, so the host's
    own loaders, which cannot read GGUF, never offer them. Re-run on each refresh to follow added paths."""
    dirs: list[str] = []
    for folder in ("diffusion_models", CAUSVID_FOLDER):
        try:
            dirs += [d for d in folder_paths.get_folder_paths(folder) if d not in dirs]
        except KeyError:
            continue
    folder_paths.folder_names_and_paths[GGUF_FOLDER] = (dirs, {".gguf"})


def model_files(*folders: str) -> list[str]:
    """Files of the given model folders, each listed once."""
    seen: list[str] = []
    for folder in folders:
        try:
            names = folder_paths.get_filename_list(folder)
        except KeyError:
            continue
        seen.extend(n for n in names if n not in seen)
    return seen


def full_path(name: str, *folders: str) -> str:
    """Path of a file chosen in a loader widget, with an error that says where it was looked for."""
    for folder in folders:
        try:
            path = folder_paths.get_full_path(folder, name)
        except KeyError:
            path = None
        if path:
            return path
    where = ", ".join(f"models/{f}" for f in folders if f != GGUF_FOLDER)
    raise FileNotFoundError(
        f"model file '{name}' was not found in {where}: put it there and refresh the page"
    )


def make_room(model: torch.nn.Module, causal: Any, width: int, height: int, batch: int = 1) -> None:
    """Log what the KV cache will hold, and on a GPU ask the host to unload its other models until the cache
    fits; stop with its size and the fixes (before any file) when it still does not."""
    from ..causvid_core.kv_cache import CachePlan

    weight = next(model.parameters())
    layout = getattr(model, "cache_layout", "compact")
    plan = CachePlan(model.config, causal, batch, height // 8, width // 8, weight.dtype, layout)
    LOG.info("CausVid: %s", plan.describe())
    if weight.device.type == "cuda":
        mm.free_memory(int(plan.nbytes * 1.1) + 2**28, weight.device)
    plan.check_fits(weight.device)


def device() -> torch.device:
    return mm.get_torch_device()


def check_interrupt() -> None:
    """Raise the host's interrupt exception if the user pressed Cancel."""
    mm.throw_exception_if_processing_interrupted()


class Progress:
    """Per-chunk progress with an optional preview image, and an interrupt check per step."""

    def __init__(self, total: int) -> None:
        self.total = max(1, total)
        self.bar = comfy.utils.ProgressBar(self.total)

    def chunk_done(self, done: int, preview: tuple[str, Any, int] | None = None) -> None:
        self.bar.update_absolute(done, self.total, preview)
        check_interrupt()

    @staticmethod
    def step(_chunk: int, _step: int, _x0: torch.Tensor) -> None:
        check_interrupt()


def preview_image(frames: torch.Tensor) -> tuple[str, Any, int] | None:
    """The last frame of [B, 3, T, H, W] (-1..1) as the host's preview tuple ("JPEG", PIL image, size)."""
    from PIL import Image

    if frames.ndim != 5 or frames.shape[1] != 3:
        return None
    last = ((frames[0, :, -1].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return "JPEG", Image.fromarray(last.permute(1, 2, 0).cpu().numpy()), PREVIEW_MAX


def latent_preview(latents: torch.Tensor) -> tuple[str, Any, int] | None:
    """A rough RGB picture of the last Wan latent frame through Wan's latent-to-RGB factors."""
    try:
        from comfy.latent_formats import Wan21

        fmt = Wan21()
        factors = torch.tensor(fmt.latent_rgb_factors, dtype=torch.float32)  # [16, 3]
        bias = torch.tensor(fmt.latent_rgb_factors_bias or [0.0, 0.0, 0.0])
    except (ImportError, AttributeError, TypeError):
        return None
    if latents.shape[1] != factors.shape[0]:
        return None
    rgb = torch.einsum("chw,cr->rhw", latents[0, :, -1].float().cpu(), factors) + bias[:, None, None]
    return preview_image(rgb[None, :, None])


class LRU:
    """A tiny cache kept across queue runs (loaded models), evicting the least recently used."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = make()
        self.items[key] = value
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


def file_key(path: str) -> tuple[str, float, int]:
    """Identity of a file for caching: path, modification time and size."""
    if os.path.exists(path):
        st = os.stat(path)
        return path, st.st_mtime, st.st_size
    return path, 0.0, 0
