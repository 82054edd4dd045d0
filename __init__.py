"""vqcore node pack for ComfyUI: VQ-VAE, AutoencoderKL and VQ-Diffusion nodes with seamless tiled decoding.

ComfyUI imports this file by path; everything inside the pack is imported relatively.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
