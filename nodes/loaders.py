"""Loader nodes: the causal DiT (with LoRA) and the Wan VAE."""

from __future__ import annotations

from ..causvid_core.attention import ATTENTION_BACKENDS
from ..causvid_core.bundle import load_bundle
from .common import (
    EMBEDDED_MODELS,
    GGUF_FOLDER,
    LRU,
    device,
    file_key,
    full_path,
    model_files,
    register_folders,
    sync_gguf_folder,
)

register_folders()

PRECISIONS = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_MODELS = LRU(size=2)


def _precision(name: str, dev) -> str | None:
    if name == "auto":
        return "bfloat16" if dev.type == "cuda" else "float32"
    return PRECISIONS[name]


class CausVidLoadModel:
    DESCRIPTION = (
        "Load a causal (CausVid) Wan2.1 transformer for streaming generation: the embedded Shapes model, a file "
        "from models/diffusion_models or models/causvid (CausVid model.pt, Wan, ComfyUI fp16/bf16/fp8, GGUF "
        "Q8_0-Q2_K, diffusers), "
        "or a Hugging Face reference. Optional LoRA merged at a strength. Cached across queue runs."
    )
    CATEGORY = "CausVid/loaders"
    RETURN_TYPES = ("CAUSVID_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        sync_gguf_folder()
        names = list(EMBEDDED_MODELS) + model_files("diffusion_models", "causvid", GGUF_FOLDER)
        return {
            "required": {
                "model_name": (names, {"tooltip": "embedded:shapes runs on any CPU; others are Wan2.1 DiT files"}),
                "precision": (list(PRECISIONS), {"default": "auto", "tooltip": "auto: bf16 on a GPU, fp32 on a CPU"}),
                "attention": (list(ATTENTION_BACKENDS), {"default": "auto", "tooltip": "scaled-dot-product kernel"}),
                "chunk_frames": ("INT", {"default": 0, "min": 0, "max": 16,
                                         "tooltip": "latent frames per chunk; 0 = from the file (3 for CausVid)"}),
                "denoising_steps": ("STRING", {"default": "",
                                               "tooltip": "few-step list, e.g. 1000, 757, 522; empty = from the file"}),
            },
            "optional": {
                "hf_reference": ("STRING", {"default": "", "tooltip": "hf://owner/repo/path; overrides model_name"}),
                "lora_name": (["None"] + model_files("loras"), {"default": "None"}),
                "lora_strength": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05}),
                "speed": ("STRING", {"default": "", "tooltip": "speed options, comma list: ring, fused_qkv, "
                                     "compile, fp8 (CUDA); empty = the reference path"}),
            },
        }  # fmt: skip

    def load(
        self, model_name, precision, attention, chunk_frames, denoising_steps,
        hf_reference="", lora_name="None", lora_strength=1.0, speed="",
    ):  # fmt: skip
        dev = device()
        if hf_reference.strip():
            source = hf_reference.strip()
        elif model_name.startswith("embedded:"):
            source = model_name
        else:
            source = full_path(model_name, "diffusion_models", "causvid", GGUF_FOLDER)
        lora = [(full_path(lora_name, "loras"), lora_strength)] if lora_name != "None" else None
        key = (file_key(source), precision, attention, chunk_frames, denoising_steps, str(lora), str(dev),
               speed.strip())  # fmt: skip

        def build():
            bundle = load_bundle(
                source, dtype=_precision(precision, dev), device=dev, attention=attention,
                chunk_frames=chunk_frames or None, denoising_steps=denoising_steps.strip() or None, lora=lora,
            )  # fmt: skip
            bundle.model.set_speed(speed)
            return bundle

        return (_MODELS.get(key, build),)


NODE_CLASS_MAPPINGS = {"CausVid_LoadModel": CausVidLoadModel}
NODE_DISPLAY_NAME_MAPPINGS = {"CausVid_LoadModel": "Load CausVid"}
