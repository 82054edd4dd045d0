"""Seamless VAE: gives any SD-family VAE (from ComfyUI's own loaders too) our seamless tiled decode, so existing
workflows lose the seams of core's VAE Decode (Tiled) and of core's out-of-memory retry without changing their
decode nodes."""

from .vae_adapter import seamless_vae


class VQCoreSeamlessVAE:
    DESCRIPTION = ("Makes the tiled decodes of a KL VAE (SD1/SD2/SDXL, SD3, Flux; from Load VAE, a checkpoint "
                   "loader or Load AutoencoderKL) seamless: ComfyUI's own VAE Decode (Tiled) and its retry after a "
                   "full decode ran out of memory then give the full decode's result instead of blended tiles. Needs "
                   "a ComfyUI with the VAE tiling hook (0.33 or newer); older versions keep blending in core's "
                   "nodes, while our Tiled VAE Decode (seamless) is seamless everywhere. Full decodes and encodes "
                   "are unchanged. VAEs from Load AutoencoderKL are seamless already and pass through.")
    CATEGORY = "vqcore/tiled"
    RETURN_TYPES = ("VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The same VAE (same weights, no copy on the device), its tiled decodes seamless.",)
    FUNCTION = "wrap"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("VAE", {"tooltip": "A KL VAE from any loader. Other VAE kinds (TAESD, video, audio) are "
                                       "rejected with an error."}),
        }}

    def wrap(self, vae):
        return (seamless_vae(vae, "vae"),)


NODES = {"VQCoreSeamlessVAE": (VQCoreSeamlessVAE, "Seamless VAE")}
