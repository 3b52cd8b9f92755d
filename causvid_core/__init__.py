"""causvid_core: streaming autoregressive video diffusion (CausVid) on Wan2.1, without ComfyUI."""

__version__ = "0.1.0"
