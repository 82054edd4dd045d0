"""Running autoencoders inside the host: memory estimate, load before compute, batch slices, OOM → tiled, fp16 overflow
→ fp32, progress and interrupt. The node classes only pick inputs and call these.
"""

import hashlib
import logging
from contextlib import contextmanager

import torch

from ..vqcore import tiling
from ..vqcore.autoencoder import use_fast_path
from ..vqcore.autoencoder_kl import DiagonalGaussian
from ..vqcore.errors import NonFiniteResult, VQCoreError
from . import host

log = logging.getLogger("vqcore")

HALF_DTYPES = (torch.float16, torch.bfloat16)
DEFAULT_FALLBACK_TILE = 512  # pixels; the tile size used when a full decode ran out of memory
BYTES_PER_ACTIVATION = 6  # live copies of the widest feature map at once: input, norm, conv output, residual, slack


@contextmanager
def input_errors(input_name):
    """Re-raises vqcore's input errors with the node input's name in front, so the UI says which socket is at fault."""
    try:
        yield
    except VQCoreError as e:
        if str(e).startswith(f"{input_name}:"):
            raise
        raise VQCoreError(f"{input_name}: {e}") from e


class AutoencoderHandle:
    """A vqcore VQModel or AutoencoderKL under the host's memory manager (what VQ_VAE carries, and what our VAE
    stand-in wraps)."""

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


# ---- conversions between ComfyUI tensors and model tensors --------------------------------------------------------

def images_to_model(images, factor: int, input_name: str):
    """IMAGE [B,H,W,C] 0..1 → NCHW -1..1, RGB, centre-cropped to a multiple of the model's downscale factor (as
    ComfyUI's VAE Encode does)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise VQCoreError(f"{input_name}: expected an IMAGE tensor [batch, height, width, channels]; got {shape}")
    height, width = images.shape[1:3]
    if height < factor or width < factor:
        raise VQCoreError(f"{input_name}: image {width}x{height} is smaller than the model's downscale factor "
                          f"{factor}; it needs at least {factor}x{factor} pixels")
    h, w = height // factor * factor, width // factor * factor
    top, left = (height - h) // 2, (width - w) // 2
    x = images[:, top:top + h, left:left + w].float()
    x = x[..., :3] if x.shape[-1] != 1 else x.expand(-1, -1, -1, 3)
    return x.movedim(-1, 1) * 2 - 1


def model_to_images(x):
    """NCHW -1..1 → IMAGE [B,H,W,C] float32 0..1 on the host's intermediate device."""
    return ((x.float() + 1) / 2).clamp(0, 1).movedim(1, -1).to(host.intermediate_device()).contiguous()


def check_tokens(tokens, handle, input_name):
    """VQ_TOKENS must come from the same codebook as the decoder that reads them."""
    if not isinstance(tokens, dict) or not isinstance(tokens.get("indices"), torch.Tensor):
        raise VQCoreError(f"{input_name}: expected VQ_TOKENS (a dict with 'indices'); got {type(tokens).__name__}")
    indices = tokens["indices"]
    if indices.ndim != 3 or indices.dtype != torch.long:
        raise VQCoreError(f"{input_name}: indices must be a (batch, height, width) int64 tensor; got "
                          f"{tuple(indices.shape)} {indices.dtype}")
    model = handle.model
    if tokens.get("codebook_id") != handle.codebook_id or tokens.get("num_embeddings") != model.num_embeddings:
        raise VQCoreError(
            f"{input_name}: tokens come from a different codebook ({tokens.get('num_embeddings')} codes, id "
            f"{tokens.get('codebook_id')}) than the VQ model {handle.name!r} ({model.num_embeddings} codes, id "
            f"{handle.codebook_id}); decode them with the model that made them")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= model.num_embeddings):
        raise VQCoreError(f"{input_name}: token values must lie in 0..{model.num_embeddings - 1}; got "
                          f"{int(indices.min())}..{int(indices.max())}")
    return indices


def make_tokens(indices, handle):
    return {"indices": indices.long().cpu(), "num_embeddings": handle.model.num_embeddings,
            "codebook_id": handle.codebook_id}


# ---- memory estimates ----------------------------------------------------------------------------------------------

def decode_bytes(model, h: int, w: int, dtype) -> int:
    """Activation memory of decoding one (h, w) latent: the widest feature map of any level, a few copies of it,
    plus the mid-block attention scores at latent resolution (the math kernel materialises them)."""
    channels = list(reversed(model.config["block_out_channels"]))
    size = torch.empty((), dtype=dtype).element_size()
    widest = max(c * (h * 2 ** i) * (w * 2 ** i) for i, c in enumerate(channels))
    return size * (BYTES_PER_ACTIVATION * widest + (h * w) ** 2)


