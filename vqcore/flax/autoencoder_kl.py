"""FlaxAutoencoderKL: vqcore's AutoencoderKL (autoencoder_kl.py, autoencoder.py) in Flax Linen.

The same config fields and the same computation as the torch model's exact path. Feature maps are NHWC inside (what
Flax convolutions take); images, latents and the posterior are NCHW at the boundary, like the torch model. Submodules
carry the torch modules' names, with list indices joined by "_" (encoder/down_blocks_0/resnets_1/norm1 holds
encoder.down_blocks.0.resnets.1.norm1), which is what the conversion in vqcore/flax/loading.py relies on.

`dtype` is the compute dtype. In float32 every convolution and matrix product runs at full float32 precision
(Precision.HIGHEST; by default TPUs round float32 operands to bfloat16 and GPUs to TF32). GroupNorm statistics are
computed in float32 in two passes (mean, then squared deviations) whatever the dtype, and so is the attention softmax.
"""

import math
from functools import partial
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ..autoencoder import DOWN_BLOCK_TYPES, UP_BLOCK_TYPES, block_attention, check_architecture
from ..errors import VQCoreError

# The torch model's activations (vqcore.autoencoder.ACTIVATIONS), by the same names; torch's GELU is the exact one.
ACTIVATIONS = {
    "silu": nn.silu,
    "swish": nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "relu": nn.relu,
    "gelu": partial(nn.gelu, approximate=False),
}


def precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def conv(features, dtype, kernel=3, stride=1, padding=1):
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=padding, dtype=dtype, precision=precision(dtype))


def group_norm(groups, dtype):
    return nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype, use_fast_variance=False)


class ResnetBlock(nn.Module):
    """norm -> act -> conv3x3 -> norm -> act -> conv3x3, plus the input (through a 1x1 conv when channels change)."""

    in_channels: int
    out_channels: int
    groups: int
    act_fn: str
    dtype: Any

    def setup(self):
        self.norm1 = group_norm(self.groups, self.dtype)
        self.conv1 = conv(self.out_channels, self.dtype)
        self.norm2 = group_norm(self.groups, self.dtype)
        self.conv2 = conv(self.out_channels, self.dtype)
        if self.in_channels != self.out_channels:
            self.conv_shortcut = conv(self.out_channels, self.dtype, kernel=1, padding=0)

    def __call__(self, x):
        act = ACTIVATIONS[self.act_fn]
        h = self.conv1(act(self.norm1(x)))
        h = self.conv2(act(self.norm2(h)))
        return (x if self.in_channels == self.out_channels else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    channels: int
    groups: int
    dtype: Any

    def setup(self):
        dense = partial(nn.Dense, self.channels, dtype=self.dtype, precision=precision(self.dtype))
        self.group_norm = group_norm(self.groups, self.dtype)
        self.to_q, self.to_k, self.to_v = dense(), dense(), dense()
        self.to_out = [dense()]

    def __call__(self, x):
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, precision=precision(self.dtype)) / math.sqrt(c)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bqk,bkc->bqc", weights, v, precision=precision(self.dtype))
        return self.to_out[0](out).reshape(b, h, w, c) + x


