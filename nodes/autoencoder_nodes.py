"""Loaders for VQ and KL autoencoders, VQ encode/decode, and the seamless tiled VAE decode/encode nodes."""

import time

from ..vqcore.errors import VQCoreError
from ..vqcore.loading import load_autoencoder_kl, load_vqmodel
from ..vqcore.tiling import MIN_TILE_LATENTS
from ..vqcore.vae_layouts import KL_FAMILIES
from . import compute, model_choices, sockets, ui_payloads
from .handles import DTYPE_TOOLTIP, DTYPES, AutoencoderHandle, load_dtype
from .vae_adapter import autoencoder_handle, vae_for_host, vq_handle

TILE_STEP = 32
TILE_TOOLTIP = (f"Tile edge in image pixels, at least {MIN_TILE_LATENTS} latent pixels ({MIN_TILE_LATENTS * 8} for an "
                "8x autoencoder). The result equals the full decode/encode whatever the size; smaller tiles need less "
                "device memory and take a little longer.")
TILE_SIZE = ("INT", {"default": 512, "min": TILE_STEP, "max": 4096, "step": TILE_STEP, "tooltip": TILE_TOOLTIP})


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
        with sockets.input_errors("vq_model_name"):
            model = load_vqmodel(path, device="cpu", dtype=load_dtype(dtype))
        return (AutoencoderHandle(model, vq_model_name),)


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
        with sockets.input_errors("vae_name"):
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
        handle = vq_handle(vq_vae, "vq_vae")
        x = sockets.image_to_model(image, handle.model.downscale_factor, "image")
        latents, indices = compute.vq_encode(handle, x, unique_id)
        return {"ui": {"vqcore_tokens": ui_payloads.token_usage(indices, handle.model.num_embeddings)},
                "result": (sockets.make_latent(latents), sockets.make_tokens(indices, handle))}


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
        handle = vq_handle(vq_vae, "vq_vae")
        one_of(tokens, samples, "tokens/samples")
        if tokens is not None:
            indices = sockets.token_indices(tokens, handle, "tokens")
            return (compute.decode(handle, indices=indices, node_id=unique_id),)
        latents = sockets.latent_samples(samples, handle.model.latent_channels, "samples")
        return (compute.decode(handle, latents=latents, node_id=unique_id),)


def one_of(first, second, input_names):
    if (first is None) == (second is None):
        raise VQCoreError(f"{input_names}: connect exactly one of them (got "
                          f"{'both' if first is not None else 'neither'})")


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
            "tile_size": TILE_SIZE,
        }, "optional": {
            "samples": ("LATENT", {"tooltip": "Latents to decode (KL: raw; VQ: continuous, quantised first). "
                                              "Connect either samples or tokens."}),
            "tokens": ("VQ_TOKENS", {"tooltip": "VQ codebook indices (VQ autoencoders only)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def decode(self, vae, tile_size, samples=None, tokens=None, unique_id=None):
        handle = autoencoder_handle(vae, "vae")
        one_of(samples, tokens, "samples/tokens")
        if tokens is not None:
            if handle.codebook_id is None:
                raise VQCoreError("tokens: VQ_TOKENS need a VQ autoencoder; the connected vae is a KL VAE")
            latents = compute.token_embeddings(handle, sockets.token_indices(tokens, handle, "tokens"))
        else:
            latents = sockets.latent_samples(samples, handle.model.latent_channels, "samples")
        start = time.perf_counter()
        with sockets.input_errors("tile_size"):
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
            "tile_size": TILE_SIZE,
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def encode(self, vae, image, tile_size, unique_id=None):
        handle = autoencoder_handle(vae, "vae")
        x = sockets.image_to_model(image, handle.model.downscale_factor, "image")
        start = time.perf_counter()
        with sockets.input_errors("tile_size"):
            latents = compute.tiled_encode(handle, x, tile_size, unique_id)
        ui = ui_payloads.tiles(x.shape[2:], tile_size, time.perf_counter() - start)
        return {"ui": {"vqcore_tiles": ui}, "result": (sockets.make_latent(latents),)}


NODES = {
    "VQCoreLoadVQModel": (VQCoreLoadVQModel, "Load VQModel"),
    "VQCoreLoadAutoencoderKL": (VQCoreLoadAutoencoderKL, "Load AutoencoderKL"),
    "VQCoreEncode": (VQCoreEncode, "VQ Encode"),
    "VQCoreDecode": (VQCoreDecode, "VQ Decode"),
    "VQCoreTiledVAEDecode": (VQCoreTiledVAEDecode, "Tiled VAE Decode (seamless)"),
    "VQCoreTiledVAEEncode": (VQCoreTiledVAEEncode, "Tiled VAE Encode (seamless)"),
}
