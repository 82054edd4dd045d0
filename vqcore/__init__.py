"""vqcore: VQ-VAE, AutoencoderKL and VQ-Diffusion in plain PyTorch (no ComfyUI, no diffusers at run time)."""

from .checkpoint import read_state_dict
from .devices import default_device, resolve_dtype
from .errors import CheckpointError, VQCoreError