class Downsample(nn.Module):
    """LDM's asymmetric downsampling: pad one pixel right and bottom, then a stride-2 3x3 convolution."""

    list_name = "downsamplers"  # where a Level stores it, as in the torch model
    channels: int
    dtype: Any

    def setup(self):
        self.conv = conv(self.channels, self.dtype, stride=2, padding=0)

    def __call__(self, x):
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 convolution."""

    list_name = "upsamplers"
    channels: int
    dtype: Any

    def setup(self):
        self.conv = conv(self.channels, self.dtype)

    def __call__(self, x):
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nn.Module):
    """One resolution level: resnets (each followed by attention where the level has it), then an optional resampler
    (Downsample or Upsample, stored as downsamplers_0 or upsamplers_0)."""

    in_channels: int
    out_channels: int
    num_layers: int
    groups: int
    act_fn: str
    attention: bool
    resampler: Any  # Downsample, Upsample or None
    dtype: Any

    def setup(self):
        self.resnets = [ResnetBlock(self.in_channels if i == 0 else self.out_channels, self.out_channels, self.groups,
                                    self.act_fn, self.dtype) for i in range(self.num_layers)]
        self.attentions = [Attention(self.out_channels, self.groups, self.dtype)
                           for _ in range(self.num_layers if self.attention else 0)]
        if self.resampler is not None:
            setattr(self, self.resampler.list_name, [self.resampler(self.out_channels, self.dtype)])

    def __call__(self, x):
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions:
                x = self.attentions[i](x)
        if self.resampler is not None:
            x = getattr(self, self.resampler.list_name)[0](x)
        return x


class MidBlock(nn.Module):
    """resnet -> attention (optional) -> resnet at the lowest resolution."""

    channels: int
    groups: int
    act_fn: str
    add_attention: bool
    dtype: Any

    def setup(self):
        self.resnets = [ResnetBlock(self.channels, self.channels, self.groups, self.act_fn, self.dtype) for _ in range(2)]
        self.attentions = [Attention(self.channels, self.groups, self.dtype)] if self.add_attention else []

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attentions:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    in_channels: int
    out_channels: int
    down_block_types: tuple
    block_out_channels: tuple
    layers_per_block: int
    norm_num_groups: int
    act_fn: str
    mid_block_add_attention: bool
    dtype: Any

    def setup(self):
        attention = block_attention(self.down_block_types, DOWN_BLOCK_TYPES, "down_block_types")
        channels = self.block_out_channels
        self.conv_in = conv(channels[0], self.dtype)
        self.down_blocks = [
            Level(channels[max(i - 1, 0)], out, self.layers_per_block, self.norm_num_groups, self.act_fn, attention[i],
                  Downsample if i < len(channels) - 1 else None, self.dtype)
            for i, out in enumerate(channels)
        ]
        self.mid_block = MidBlock(channels[-1], self.norm_num_groups, self.act_fn, self.mid_block_add_attention,
                                  self.dtype)
        self.conv_norm_out = group_norm(self.norm_num_groups, self.dtype)
        self.conv_out = conv(self.out_channels, self.dtype)

    def __call__(self, x):
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        x = self.mid_block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))  # SiLU here whatever act_fn says


class Decoder(nn.Module):
    in_channels: int
    out_channels: int
    up_block_types: tuple
    block_out_channels: tuple
    layers_per_block: int
    norm_num_groups: int
    act_fn: str
    mid_block_add_attention: bool
    dtype: Any

    def setup(self):
        attention = block_attention(self.up_block_types, UP_BLOCK_TYPES, "up_block_types")
        channels = tuple(reversed(self.block_out_channels))
        self.conv_in = conv(channels[0], self.dtype)
        self.mid_block = MidBlock(channels[0], self.norm_num_groups, self.act_fn, self.mid_block_add_attention,
                                  self.dtype)
        self.up_blocks = [
            Level(channels[max(i - 1, 0)], out, self.layers_per_block + 1, self.norm_num_groups, self.act_fn,
                  attention[i], Upsample if i < len(channels) - 1 else None, self.dtype)
            for i, out in enumerate(channels)
        ]
        self.conv_norm_out = group_norm(self.norm_num_groups, self.dtype)
        self.conv_out = conv(self.out_channels, self.dtype)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


@flax.struct.dataclass
class FlaxDiagonalGaussian:
    """The encoder's posterior over the latents, NCHW: per-element normal distribution with mean and logvar (clamped
    to [-30, 20] like the torch DiagonalGaussian). A pytree, so jitted functions can return it."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments):
        mean, logvar = jnp.split(moments, 2, axis=1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self):
        return jnp.exp(self.logvar)

    def sample(self, key):
        """mean + std * noise with noise = jax.random.normal(key, mean.shape, mean.dtype): one draw of the NCHW shape
        (batch, latent_channels, h, w) in the compute dtype. Passing that same noise to the torch model's posterior
        (mean + std * noise) gives the same sample."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self):
        return self.mean

    def kl(self):
        """KL divergence to the standard normal, summed over channels and pixels: shape (B,)."""
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


def check_input(x, channels, factor, what):
    """The torch model's input checks (vqcore.autoencoder.check_input) with the same messages. Finiteness is checked
    where the values are known: outside jax.jit (inside, a traced array has no values yet)."""
    if getattr(x, "ndim", None) != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
        raise VQCoreError(f"{what} must be a (batch, {channels}, height, width) tensor; got {shape}")
    if x.shape[2] % factor or x.shape[3] % factor:
        raise VQCoreError(
            f"{what} height and width must be multiples of {factor}; got {x.shape[2]}x{x.shape[3]} (shape {tuple(x.shape)})"
        )
    if not isinstance(x, jax.core.Tracer) and not bool(jnp.isfinite(x).all()):
        raise VQCoreError(f"{what} of shape {tuple(x.shape)} contains NaN or infinite values")


def nhwc(x):
    return jnp.transpose(x, (0, 2, 3, 1))


def nchw(x):
    return jnp.transpose(x, (0, 3, 1, 2))


class FlaxAutoencoderKL(nn.Module):
    """encode -> FlaxDiagonalGaussian over latents (B, latent_channels, H/f, W/f); decode -> images (B, out_channels,
    H, W). Images are NCHW in [-1, 1]; latents are unscaled (scale_latents / unscale_latents apply scaling_factor,
    shift_factor or latents_mean/std).

        model = FlaxAutoencoderKL(block_out_channels=(128, 256, 512, 512), ..., dtype=jnp.bfloat16)
        params = model.init_weights(jax.random.key(0))
        posterior = model.apply({"params": params}, images, method=FlaxAutoencoderKL.encode)
        pixels = model.apply({"params": params}, posterior.sample(key), method=FlaxAutoencoderKL.decode)
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple | None = None
    latents_std: tuple | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Any = jnp.float32

    def __post_init__(self):
        check_architecture(self.block_out_channels, self.down_block_types, self.up_block_types, self.norm_num_groups,
                           self.act_fn, False)
        block_attention(self.down_block_types, DOWN_BLOCK_TYPES, "down_block_types")  # unknown block types
        block_attention(self.up_block_types, UP_BLOCK_TYPES, "up_block_types")
        super().__post_init__()

    def setup(self):
        shared = dict(block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                      norm_num_groups=self.norm_num_groups, act_fn=self.act_fn,
                      mid_block_add_attention=self.mid_block_add_attention, dtype=self.dtype)
        self.encoder = Encoder(self.in_channels, 2 * self.latent_channels, self.down_block_types, **shared)
        self.decoder = Decoder(self.latent_channels, self.out_channels, self.up_block_types, **shared)
        if self.use_quant_conv:
            self.quant_conv = conv(2 * self.latent_channels, self.dtype, kernel=1, padding=0)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv(self.latent_channels, self.dtype, kernel=1, padding=0)

    @property
    def downscale_factor(self):
        return 2 ** (len(self.block_out_channels) - 1)

    def init_weights(self, rng):
        """Random parameters (float32), initialised on the smallest image the model takes (jitted: one compilation
        costs less than running every layer op by op)."""
        f = self.downscale_factor
        return jax.jit(self.init)(rng, jnp.zeros((1, self.in_channels, f, f), jnp.float32))["params"]

    def __call__(self, images, key=None):
        """Reconstruction: decode(posterior.sample(key)), or decode(posterior.mode()) without a key."""
        posterior = self.encode(images)
        return self.decode(posterior.mode() if key is None else posterior.sample(key))

    def encode(self, images):
        """Images (B, in_channels, H, W) in [-1, 1] -> FlaxDiagonalGaussian over the (unscaled) latents."""
        check_input(images, self.in_channels, self.downscale_factor, "FlaxAutoencoderKL.encode images")
        moments = self.encoder(nhwc(images))
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        return FlaxDiagonalGaussian.from_moments(nchw(moments))

    def decode(self, latents):
        """Unscaled latents (B, latent_channels, h, w) -> images (B, out_channels, h * f, w * f)."""
        check_input(latents, self.latent_channels, 1, "FlaxAutoencoderKL.decode latents")
        z = nhwc(latents)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return nchw(self.decoder(z))

    def scale_latents(self, z):
        """Encoder latents -> the normalised latents a diffusion model works on (as AutoencoderKL.scale_latents)."""
        mean, std = self.latent_statistics(z)
        if mean is not None:
            return (z - mean) * self.scaling_factor / std
        return (z - self.shift_factor) * self.scaling_factor if self.shift_factor is not None else z * self.scaling_factor

    def unscale_latents(self, z):
        """Inverse of scale_latents: diffusion-model latents -> what decode() takes."""
        mean, std = self.latent_statistics(z)
        if mean is not None:
            return z * std / self.scaling_factor + mean
        return z / self.scaling_factor + self.shift_factor if self.shift_factor is not None else z / self.scaling_factor

    def latent_statistics(self, z):
        if self.latents_mean is None or self.latents_std is None:
            return None, None
        as_channels = lambda values: jnp.asarray(values, z.dtype).reshape(1, -1, 1, 1)
        return as_channels(self.latents_mean), as_channels(self.latents_std)
