"""Running the models inside the host, for every node: load before compute with a memory estimate, batches in slices
that fit, out of memory → the seamless tiled pass, half-precision NaN/inf → the same work again in fp32, progress,
previews and cancellation. The node classes check their inputs and call these.
"""

import logging
import time
from contextlib import contextmanager
from functools import partial

import torch
from PIL import Image

from ..vqcore import tiling
from ..vqcore.autoencoder_kl import DiagonalGaussian
from ..vqcore.errors import Cancelled, NonFiniteResult
from ..vqcore.sampler import sample
from . import host, sockets

log = logging.getLogger("vqcore")

HALF_DTYPES = (torch.float16, torch.bfloat16)
DEFAULT_FALLBACK_TILE = 512  # pixels; the tile size used when a full decode ran out of memory
BYTES_PER_ACTIVATION = 6  # live copies of the widest feature map at once: input, norm, conv output, residual, slack
PREVIEWS_PER_RUN = 8  # a JPEG preview of the sampler's current estimate about this many times per run
# The sampler node's inputs behind sample()'s arguments, whose checks are the only ones (the rest is the model's).
SAMPLER_INPUTS = {"init_tokens": "tokens", "steps": "steps", "strength": "denoise", "mode": "sampling_mode",
                  "mask": "mask"}


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


def quantize_bytes(model, h: int, w: int, dtype) -> int:
    """The distances of every latent pixel to every codebook vector."""
    return torch.empty((), dtype=dtype).element_size() * h * w * model.num_embeddings


def sampler_bytes(transformer, batch: int) -> int:
    """Activations of one step: hidden states and feed-forward of the token batch (doubled by guidance) and the
    float64 log-softmax over all classes."""
    tokens = 2 * batch * transformer.num_latent_pixels
    width = transformer.config["num_attention_heads"] * transformer.config["attention_head_dim"]
    size = torch.empty((), dtype=transformer.dtype).element_size()
    return tokens * (12 * width * size + 3 * 8 * transformer.num_vector_embeds)


# ---- precision and cancellation ------------------------------------------------------------------------------------

def in_model_dtype(x, handle):
    return x.to(handle.dtype) if x.is_floating_point() else x


def run_in_model_dtype(handle, fn, x):
    return fn(handle.model, in_model_dtype(x, handle))


def redo_in_fp32_on_overflow(handle, what, compute):
    """compute() once; a half-precision result with NaN/inf (the fp16 overflow of SD-family models) → the model
    moves to float32 for good and compute() runs again. In float32 it is vqcore's error naming the cause."""
    try:
        return compute()
    except NonFiniteResult:
        if handle.dtype not in HALF_DTYPES:
            raise
        handle.upcast(what)
        return compute()


@contextmanager
def host_cancellation():
    """vqcore's loops ask host.interrupt_requested between tiles and steps and stop with a Cancelled; the node then
    raises the host's own interrupt exception (which clears the request), so ComfyUI shows "interrupted", not an
    error."""
    try:
        yield
    except Cancelled:
        host.throw_if_interrupted()
        raise


# ---- autoencoders --------------------------------------------------------------------------------------------------

def run_sliced(handle, fn, inputs, per_item_bytes, node_id=None):
    """fn(model, batch slice on the compute device in the model's dtype) for the whole batch, in slices that fit in
    free memory, after the host's memory manager loaded the model; results on the intermediate device."""
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
            out = redo_in_fp32_on_overflow(handle, fn.__name__, partial(run_in_model_dtype, handle, fn, chunk))
        outputs.append((out.float() if out.is_floating_point() else out).to(host.intermediate_device()))
        pbar.update(chunk.shape[0])
    return torch.cat(outputs)


def out_of_memory(error, what, shape):
    """Whether `error` is the device running out of memory, logged as the reason for the tiled retry."""
    if not host.is_oom(error):
        return False
    log.warning("vqcore: out of memory in a full %s of %s; retrying with tiled %s", what, tuple(shape), what)
    return True


def decode(handle, latents=None, indices=None, node_id=None):
    """Full decode of latents (KL: raw latents; VQ: pre-quantisation latents) or VQ token indices → IMAGE.

    Out of device memory → the seamless tiled decode, started after the except block so the failed attempt's
    tensors can be freed first.
    """
    inputs = indices if indices is not None else latents
    per_item = decode_bytes(handle.model, *inputs.shape[-2:], handle.dtype)
    fn = decode_indices if indices is not None else decode_latents
    try:
        return sockets.make_image(run_sliced(handle, fn, inputs, per_item, node_id))
    except Exception as e:
        if not out_of_memory(e, "decode", inputs.shape):
            raise
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
        if not out_of_memory(e, "encode", images.shape):
            raise
    return tiled_encode(handle, images, DEFAULT_FALLBACK_TILE, node_id)


