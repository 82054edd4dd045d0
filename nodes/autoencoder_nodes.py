"""Loaders for VQ and KL autoencoders, VQ encode/decode, and the seamless tiled VAE decode/encode nodes."""

import time

import torch

from ..vqcore.devices import resolve_dtype
from ..vqcore.errors import VQCoreError
from ..vqcore.loading import load_autoencoder_kl, load_vqmodel
from ..vqcore.vae_layouts import KL_FAMILIES
from . import compute, host, model_choices, ui_payloads
from .vae_adapter import kl_handle, vae_for_host

DTYPES = ["auto", "fp32", "fp16", "bf16"]
DTYPE_TOOLTIP = ("Weight precision. auto: bf16 where the device computes it natively, else fp32 (ComfyUI's "
                 "--fp16-vae/--bf16-vae/--fp32-vae flags apply). A half-precision result with NaN/inf is "
                 "recomputed in fp32 automatically.")
TILE_TOOLTIP = ("Tile edge in image pixels. The result equals the full decode/encode whatever the size; smaller "
                "tiles need less device memory and take a little longer.")
MIN_TILE = 64


def load_dtype(dtype: str) -> torch.dtype:
    """auto: ComfyUI's VAE dtype choice (honours its --*-vae flags), else vqcore's (bf16 where native, else fp32)."""
    device = host.compute_device("vae")
    if dtype == "auto":
        return host.vae_auto_dtype(device) or resolve_dtype("auto", device)
    return resolve_dtype(dtype, device)


def autoencoder_input(obj, input_name):
    """VQ_VAE or any ComfyUI VAE (ours or core's) → the vqcore handle behind it."""
    if isinstance(obj, compute.AutoencoderHandle):
        return obj
    return kl_handle(obj, input_name)


