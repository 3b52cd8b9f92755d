"""ComfyUI nodes: thin glue over causvid_core, collected from the domain modules."""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