def vq_encode(handle, images, node_id=None):
    """VQ Encode: the continuous latents of `encode` and their codebook indices (B, h, w)."""
    latents = encode(handle, images, node_id)
    per_item = quantize_bytes(handle.model, *latents.shape[-2:], handle.dtype)
    return latents, run_sliced(handle, quantize_latents, latents, per_item)


def encode_latents(model, x):
    return latents_of(model.encode(x))


def quantize_latents(model, latents):
    return model.quantize(latents)[2]


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
    return sockets.make_image(tiled_decode_model_space(handle, latents, tile_size, node_id, quantized))


def tiled_decode_model_space(handle, latents, tile_size, node_id=None, quantized=False):
    """The seamless tiled decode's raw output: NCHW in the model's -1..1 range, on the offload device."""
    cells = tile_size // handle.model.downscale_factor  # the device holds about one tile
    return run_tiled(handle, tiling.tiled_decode, latents, tile_size, decode_bytes(handle.model, cells, cells,
                     handle.dtype), node_id, force_not_quantize=quantized)


def tiled_encode(handle, images, tile_size, node_id=None):
    """Seamless tiled encode, with the full encode's result: KL → posterior mode, VQ → continuous latents."""
    encoded = run_tiled(handle, tiling.tiled_encode, images, tile_size,
                        encode_bytes(handle.model, tile_size, tile_size, handle.dtype), node_id)
    return latents_of(encoded).to(host.intermediate_device())


def run_tiled(handle, tiled_pass, inputs, tile_size, tile_bytes, node_id, **options):
    """A vqcore tiled pass after the memory manager loaded the model for about one tile; progress and cancellation
    per tile, the fp16 redo as for full passes."""
    host.load_models([handle.patcher], tile_bytes)
    pbar = host.progress_bar(1, node_id)

    def run():
        return tiled_pass(handle.model, in_model_dtype(inputs, handle), tile_size=tile_size,
                          progress=lambda done, total: pbar.update_absolute(done, total), should_cancel=host.interrupt_requested,
                          offload_device=host.offload_device("vae"), **options)

    with torch.inference_mode(), host_cancellation():
        return redo_in_fp32_on_overflow(handle, tiled_pass.__name__, run)


# ---- VQ-Diffusion --------------------------------------------------------------------------------------------------

def encode_text(clip, prompts) -> torch.Tensor:
    """Prompts → (P, 77, C) float32 text embeddings on the CPU."""
    host.load_models([clip.patcher])
    with torch.inference_mode():
        return clip.text_encoder.encode(list(prompts)).float().cpu()


def run_sampler(model, prompt, negative, *, steps, mode, node_id=None, **options):
    """vqcore's sample() for a VQ_DIFFUSION_MODEL with its sampling settings: transformer and VQ-VAE loaded first,
    progress per step, a JPEG preview now and then (unless the user turned previews off), stops within one step when
    the queue is cancelled. Returns (indices on the CPU, steps run, seconds)."""
    vq = model.vq
    batch = prompt.shape[0] * options.get("num_images_per_prompt", 1)
    host.load_models([model.patcher, vq.patcher], sampler_bytes(model.transformer, batch))
    pbar = host.progress_bar(model.scheduler.num_train_timesteps if steps is None else steps, node_id)
    preview_size = host.preview_max_size()  # None: the user turned previews off
    preview = Previewer(vq, preview_size) if preview_size else None

    def callback(step, total, current, x0_estimate):
        every = max(1, total // PREVIEWS_PER_RUN)
        due = preview is not None and ((step + 1) % every == 0 or step + 1 == total)
        pbar.update_absolute(step + 1, total, preview(x0_estimate) if due else None)

    start = time.perf_counter()
    with torch.inference_mode(), host_cancellation(), sockets.input_errors("model", SAMPLER_INPUTS):
        indices = sample(model.transformer, model.scheduler, prompt, negative, steps=steps, mode=mode,
                         truncation_rate=model.truncation_rate, prior_rule=model.prior_rule,
                         prior_weight=model.prior_weight, callback=callback,
                         should_cancel=host.interrupt_requested, **options).cpu()
    return indices, pbar.total, time.perf_counter() - start


class Previewer:
    """JPEG previews of the sampler's current x0 estimate: the first image decoded with the pipeline's VQ-VAE."""

    def __init__(self, vq, max_size):
        self.vq, self.max_size = vq, max_size

    def __call__(self, x0_estimate):
        model = self.vq.model
        with torch.inference_mode():
            image = model.decode_indices(x0_estimate[:1].to(model.device))[0].float()
        pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return ("JPEG", Image.fromarray(pixels), self.max_size)
