"""ComfyUI entry point: ComfyUI imports this folder from custom_nodes/ and reads the mappings.

The library itself lives in ``causvid_core`` and never imports ComfyUI. Outside the host (this
folder imported as a plain package, e.g. by test runners) there are no nodes to register.
"""

try:
    import folder_paths  # noqa: F401  (a module only the ComfyUI host provides)
except ImportError:
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
