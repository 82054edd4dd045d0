"""What a VAE socket carries for our AutoencoderKL loader: a real comfy.sd.VAE where ComfyUI can express the
architecture, otherwise a stand-in with the members ComfyUI's VAE nodes use (decode, encode, their tiled variants,
compression ratios, get_sd, ...). Latents are raw and unscaled, as everywhere in ComfyUI.

Either way the VAE is tied to the vqcore model it was made from once, at load (`vqcore_handle`), and its tiled
decode is vqcore's seamless one: core's VAE Decode (Tiled) and core's out-of-memory retry reach it on hosts with the
`handles_tiling` hook (ComfyUI 0.33+). VAEs from ComfyUI's own loaders go the other way once: their weights become a
vqcore model (kl_handle), which is how the Seamless VAE node and our tiled nodes take them. autoencoder_handle and
vq_handle give the AutoencoderHandle behind whatever reaches a VAE or VQ_VAE input.
"""

import copy

import torch

from ..vqcore.autoencoder_kl import AutoencoderKL
from ..vqcore.errors import VQCoreError
from ..vqcore.vae_layouts import infer_config, to_diffusers_names, to_ldm_names
from . import compute, host, sockets
from .handles import AutoencoderHandle

COMFY_NORM_GROUPS = 32  # ComfyUI's LDM Encoder/Decoder hard-code GroupNorm(32), SiLU and a mid-block attention


class VAEAdapter:
    """ComfyUI's VAE interface over a vqcore AutoencoderKL; decode/encode go through compute (memory manager,
    batch slices, OOM → seamless tiles, fp16 overflow → fp32)."""

    latent_dim = 2
    output_channels = 3
    handles_tiling = True

    def __init__(self, handle: AutoencoderHandle):
        self.vqcore_handle = handle
        model = handle.model
        self.first_stage_model = model
        self.patcher = handle.patcher
        self.device = handle.patcher.load_device
        self.output_device = host.intermediate_device()
        self.downscale_ratio = self.upscale_ratio = model.downscale_factor
        self.latent_channels = model.latent_channels
        self.memory_used_decode = lambda shape, dtype: compute.decode_bytes(model, shape[2], shape[3], dtype)
        self.memory_used_encode = lambda shape, dtype: compute.encode_bytes(model, shape[2], shape[3], dtype)

    @property
    def vae_dtype(self):
        return self.vqcore_handle.dtype

    def throw_exception_if_invalid(self):
        pass

    def spacial_compression_decode(self):
        return self.upscale_ratio

    def spacial_compression_encode(self):
        return self.downscale_ratio

    def temporal_compression_decode(self):
        return None

    def get_sd(self):
        return self.first_stage_model.state_dict()

    def decode(self, samples, vae_options=None):
        self.check_latents(samples)
        return compute.decode(self.vqcore_handle, latents=samples)

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        self.check_latents(samples)
        return compute.tiled_decode(self.vqcore_handle, samples, tile_pixels(self.vqcore_handle, tile_x, tile_y))

    def encode(self, pixel_samples):
        return compute.encode(self.vqcore_handle, sockets.image_to_model(pixel_samples, self.downscale_ratio, "pixels"))

    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        x = sockets.image_to_model(pixel_samples, self.downscale_ratio, "pixels")
        return compute.tiled_encode(self.vqcore_handle, x, max(tile_x or 512, tile_y or 512))

    def check_latents(self, samples):
        if samples.ndim != 4 or samples.shape[1] != self.latent_channels:
            raise VQCoreError(f"samples: this VAE takes latents with {self.latent_channels} channels "
                                      f"[batch, {self.latent_channels}, h, w]; got {tuple(samples.shape)}")