class VQCoreLoadVQModel:
    DESCRIPTION = ("Loads a VQ-VAE (taming VQGAN, LDM vq-f4/f8/f16, Kandinsky MoVQ, VQ-Diffusion's VQ-VAE) from "
                   "models/vq_models (single files in taming, LDM or diffusers layout) or a diffusers folder in "
                   "models/diffusers. The architecture is read off the weights.")
    CATEGORY = "vqcore/loaders"
    RETURN_TYPES = ("VQ_VAE",)
    RETURN_NAMES = ("vq_vae",)
    OUTPUT_TOOLTIPS = ("The VQ autoencoder, for VQ Encode / VQ Decode and the tiled nodes.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vq_model_name": (model_choices.vq_model_choices(), {
                "tooltip": "A file in models/vq_models, or diffusers:<folder> for a VQModel or a pipeline with a "
                           "vqvae component in models/diffusers."}),
            "dtype": (DTYPES, {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
        }}

    def load(self, vq_model_name, dtype="auto"):
        path = model_choices.resolve(vq_model_name, "vq_models", "vq_model_name")
        with compute.input_errors("vq_model_name"):
            model = load_vqmodel(path, device="cpu", dtype=load_dtype(dtype))
        return (compute.AutoencoderHandle(model, vq_model_name),)


class VQCoreLoadAutoencoderKL:
    DESCRIPTION = ("Loads a KL autoencoder (SD1/SD2/SDXL, SD3, Flux, Playground VAEs) from models/vae, from the VAE "
                   "inside a full checkpoint in models/checkpoints, or from a diffusers folder. The output is a "
                   "regular ComfyUI VAE: VAE Decode, VAE Encode and VAE Decode (Tiled) accept it, latents are raw "
                   "and unscaled as everywhere in ComfyUI.")
    CATEGORY = "vqcore/loaders"
    RETURN_TYPES = ("VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("A ComfyUI VAE (raw, unscaled latents).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (model_choices.kl_choices(), {
                "tooltip": "A file in models/vae, checkpoints:<file> for the VAE inside a full checkpoint, or "
                           "diffusers:<folder> for a diffusers AutoencoderKL or pipeline folder."}),
            "family": (["auto", *KL_FAMILIES], {
                "default": "auto",
                "tooltip": "Model family, for the latent scaling constants that the weights cannot tell (SD1 vs "
                           "SDXL, SD3 vs Flux). auto: a folder's config.json, else a guess from the checkpoint "
                           "and file name."}),
            "dtype": (DTYPES, {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
        }}

    def load(self, vae_name, family="auto", dtype="auto"):
        path = model_choices.resolve(vae_name, "vae", "vae_name")
        with compute.input_errors("vae_name"):
            model = load_autoencoder_kl(path, device="cpu", dtype=load_dtype(dtype), family=family)
        return (vae_for_host(model, vae_name),)


class VQCoreEncode:
    DESCRIPTION = ("Encodes images with a VQ autoencoder: the continuous latents before quantisation (LATENT) and "
                   "the codebook indices (VQ_TOKENS). Images are centre-cropped to a multiple of the model's "
                   "downscale factor.")
    CATEGORY = "vqcore/vq"
    RETURN_TYPES = ("LATENT", "VQ_TOKENS")
    RETURN_NAMES = ("latent", "tokens")
    OUTPUT_TOOLTIPS = ("Continuous latents before quantisation, [B, E, H/f, W/f].",
                       "Codebook indices [B, H/f, W/f] with the codebook's size and identity.")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vq_vae": ("VQ_VAE", {"tooltip": "The VQ autoencoder (Load VQModel or Load VQ-Diffusion Checkpoint)."}),
            "image": ("IMAGE", {"tooltip": "Images to encode, at least the model's downscale factor in size."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def encode(self, vq_vae, image, unique_id=None):
        handle = autoencoder_input(vq_vae, "vq_vae")
        if handle.codebook_id is None:
            raise VQCoreError("vq_vae: expected a VQ autoencoder; this one has no codebook")
        x = compute.images_to_model(image, handle.model.downscale_factor, "image")
        latents = compute.encode(handle, x, unique_id)
        with torch.inference_mode():
            host.load_models([handle.patcher])
            z = latents.to(handle.patcher.load_device, handle.dtype)
            indices = handle.model.quantize(z)[2].cpu()
        tokens = compute.make_tokens(indices, handle)
        return {"ui": {"vqcore_tokens": ui_payloads.token_usage(indices, handle.model.num_embeddings)},
                "result": ({"samples": latents}, tokens)}


class VQCoreDecode:
    DESCRIPTION = ("Decodes VQ_TOKENS or continuous LATENT (quantised first) with a VQ autoencoder into images. "
                   "Batches are decoded in slices that fit in memory; out of memory falls back to the seamless "
                   "tiled decode.")
    CATEGORY = "vqcore/vq"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("Decoded images, [B, H, W, 3] in 0..1.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vq_vae": ("VQ_VAE", {"tooltip": "The VQ autoencoder whose codebook the tokens/latents belong to."}),
        }, "optional": {
            "tokens": ("VQ_TOKENS", {"tooltip": "Codebook indices to decode (from VQ Encode or the VQ-Diffusion "
                                                "Sampler). Connect either tokens or samples."}),
            "samples": ("LATENT", {"tooltip": "Continuous latents from VQ Encode; they are quantised before "
                                              "decoding. Connect either tokens or samples."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def decode(self, vq_vae, tokens=None, samples=None, unique_id=None):
        handle = autoencoder_input(vq_vae, "vq_vae")
        if handle.codebook_id is None:
            raise VQCoreError("vq_vae: expected a VQ autoencoder; this one has no codebook")
        if (tokens is None) == (samples is None):
            raise VQCoreError("tokens/samples: connect exactly one of them (got "
                              f"{'both' if tokens is not None else 'neither'})")
        if tokens is not None:
            return (compute.decode(handle, indices=compute.check_tokens(tokens, handle, "tokens"), node_id=unique_id),)
        latents = latent_samples(samples, handle.model.latent_channels, "samples")
        return (compute.decode(handle, latents=latents, node_id=unique_id),)


def latent_samples(samples, channels, input_name):
    latents = samples.get("samples") if isinstance(samples, dict) else None
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != channels:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise VQCoreError(f"{input_name}: expected a LATENT with [batch, {channels}, h, w] samples for this model; "
                          f"got {shape}")
    return latents


class VQCoreTiledVAEDecode:
    DESCRIPTION = ("Decodes tile by tile with a result equal to the full decode: normalisation statistics are "
                   "shared across tiles and each tile carries the halo its convolutions need, so there are no "
                   "seams or tone shifts. The device holds about one tile. Takes our VAEs, ComfyUI's "
                   "SD-family VAEs and VQ_VAEs.")
    CATEGORY = "vqcore/tiled"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("Decoded images, [B, H, W, 3] in 0..1.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("VAE,VQ_VAE", {"tooltip": "A KL VAE (any loader) or a VQ autoencoder."}),
            "tile_size": ("INT", {"default": 512, "min": MIN_TILE, "max": 4096, "step": 32, "tooltip": TILE_TOOLTIP}),
        }, "optional": {
            "samples": ("LATENT", {"tooltip": "Latents to decode (KL: raw; VQ: continuous, quantised first). "
                                              "Connect either samples or tokens."}),
            "tokens": ("VQ_TOKENS", {"tooltip": "VQ codebook indices (VQ autoencoders only)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def decode(self, vae, tile_size, samples=None, tokens=None, unique_id=None):
        handle = autoencoder_input(vae, "vae")
        if (tokens is None) == (samples is None):
            raise VQCoreError("samples/tokens: connect exactly one of them (got "
                              f"{'both' if tokens is not None else 'neither'})")
        if tokens is not None:
            if handle.codebook_id is None:
                raise VQCoreError("tokens: VQ_TOKENS need a VQ autoencoder; the connected vae is a KL VAE")
            latents = compute.token_embeddings(handle, compute.check_tokens(tokens, handle, "tokens"))
        else:
            latents = latent_samples(samples, handle.model.latent_channels, "samples")
        start = time.perf_counter()
        with compute.input_errors("tile_size"):
            image = compute.tiled_decode(handle, latents, tile_size, unique_id, quantized=tokens is not None)
        ui = ui_payloads.tiles(image.shape[1:3], tile_size, time.perf_counter() - start)
        return {"ui": {"vqcore_tiles": ui}, "result": (image,)}


class VQCoreTiledVAEEncode:
    DESCRIPTION = ("Encodes tile by tile with a result equal to the full encode (shared normalisation statistics, "
                   "halos instead of blending). KL VAEs give the posterior mode (raw latents), VQ autoencoders the "
                   "continuous latents before quantisation.")
    CATEGORY = "vqcore/tiled"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Latents [B, C, H/f, W/f], raw and unscaled.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("VAE,VQ_VAE", {"tooltip": "A KL VAE (any loader) or a VQ autoencoder."}),
            "image": ("IMAGE", {"tooltip": "Images to encode, centre-cropped to a multiple of the downscale factor."}),
            "tile_size": ("INT", {"default": 512, "min": MIN_TILE, "max": 4096, "step": 32, "tooltip": TILE_TOOLTIP}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def encode(self, vae, image, tile_size, unique_id=None):
        handle = autoencoder_input(vae, "vae")
        x = compute.images_to_model(image, handle.model.downscale_factor, "image")
        start = time.perf_counter()
        with compute.input_errors("tile_size"):
            latents = compute.tiled_encode(handle, x, tile_size, unique_id)
        ui = ui_payloads.tiles(x.shape[2:], tile_size, time.perf_counter() - start)
        return {"ui": {"vqcore_tiles": ui}, "result": ({"samples": latents},)}


NODES = {
    "VQCoreLoadVQModel": (VQCoreLoadVQModel, "Load VQModel"),
    "VQCoreLoadAutoencoderKL": (VQCoreLoadAutoencoderKL, "Load AutoencoderKL"),
    "VQCoreEncode": (VQCoreEncode, "VQ Encode"),
    "VQCoreDecode": (VQCoreDecode, "VQ Decode"),
    "VQCoreTiledVAEDecode": (VQCoreTiledVAEDecode, "Tiled VAE Decode (seamless)"),
    "VQCoreTiledVAEEncode": (VQCoreTiledVAEEncode, "Tiled VAE Encode (seamless)"),
}
