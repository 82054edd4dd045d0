"""What the model sockets carry: a vqcore model under the host's memory manager, with its name for messages.

VQ_VAE → AutoencoderHandle (also inside our VAEs, see vae_adapter.py), VQ_CLIP → TextEncoderHandle,
VQ_DIFFUSION_MODEL → VQDiffusionHandle. Running them is compute.py's job; the loaders' precision choice is here.
"""

import copy
import hashlib
import logging

import torch

from ..vqcore.autoencoder import use_fast_path
from ..vqcore.devices import resolve_dtype
from ..vqcore.errors import VQCoreError
from . import host

log = logging.getLogger("vqcore")

DTYPES = ["auto", "fp32", "fp16", "bf16"]
DTYPE_TOOLTIP = ("Weight precision. auto: bf16 where the device computes it natively, else fp32 (ComfyUI's "
                 "--fp16-vae/--bf16-vae/--fp32-vae flags apply). A half-precision result with NaN/inf is "
                 "recomputed in fp32 automatically.")


def load_dtype(dtype: str) -> torch.dtype:
    """The loaders' dtype widget → torch dtype. auto: ComfyUI's VAE dtype choice (honours its --*-vae flags), else
    vqcore's "auto" (bf16 where the device computes it natively, else fp32)."""
    device = host.compute_device("vae")
    if dtype == "auto":
        return host.vae_auto_dtype(device) or resolve_dtype("auto", device)
    return resolve_dtype(dtype, device)


class AutoencoderHandle:
    """A vqcore VQModel or AutoencoderKL (what VQ_VAE carries, and what our VAE stand-in wraps)."""

    def __init__(self, model, name):
        # Node users get the fast path: it differs from diffusers' bits far below what 8-bit images can show.
        self.patcher = host.wrap_model(use_fast_path(model), "vae")
        self.name = name
        self.codebook_id = codebook_id(model) if hasattr(model, "quantize") else None

    @property
    def model(self):
        return host.unwrap(self.patcher)

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def upcast(self, why):
        log.warning("vqcore: %s produced NaN/inf in %s; computing again in float32 (%s stays in float32 from now on)",
                    why, str(self.dtype).replace("torch.", ""), self.name)
        self.model.to(torch.float32)


def codebook_id(model) -> str:
    """Identifies a codebook by its content, so tokens are only decoded by a model that shares their codebook."""
    weight = model.quantize.embedding.weight.detach().float().cpu().contiguous()
    return hashlib.sha1(weight.numpy().tobytes()).hexdigest()[:16]


class TextEncoderHandle:
    """What VQ_CLIP carries: the tokenizer + CLIP text model, the model under the host's memory manager."""

    SOCKET = "VQ_CLIP"

    def __init__(self, text_encoder, name):
        self.text_encoder = text_encoder
        self.patcher = host.wrap_model(text_encoder.text_model, "text")
        self.name = name


class VQDiffusionHandle:
    """What VQ_DIFFUSION_MODEL carries: the transformer under the memory manager, the schedule, the null text
    embeddings, the pipeline's VQ-VAE and text encoder, and the sampling settings patch nodes change (on a copy)."""

    SOCKET = "VQ_DIFFUSION_MODEL"

    def __init__(self, bundle, name, vq: AutoencoderHandle, clip: TextEncoderHandle):
        self.patcher = host.wrap_model(bundle.transformer, "diffusion")
        self.scheduler = bundle.scheduler
        self.null_embeddings = None if bundle.null_embeddings is None else bundle.null_embeddings.float().cpu()
        self.vq, self.clip, self.name = vq, clip, name
        self.truncation_rate, self.prior_rule, self.prior_weight = 1.0, "purity", 1.0

    @property
    def transformer(self):
        return host.unwrap(self.patcher)

    def patched(self, **settings):
        """A copy sharing the weights, with other sampling settings (as ComfyUI's ModelPatcher.clone())."""
        clone = copy.copy(self)
        clone.__dict__.update(settings)
        return clone


def checked(handle, handle_class, input_name):
    """A VQ-Diffusion model socket's handle, or an error naming the input (both come from one loader)."""
    if not isinstance(handle, handle_class):
        raise VQCoreError(f"{input_name}: expected {handle_class.SOCKET} from Load VQ-Diffusion Checkpoint; got "
                          f"{type(handle).__name__}")
    return handle