def encode_bytes(model, height: int, width: int, dtype) -> int:
    factor = model.downscale_factor
    return decode_bytes(model, height // factor, width // factor, dtype)


# ---- running a model over a batch ---------------------------------------------------------------------------------

def run_sliced(handle, fn, inputs, per_item_bytes, node_id=None):
    """fn(model, batch slice on the compute device) for the whole batch, in slices that fit in free memory.

    The model is handed to the host's memory manager first. A half-precision result with NaN/inf (the fp16 overflow
    of SD-family decoders) is computed again in float32; in float32 it is vqcore's error naming the cause.
    """
    host.load_models([handle.patcher], per_item_bytes)
    device = handle.patcher.load_device
    step = max(1, int(host.free_memory_bytes(device) // max(1, per_item_bytes)))
    batch = inputs.shape[0]
    pbar = host.progress_bar(batch, node_id)
    outputs = []
    for start in range(0, batch, step):
        host.throw_if_interrupted()
        chunk = inputs[start:start + step].to(device)
        with torch.inference_mode():
            try:
                out = fn(handle.model, chunk.to(handle.dtype) if chunk.is_floating_point() else chunk)
            except NonFiniteResult:
                if handle.dtype not in HALF_DTYPES:
                    raise
                handle.upcast(fn.__name__)
                out = fn(handle.model, chunk.float() if chunk.is_floating_point() else chunk)
        outputs.append(out.float().to(host.intermediate_device()))
        pbar.update(chunk.shape[0])
    return torch.cat(outputs)


def decode(handle, latents=None, indices=None, node_id=None):
    """Full decode of latents (KL: raw latents; VQ: pre-quantisation latents) or VQ token indices → IMAGE.

    Out of device memory → the seamless tiled decode, started after the except block so the failed attempt's
    tensors can be freed first.
    """
    model = handle.model
    grid = (indices if indices is not None else latents).shape[-2:]
    per_item = decode_bytes(model, grid[0], grid[1], handle.dtype)
    fn = decode_indices if indices is not None else decode_latents
    inputs = indices if indices is not None else latents
    try:
        return model_to_images(run_sliced(handle, fn, inputs, per_item, node_id))
    except Exception as e:
        if not host.is_oom(e):
            raise
        log.warning("vqcore: out of memory in a full decode of %s; retrying with tiled decode", tuple(inputs.shape))
    if indices is not None:
        latents = token_embeddings(handle, indices)
    return tiled_decode(handle, latents, DEFAULT_FALLBACK_TILE, node_id, quantized=indices is not None)


def encode(handle, images, node_id=None):
    """Full encode of model images (NCHW, -1..1): VQ → continuous latents, KL → posterior mode (raw latents, what
    ComfyUI's VAE Encode returns). Out of device memory → the seamless tiled encode."""
    per_item = encode_bytes(handle.model, images.shape[2], images.shape[3], handle.dtype)
    try:
        return run_sliced(handle, encode_latents, images, per_item, node_id)
    except Exception as e:
        if not host.is_oom(e):
            raise
        log.warning("vqcore: out of memory in a full encode of %s; retrying with tiled encode", tuple(images.shape))
    return tiled_encode(handle, images, DEFAULT_FALLBACK_TILE, node_id)


def encode_latents(model, x):
    return latents_of(model.encode(x))


def latents_of(encoded):
    """A KL posterior's mode (what ComfyUI's VAE Encode returns, no sampling, no scaling), or VQ latents as they are."""
    return (encoded.mode() if isinstance(encoded, DiagonalGaussian) else encoded).float()


def token_embeddings(handle, indices):
    """Codebook vectors of tokens, on the offload device (the tiled decoder reads them from there)."""
    host.load_models([handle.patcher])
    with torch.inference_mode():
        return handle.model.indices_to_embeddings(indices.to(handle.patcher.load_device)).to(host.offload_device("vae"))


def decode_latents(model, latents):
    return model.decode(latents)


def decode_indices(model, indices):
    return model.decode_indices(indices)


def tiled_decode(handle, latents, tile_size, node_id=None, quantized=False):
    """Seamless tiled decode (equal to the full decode) → IMAGE; progress and interrupt per tile. quantized: the
    latents are codebook vectors already (decoded tokens), not latents to quantise."""
    return model_to_images(tiled_decode_model_space(handle, latents, tile_size, node_id, quantized))


def tiled_decode_model_space(handle, latents, tile_size, node_id=None, quantized=False):
    """The seamless tiled decode's raw output: NCHW in the model's -1..1 range, on the offload device."""
    cells = tile_size // handle.model.downscale_factor  # the device holds about one tile
    host.load_models([handle.patcher], decode_bytes(handle.model, cells, cells, handle.dtype))
    pbar = host.progress_bar(1, node_id)
    with torch.inference_mode():
        return tiling.tiled_decode(handle.model, latents.to(handle.dtype), tile_size=tile_size,
                                   progress=lambda done, total: pbar.update_absolute(done, total),
                                   should_cancel=interrupted, offload_device=host.offload_device("vae"),
                                   force_not_quantize=quantized)


def tiled_encode(handle, images, tile_size, node_id=None):
    """Seamless tiled encode, with the full encode's result: KL → posterior mode, VQ → continuous latents."""
    host.load_models([handle.patcher], encode_bytes(handle.model, tile_size, tile_size, handle.dtype))
    pbar = host.progress_bar(1, node_id)
    with torch.inference_mode():
        encoded = tiling.tiled_encode(handle.model, images.to(handle.dtype), tile_size=tile_size,
                                      progress=lambda done, total: pbar.update_absolute(done, total),
                                      should_cancel=interrupted, offload_device=host.offload_device("vae"))
    return latents_of(encoded).to(host.intermediate_device())


def interrupted() -> bool:
    """should_cancel hook for vqcore loops: raises the host's interrupt exception itself, so the node stops with
    ComfyUI's "interrupted" status rather than an error."""
    host.throw_if_interrupted()
    return False