def comfy_config(config: dict):
    """ComfyUI's LDM AutoencoderKL config for a vqcore KL config, or None when ComfyUI's fixed blocks cannot
    express it (other group count or activation, no mid-block attention, level widths not multiples of the first,
    attention at different levels in encoder and decoder)."""
    widths = config["block_out_channels"]
    levels = len(widths)
    encoder_attention = ["Attn" in t for t in config["down_block_types"]]
    decoder_attention = ["Attn" in t for t in reversed(config["up_block_types"])]
    if (config["norm_num_groups"] != COMFY_NORM_GROUPS or config["act_fn"] not in ("silu", "swish")
            or not config["mid_block_add_attention"] or any(w % widths[0] for w in widths)
            or encoder_attention != decoder_attention):
        return None
    # ComfyUI places in-level attention by feature-map size: level i runs at resolution / 2**i.
    resolution = 2 ** levels
    ddconfig = {"double_z": True, "z_channels": config["latent_channels"], "resolution": resolution,
                "in_channels": config["in_channels"], "out_ch": config["out_channels"], "ch": widths[0],
                "ch_mult": [w // widths[0] for w in widths], "num_res_blocks": config["layers_per_block"],
                "attn_resolutions": [resolution // 2 ** i for i in range(levels) if encoder_attention[i]],
                "dropout": 0.0}
    return {"params": {"embed_dim": config["latent_channels"], "ddconfig": ddconfig}}


def ldm_state_dict(model: AutoencoderKL) -> dict:
    """The model's weights in LDM names, with identity quant convs where the model has none (SD3/Flux), because
    ComfyUI's LDM AutoencoderKL always has them."""
    state = to_ldm_names(model.state_dict())
    latent = model.latent_channels
    for name, channels in (("quant_conv", 2 * latent), ("post_quant_conv", latent)):
        if f"{name}.weight" not in state:
            state[f"{name}.weight"] = torch.eye(channels, dtype=model.dtype)[:, :, None, None]
            state[f"{name}.bias"] = torch.zeros(channels, dtype=model.dtype)
    return state


def tile_pixels(handle, tile_x, tile_y) -> int:
    """Our tile edge in pixels for ComfyUI's tile arguments (latent cells, 64 by default); our tiling is seamless,
    so the overlap arguments do not matter."""
    return max(tile_x or 64, tile_y or 64) * handle.model.downscale_factor


def seamless_decode_tiled(handle):
    """The `first_stage_model.decode_tiled` that ComfyUI 0.33+ calls for a VAE with handles_tiling: the seamless
    tiled decode, in the model's -1..1 range (ComfyUI maps it to 0..1 itself)."""
    def decode_tiled(samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        return compute.tiled_decode_model_space(handle, samples, tile_pixels(handle, tile_x, tile_y))
    return decode_tiled


def vae_for_host(model: AutoencoderKL, name: str):
    """comfy.sd.VAE inside ComfyUI (built from the LDM-layout weights, so every core node treats it as its own, its
    tiled decode ours), else the stand-in. fp16 always gets the stand-in: comfy.sd.VAE has no fallback for the fp16
    overflow of SD-family decoders (black images); ours recomputes in fp32.

    The vqcore model stays beside ComfyUI's copy of the weights: it is what the seamless tiler runs."""
    handle = AutoencoderHandle(model, name)
    config = comfy_config(model.config) if model.dtype != torch.float16 else None
    vae = None
    if config is not None:
        vae = host.comfy_vae(ldm_state_dict(model), config, model.dtype, model.downscale_factor,
                             model.latent_channels, seamless_decode_tiled(handle))
    if vae is None:
        return VAEAdapter(handle)
    vae.vqcore_handle = handle
    return vae


def seamless_vae(vae, input_name):
    """A VAE from any KL loader whose tiled decodes are seamless: ours are already; one from ComfyUI's own loaders
    becomes a shallow copy (same weights, same memory management) routed to the vqcore model made from its weights."""
    if isinstance(vae, VAEAdapter) or getattr(vae, "vqcore_handle", None) is not None:
        return vae
    handle = kl_handle(vae, input_name)
    seamless = copy.copy(vae)
    host.route_tiled_decode(seamless, seamless_decode_tiled(handle))
    return seamless


def kl_handle(vae, input_name):
    """The vqcore model behind any ComfyUI VAE whose weights are an LDM/diffusers AutoencoderKL: the one tied to our
    VAEs at load, or, for one from ComfyUI's own loaders, one built from its weights once and cached on it."""
    if isinstance(vae, VAEAdapter):
        return vae.vqcore_handle
    cached = getattr(vae, "vqcore_handle", None)
    if cached is not None:
        return cached
    if not hasattr(vae, "get_sd"):
        raise VQCoreError(f"{input_name}: expected a VAE or VQ_VAE; got {type(vae).__name__}")
    with sockets.input_errors(input_name):
        state = to_diffusers_names(dict(vae.get_sd()), "the connected VAE")
        config = infer_config(state, "the connected VAE")
        if config["_class_name"] != "AutoencoderKL":
            raise VQCoreError("the connected VAE is not an LDM/diffusers AutoencoderKL")
        with torch.device("meta"):  # the weights come from the VAE; skip random initialisation
            model = AutoencoderKL.from_config(config)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise VQCoreError(f"the connected VAE's weights do not fit an AutoencoderKL: {e}") from e
    handle = AutoencoderHandle(model.to(getattr(vae, "vae_dtype", torch.float32)), "VAE")
    vae.vqcore_handle = handle
    return handle


def autoencoder_handle(vae, input_name):
    """VQ_VAE or any ComfyUI VAE (ours or core's) → the vqcore handle behind it."""
    if isinstance(vae, AutoencoderHandle):
        return vae
    return kl_handle(vae, input_name)


def vq_handle(vq_vae, input_name):
    """A VQ_VAE socket's handle: an autoencoder with a codebook."""
    handle = autoencoder_handle(vq_vae, input_name)
    if handle.codebook_id is None:
        raise VQCoreError(f"{input_name}: expected a VQ autoencoder; this one has no codebook")
    return handle
