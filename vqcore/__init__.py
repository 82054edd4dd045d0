"""vqcore: VQ-VAE, AutoencoderKL and VQ-Diffusion in plain PyTorch (no ComfyUI, no diffusers at run time).

    import vqcore
    vae = vqcore.load_autoencoder_kl("sdxl_vae.safetensors", family="sdxl")     # any layout, config from shapes
    vq = vqcore.use_fast_path(vqcore.load_vqmodel("vqgan_f16.ckpt"))  # faster; default: diffusers' exact bits
    pipe = vqcore.load_vq_diffusion("vq-diffusion-ithq")                        # diffusers folder layout
"""

from .autoencoder import use_fast_path
from .autoencoder_kl import AutoencoderKL, DiagonalGaussian
from .checkpoint import read_state_dict
from .devices import default_device, resolve_dtype
from .errors import Cancelled, CheckpointError, VQCoreError
from .loading import load_autoencoder, load_autoencoder_kl, load_vqmodel
from .sampler import MODES, PRIOR_RULES, SamplingCancelled, sample
from .scheduler import VQDiffusionScheduler
from .text_encoder import VQTextEncoder
from .tiling import TilingCancelled, tiled_decode, tiled_encode
from .transformer import VQDiffusionTransformer
from .truncation import truncate
from .vae_layouts import FAMILY_NAMES, KL_FAMILIES, infer_config, to_diffusers_names, to_ldm_names
from .vq_diffusion import VQDiffusionModel, load_vq_diffusion
from .vq_model import VectorQuantizer, VQModel

__all__ = [
    "use_fast_path",
    "AutoencoderKL",
    "DiagonalGaussian",
    "read_state_dict",
    "default_device",
    "resolve_dtype",
    "Cancelled",
    "CheckpointError",
    "VQCoreError",
    "load_autoencoder",
    "load_autoencoder_kl",
    "load_vqmodel",
    "MODES",
    "PRIOR_RULES",
    "SamplingCancelled",
    "sample",
    "VQDiffusionScheduler",
    "VQTextEncoder",
    "TilingCancelled",
    "tiled_decode",
    "tiled_encode",
    "VQDiffusionTransformer",
    "truncate",
    "FAMILY_NAMES",
    "KL_FAMILIES",
    "infer_config",
    "to_diffusers_names",
    "to_ldm_names",
    "VQDiffusionModel",
    "load_vq_diffusion",
    "VectorQuantizer",
    "VQModel",
]
