"""ComfyUI entry point: ComfyUI imports this folder from custom_nodes/ and reads the mappings.

The library itself lives in ``causvid_core`` and never imports ComfyUI.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
