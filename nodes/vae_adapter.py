"""What a VAE socket carries for our AutoencoderKL loader: a real comfy.sd.VAE where ComfyUI can express the
architecture, otherwise a stand-in with the members ComfyUI's VAE nodes use (decode, encode, their tiled variants,
compression ratios, get_sd, ...). Latents are raw and unscaled, as everywhere in ComfyUI.
"""

import torch

from ..vqcore.autoencoder_kl import AutoencoderKL
from ..vqcore.vae_layouts import infer_config, to_diffusers_names, to_ldm_names
from . import compute, host

COMFY_NORM_GROUPS = 32  # ComfyUI's LDM Encoder/Decoder hard-code GroupNorm(32), SiLU and a mid-block attention


class VAEAdapter:
    """ComfyUI's VAE interface over a vqcore AutoencoderKL; decode/encode go through compute (memory manager,
    batch slices, OOM → seamless tiles, fp16 overflow → fp32)."""

    latent_dim = 2
    output_channels = 3

    def __init__(self, handle: compute.AutoencoderHandle):
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
        """ComfyUI's tile arguments are in latent cells; our tiling is seamless, so only the tile size matters."""
        self.check_latents(samples)
        tile = max(tile_x or 64, tile_y or 64) * self.upscale_ratio
        return compute.tiled_decode(self.vqcore_handle, samples, tile)

    def encode(self, pixel_samples):
        return compute.encode(self.vqcore_handle, compute.images_to_model(pixel_samples, self.downscale_ratio, "pixels"))

    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        x = compute.images_to_model(pixel_samples, self.downscale_ratio, "pixels")
        return compute.tiled_encode(self.vqcore_handle, x, max(tile_x or 512, tile_y or 512))

    def check_latents(self, samples):
        if samples.ndim != 4 or samples.shape[1] != self.latent_channels:
            raise compute.VQCoreError(f"samples: this VAE takes latents with {self.latent_channels} channels "
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


def vae_for_host(model: AutoencoderKL, name: str):
    """comfy.sd.VAE inside ComfyUI (built from the LDM-layout weights, so every core node treats it as its own),
    else the stand-in. fp16 always gets the stand-in: comfy.sd.VAE has no fallback for the fp16 overflow of SD-family
    decoders (black images); ours recomputes in fp32. The vqcore config rides along for the seamless tiled nodes."""
    config = comfy_config(model.config) if model.dtype != torch.float16 else None
    vae = None
    if config is not None:
        vae = host.comfy_vae(ldm_state_dict(model), config, model.dtype, model.downscale_factor, model.latent_channels)
    if vae is None:
        vae = VAEAdapter(compute.AutoencoderHandle(model, name))
    vae.vqcore_config = model.config
    vae.vqcore_name = name
    return vae


def kl_handle(vae, input_name):
    """The vqcore model behind any ComfyUI VAE whose weights are an LDM/diffusers AutoencoderKL (ours, or one from
    ComfyUI's own loaders), built once and cached on the VAE object."""
    if isinstance(vae, VAEAdapter):
        return vae.vqcore_handle
    cached = getattr(vae, "vqcore_handle", None)
    if cached is not None:
        return cached
    if not hasattr(vae, "get_sd"):
        raise compute.VQCoreError(f"{input_name}: expected a VAE or VQ_VAE; got {type(vae).__name__}")
    with compute.input_errors(input_name):
        state = to_diffusers_names({k: v for k, v in vae.get_sd().items()}, "the connected VAE")
        config = dict(getattr(vae, "vqcore_config", None) or infer_config(state, "the connected VAE"))
        if not config.get("use_quant_conv", True):  # drop the identity convs added for ComfyUI
            state = {k: v for k, v in state.items() if not k.startswith(("quant_conv.", "post_quant_conv."))}
        if infer_config(state, "the connected VAE")["_class_name"] != "AutoencoderKL":
            raise compute.VQCoreError("the connected VAE is not an LDM/diffusers AutoencoderKL")
        with torch.device("meta"):  # the weights come from the VAE; skip random initialisation
            model = AutoencoderKL.from_config(config)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise compute.VQCoreError(f"the connected VAE's weights do not fit an AutoencoderKL: {e}") from e
    handle = compute.AutoencoderHandle(model.to(getattr(vae, "vae_dtype", torch.float32)),
                                       getattr(vae, "vqcore_name", "VAE"))
    vae.vqcore_handle = handle
    return handle
