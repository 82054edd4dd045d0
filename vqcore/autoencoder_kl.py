"""KL autoencoder (Stable Diffusion 1/2/XL, SD3, Flux VAEs) with diffusers' AutoencoderKL config and weight names."""

import torch
from torch import nn

from .autoencoder import Autoencoder, check_input
from .model_io import as_model_input, check_result


class DiagonalGaussian:
    """The encoder's posterior: per-element normal distribution from (mean, logvar) moments stacked on dim 1."""

    def __init__(self, moments):
        self.moments = moments
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        """mean + std * noise. The noise is drawn in the model dtype (not drawn in fp32 and cast), on the generator's
        device when that is the CPU, and per batch item for a list of generators, so seeds give diffusers' samples."""
        noise = standard_normal(self.mean.shape, generator, self.moments.device, self.moments.dtype)
        return self.mean + self.std * noise

    def mode(self):
        return self.mean

    def kl(self):
        """KL divergence to the standard normal, summed over channels and pixels: shape (B,)."""
        return 0.5 * torch.sum(torch.pow(self.mean, 2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


def standard_normal(shape, generator, device, dtype):
    generators = generator if isinstance(generator, list) else [generator]
    draw_device = generators[0].device if generators[0] is not None and generators[0].device.type == "cpu" else device
    if isinstance(generator, list) and len(generator) > 1:
        noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=draw_device, dtype=dtype) for g in generator])
    else:
        noise = torch.randn(shape, generator=generators[0], device=draw_device, dtype=dtype)
    return noise.to(device)


class AutoencoderKL(Autoencoder):
    """encode -> DiagonalGaussian over latents (B, latent_channels, H/f, W/f); decode -> image.

    scaling_factor, shift_factor and latents_mean/std are kept in the config and applied only by scale_latents /
    unscale_latents (what a diffusion model sees vs. what the decoder takes). Images are NCHW in [-1, 1].
    """

    def __init__(
        self,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(64,),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=0.18215,
        shift_factor=None,
        latents_mean=None,
        latents_std=None,
        force_upcast=True,
        use_quant_conv=True,
        use_post_quant_conv=True,
        mid_block_add_attention=True,
    ):
        super().__init__()
        self.keep_config(locals())
        self.encoder = self.make_encoder(2 * latent_channels)
        self.decoder = self.make_decoder()
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

    @property
    def latent_channels(self):
        return self.config["latent_channels"]

    def encode(self, x):
        """Images (B, in_channels, H, W) in [-1, 1] -> DiagonalGaussian over the (unscaled) latents."""
        check_input(x, self.config["in_channels"], self.downscale_factor, "AutoencoderKL.encode images")
        x = as_model_input(x, self, "AutoencoderKL.encode images")
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(check_result(moments, "AutoencoderKL.encode", "images", x, self.encoder_modules()))

    def decode(self, z):
        """Unscaled latents (B, latent_channels, h, w) -> images."""
        check_input(z, self.latent_channels, 1, "AutoencoderKL.decode latents")
        latents = as_model_input(z, self, "AutoencoderKL.decode latents")
        z = latents if self.post_quant_conv is None else self.post_quant_conv(latents)
        return check_result(self.decoder(z), "AutoencoderKL.decode", "latents", latents, self.decoder_modules())

    def decoder_modules(self):
        """The modules a decode runs, by checkpoint name: where a NaN/inf weight is looked for."""
        return {"post_quant_conv": self.post_quant_conv, "decoder": self.decoder}

    def decode_tile_program(self, program):
        """decode, for vqcore.tiling: from the unscaled latents, map program.input."""
        if self.post_quant_conv is not None:
            program.conv(self.post_quant_conv)
        self.decoder.tile_program(program)

    def scale_latents(self, z):
        """Encoder latents -> the normalised latents a diffusion model works on."""
        sf, shift, mean, std = self.latent_statistics(z)
        if mean is not None:
            return (z - mean) * sf / std
        return (z - shift) * sf if shift is not None else z * sf

    def unscale_latents(self, z):
        """Inverse of scale_latents: diffusion-model latents -> what decode() takes."""
        sf, shift, mean, std = self.latent_statistics(z)
        if mean is not None:
            return z * std / sf + mean
        return z / sf + shift if shift is not None else z / sf

    def latent_statistics(self, z):
        c = self.config
        if c["latents_mean"] is None or c["latents_std"] is None:
            return c["scaling_factor"], c["shift_factor"], None, None
        as_channels = lambda values: torch.tensor(values, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
        return c["scaling_factor"], c["shift_factor"], as_channels(c["latents_mean"]), as_channels(c["latents_std"])
