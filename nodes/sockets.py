"""The data socket types the nodes pass between them, each made and checked here: IMAGE, LATENT, MASK, VQ_TOKENS,
VQ_CONDITIONING. A check takes what arrived at a node input and gives the tensor the models read, or a VQCoreError
that starts with the input's name, so the UI says which socket is at fault. Model sockets (VQ_VAE, VQ_CLIP,
VQ_DIFFUSION_MODEL) carry the handles of handles.py; VAE is ComfyUI's (vae_adapter.py)."""

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..vqcore.errors import VQCoreError
from . import host


@contextmanager
def input_errors(input_name, arguments=None):
    """Re-raises vqcore's input errors with the node input's name in front. arguments: {vqcore argument name: node
    input}, for a call whose errors can come from several inputs (vqcore's messages start with the argument)."""
    try:
        yield
    except VQCoreError as e:
        message = str(e)
        name = next((node_input for argument, node_input in (arguments or {}).items()
                     if message.startswith(f"{argument} ")), input_name)
        if message.startswith(f"{name}:"):
            raise
        raise VQCoreError(f"{name}: {message}") from e


def describe(value):
    """How an unexpected input shows in an error: a tensor's shape, else its type."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


# ---- IMAGE: [B, H, W, C] float 0..1 -----------------------------------------------------------------------------

def image_to_model(images, factor: int, input_name: str):
    """IMAGE → NCHW -1..1, RGB, centre-cropped to a multiple of the model's downscale factor (as ComfyUI's VAE Encode
    does)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise VQCoreError(f"{input_name}: expected an IMAGE tensor [batch, height, width, channels]; got "
                          f"{describe(images)}")
    height, width = images.shape[1:3]
    if height < factor or width < factor:
        raise VQCoreError(f"{input_name}: image {width}x{height} is smaller than the model's downscale factor "
                          f"{factor}; it needs at least {factor}x{factor} pixels")
    h, w = height // factor * factor, width // factor * factor
    top, left = (height - h) // 2, (width - w) // 2
    x = images[:, top:top + h, left:left + w].float()
    x = x[..., :3] if x.shape[-1] != 1 else x.expand(-1, -1, -1, 3)
    return x.movedim(-1, 1) * 2 - 1


def make_image(x):
    """NCHW -1..1 → IMAGE, float32 on the host's intermediate device."""
    return ((x.float() + 1) / 2).clamp(0, 1).movedim(1, -1).to(host.intermediate_device()).contiguous()


# ---- LATENT: {"samples": [B, C, h, w]}, raw and unscaled -------------------------------------------------------

def latent_samples(samples, channels: int, input_name: str):
    latents = samples.get("samples") if isinstance(samples, dict) else None
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != channels:
        raise VQCoreError(f"{input_name}: expected a LATENT with [batch, {channels}, h, w] samples for this model; "
                          f"got {describe(latents)}")
    return latents


def make_latent(latents):
    return {"samples": latents}


# ---- MASK: [B, H, W] or [H, W], > 0.5 is masked ----------------------------------------------------------------

def token_mask(mask, grid, factor: int, batch: int, input_name: str = "mask"):
    """MASK at image size (token grid × downscale factor) or at token-grid size → bool (B, h, w): a token is
    regenerated when any pixel of its patch is masked. An image-size mask may be up to factor - 1 pixels larger: it
    then comes from the image that VQ Encode centre-cropped, and is cropped the same way."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        raise VQCoreError(f"{input_name}: expected a MASK tensor [batch, height, width]; got {describe(mask)}")
    mask = (mask[None] if mask.ndim == 2 else mask).float()
    (h, w), (height, width) = grid, mask.shape[1:]
    if (height // factor, width // factor) == (h, w):
        top, left = (height - h * factor) // 2, (width - w * factor) // 2
        mask = F.max_pool2d(mask[:, None, top:top + h * factor, left:left + w * factor], factor)[:, 0]
    elif (height, width) != (h, w):
        raise VQCoreError(f"{input_name}: size {width}x{height} fits neither the image ({w * factor}x{h * factor}) "
                          f"nor the token grid ({w}x{h})")
    if mask.shape[0] not in (1, batch):
        raise VQCoreError(f"{input_name}: batch of {mask.shape[0]} masks for {batch} images")
    return mask > 0.5


# ---- VQ_TOKENS: {"indices": (B, h, w) int64, "num_embeddings", "codebook_id"} -----------------------------------

def token_indices(tokens, vq, input_name: str):
    """The indices of VQ_TOKENS, which must come from the same codebook as the VQ model (handle) that reads them."""
    if not isinstance(tokens, dict) or not isinstance(tokens.get("indices"), torch.Tensor):
        raise VQCoreError(f"{input_name}: expected VQ_TOKENS (a dict with 'indices'); got {type(tokens).__name__}")
    indices = tokens["indices"]
    if indices.ndim != 3 or indices.dtype != torch.long:
        raise VQCoreError(f"{input_name}: indices must be a (batch, height, width) int64 tensor; got "
                          f"{tuple(indices.shape)} {indices.dtype}")
    codes = vq.model.num_embeddings
    if tokens.get("codebook_id") != vq.codebook_id or tokens.get("num_embeddings") != codes:
        raise VQCoreError(
            f"{input_name}: tokens come from a different codebook ({tokens.get('num_embeddings')} codes, id "
            f"{tokens.get('codebook_id')}) than the VQ model {vq.name!r} ({codes} codes, id {vq.codebook_id}); "
            f"decode them with the model that made them")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= codes):
        raise VQCoreError(f"{input_name}: token values must lie in 0..{codes - 1}; got "
                          f"{int(indices.min())}..{int(indices.max())}")
    return indices


def make_tokens(indices, vq):
    return {"indices": indices.long().cpu(), "num_embeddings": vq.model.num_embeddings,
            "codebook_id": vq.codebook_id}


# ---- VQ_CONDITIONING: {"embeddings": (P, 77, C), "texts": [P prompts]} -------------------------------------------

def conditioning_embeddings(cond, width: int, input_name: str):
    """The (P, 77, C) embeddings of a VQ_CONDITIONING, checked against the transformer's text width C."""
    embeddings = cond.get("embeddings") if isinstance(cond, dict) else None
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 3 or embeddings.shape[-1] != width:
        raise VQCoreError(f"{input_name}: expected VQ_CONDITIONING with [prompts, 77, {width}] embeddings for this "
                          f"model; got {describe(embeddings if isinstance(embeddings, torch.Tensor) else cond)}")
    return embeddings


def make_conditioning(embeddings, texts):
    return {"embeddings": embeddings, "texts": list(texts)}
