"""The LDM-style convolutional autoencoder shared by VQModel and AutoencoderKL: its blocks, the Encoder and Decoder,
and the Autoencoder base class (config, device, dtype, the parts both models have).

Every block says beside its forward how vqcore.tiling cuts it (`tile_program(program, zq)`, in the operations of
tiling.Program); Level and MidBlock are Chains, whose forward and tile_program walk the same parts. A block arranged
differently, or a new block with both methods, tiles without a change to tiling.py.

Module and parameter names equal diffusers' (encoder.down_blocks.0.resnets.0.norm1.weight, ...attentions.0.to_q.weight,
...spatial_norm.conv_y.weight), so a diffusers state dict loads with strict=True.

Two ways to compute, chosen per model with `use_fast_path`:
* exact (the default): the order of floating-point operations and the memory layout of intermediate tensors follow
  diffusers, so results are diffusers' bit for bit (on CPU a convolution gives slightly different results for a
  channels-last input than for a contiguous one, and the attention output is channels-last-strided);
* fast (decoding only; see use_fast_path): feature maps are channels-last in memory, where CPU convolutions run
  faster, and upsampling with its convolution runs as one transposed convolution of the input (Upsample). On CPU,
  GroupNorm is torch's channels-last kernel where its statistics show no cancellation and the pack's own two-pass
  computation where they do (group_norm_channels_last). Results move by float32 rounding and are as close to a
  float64 computation as the exact path's (tests/test_autoencoder_parity.py); bench/bench_autoencoders.py times
  both, also with one core kept busy.
Where it changes neither values nor layouts, work is done in place (activations, SpatialNorm's scale and shift).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .errors import VQCoreError
from .model_config import Configured

DOWN_BLOCK_TYPES = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}  # type -> has attention
UP_BLOCK_TYPES = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}
SPATIAL_NORM_GROUPS = 32  # MoVQ's SpatialNorm hard-codes 32 groups, whatever norm_num_groups says

# Activations applied to normalisation outputs, in place.
ACTIVATIONS = {
    "silu": lambda x: F.silu(x, inplace=True),
    "swish": lambda x: F.silu(x, inplace=True),
    "mish": lambda x: F.mish(x, inplace=True),
    "relu": lambda x: F.relu(x, inplace=True),
    "gelu": lambda x: x.copy_(F.gelu(x)),
}

def group_statistics(channel_mean, channel_variance, groups):
    """Per-group mean and variance from per-channel ones, (N, C) -> (N, groups) each: a group's variance is the mean
    of its channels' variances plus the variance of their means. In float64, so that the merge itself loses nothing."""
    n, c = channel_mean.shape
    channel_mean = channel_mean.double().view(n, groups, c // groups)
    mean = channel_mean.mean(-1)
    spread = (channel_mean - mean[..., None]).square().mean(-1)
    return mean, channel_variance.double().view(n, groups, c // groups).mean(-1) + spread


# torch's CPU GroupNorm for channels-last maps computes a group's variance as E[x^2] - E[x]^2 in float32, which cancels
# when the group's mean is large against its spread: mean 3, std 0.1 gives errors of 1e-3 where a contiguous map gets
# 4e-6. The error of that variance is a few float32 roundings of E[x^2] = var + mean^2, so where the kernel reports
# |mean| / std <= this limit, its variance is off by at most a few roundings of 5 * var: as good as the contiguous
# kernel. Beyond it (large-mean or nearly flat maps) the map is normalised again by the two-pass computation.
CANCELLATION_LIMIT = 2.0


def group_norm_channels_last(x, norm, in_place):
    """norm(x) (an nn.GroupNorm) for a CPU map, computed in its channels-last layout as accurately as torch's kernel
    computes it on a contiguous map: torch's channels-last kernel where its own statistics show that it did not cancel
    (one pass for the statistics, one for the output: few parallel regions, which matters on a busy machine), the
    two-pass computation (group_norm_two_pass) where they do not. Half-precision maps are normalised in float32."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return group_norm_channels_last(x.float(), norm, True).to(x.dtype)
    if not x.is_contiguous(memory_format=torch.channels_last):
        x, in_place = x.contiguous(memory_format=torch.channels_last), True
    n, c, h, w = x.shape
    weight, bias = norm.weight.to(x.dtype), norm.bias.to(x.dtype)  # a half-precision model's, for its float32 maps
    out, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, h * w, norm.num_groups, norm.eps)
    if (mean * rstd).abs().max() <= CANCELLATION_LIMIT:
        return out
    return group_norm_two_pass(x, norm, in_place)


def group_norm_two_pass(x, norm, in_place):
    """norm(x) for a channels-last float32 CPU map with per-channel means first, then the squared deviations from
    them, so nothing cancels. With in_place, x is overwritten."""
    n, c, h, w = x.shape
    pixels = x.permute(0, 2, 3, 1).view(n, h * w, c)
    channel_mean = pixels.mean(1, keepdim=True)
    centred = pixels.sub_(channel_mean) if in_place else pixels - channel_mean
    squares = torch.linalg.vecdot(centred, centred, dim=1)  # one pass, no full-size temporary
    mean, variance = group_statistics(channel_mean.view(n, c), squares / (h * w), norm.num_groups)
    # (x - group mean) * scale + bias == centred * scale + (bias + (channel mean - group mean) * scale)
    per_channel = lambda t: t.repeat_interleave(c // norm.num_groups, dim=1)
    scale = per_channel(torch.rsqrt(variance + norm.eps)) * norm.weight.double()
    shift = norm.bias.double() + (channel_mean.view(n, c).double() - per_channel(mean)) * scale
    torch.addcmul(shift.to(x.dtype).view(n, 1, c), centred, scale.to(x.dtype).view(n, 1, c), out=centred)
    return centred.view(n, h, w, c).permute(0, 3, 1, 2)


class GroupNorm(nn.GroupNorm):
    """GroupNorm with the SpatialNorm call signature, so blocks call every norm as norm(x, zq). On the fast path, CPU
    maps are normalised by group_norm_channels_last; `in_place` allows it to overwrite x (the exact path never does)."""

    fast = False  # see use_fast_path

    def forward(self, x, zq=None, in_place=False):
        if self.fast and x.device.type == "cpu" and x.ndim == 4:
            return group_norm_channels_last(x, self, in_place)
        return super().forward(x)

    def tile_program(self, program, zq=None):
        """Normalisation with the statistics of the whole map; returns the name of the map normalised."""
        return program.normalise(self)


class SpatialNorm(nn.Module):
    """MoVQ's spatially conditioned norm: GroupNorm(f) scaled and shifted by 1x1 convolutions of the codebook output."""

    def __init__(self, f_channels, zq_channels):
        super().__init__()
        self.norm_layer = GroupNorm(SPATIAL_NORM_GROUPS, f_channels, eps=1e-6)
        self.conv_y = nn.Conv2d(zq_channels, f_channels, 1)
        self.conv_b = nn.Conv2d(zq_channels, f_channels, 1)

    def forward(self, f, zq, in_place=False):
        check_zq(zq)
        return self.modulate(self.norm_layer(f, in_place=in_place), F.interpolate(zq, size=f.shape[-2:], mode="nearest"))

    def modulate(self, normalised, zq):
        """The normalised map scaled and shifted by zq at its resolution, in place."""
        return normalised.mul_(self.conv_y(zq)).add_(self.conv_b(zq))

    def tile_program(self, program, zq):
        check_zq(zq)
        return program.normalise(self.norm_layer, zq, self.modulate)


def check_zq(zq):
    if zq is None:
        raise VQCoreError("a spatial-norm (MoVQ) decoder needs the quantized latents zq; got zq=None")


def make_norm(channels, groups, zq_channels):
    """SpatialNorm when the decoder is conditioned on zq (zq_channels set), else GroupNorm."""
    if zq_channels:
        return SpatialNorm(channels, zq_channels)
    return GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm -> act -> conv3x3 -> norm -> act -> conv3x3, plus the input (through a 1x1 conv when channels change)."""

    fast = False  # see use_fast_path

    def __init__(self, *, in_channels, out_channels, groups, act_fn, zq_channels=None):
        super().__init__()
        self.act = ACTIVATIONS[act_fn]
        self.norm1 = make_norm(in_channels, groups, zq_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = make_norm(out_channels, groups, zq_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, zq=None):
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        # On the fast path the norms may overwrite their input where nothing reads it later: conv1's output always,
        # the block's input once the 1x1 shortcut has been made from it (the encoder and decoder never reuse it).
        # That saves a full-size map per norm, and on CPU the page faults of its first touch.
        h = self.conv1(self.act(self.norm1(x, zq, in_place=self.fast and shortcut is not x)))
        h = self.conv2(self.act(self.norm2(h, zq, in_place=self.fast)))
        if self.fast:  # every map is channels-last: the sum can go into h
            return h.add_(shortcut)
        return shortcut + h  # not h.add_(...): the sum must take the shortcut's memory layout, as in diffusers

    def tile_program(self, program, zq=None):
        residual = self.norm1.tile_program(program, zq)
        if self.conv_shortcut is not None:
            # Made in the first segment, from the block's input at each tile: the input can then be freed as that
            # segment's tiles pass instead of being held to the end of the block.
            residual = program.shortcut(self.conv_shortcut)
        program.pointwise(self.act)
        program.conv(self.conv1)
        self.norm2.tile_program(program, zq)
        program.pointwise(self.act)
        program.conv(self.conv2)
        program.add_residual(residual)


class Attention(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    fast = False  # see use_fast_path

    def __init__(self, channels, groups, zq_channels=None):
        super().__init__()
        if zq_channels:
            self.spatial_norm = SpatialNorm(channels, zq_channels)
        else:
            self.group_norm = GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x, zq=None):
        b, c, h, w = x.shape
        if self.fast:  # the norm on the channels-last map, whose (B, HW, C) tokens are then a contiguous view
            tokens = self.norm(x, zq).flatten(2).transpose(1, 2)
        elif hasattr(self, "spatial_norm"):
            tokens = self.spatial_norm(x, zq).view(b, c, h * w).transpose(1, 2)
        else:  # diffusers' order: GroupNorm on the (B, C, HW) view
            tokens = self.group_norm(x.view(b, c, h * w)).transpose(1, 2)  # (B, HW, C)
        keys, values = self.keys_values(tokens)
        # (B, HW, C) -> (B, C, H, W) as a view, and a fresh sum: the result is channels-last-strided exactly like
        # diffusers' (strides included, which decide the layout of later GroupNorm outputs).
        return self.attend(tokens, keys, values).transpose(1, 2).reshape(b, c, h, w) + x

    @property
    def norm(self):
        """The input norm (diffusers names it spatial_norm in MoVQ, group_norm elsewhere)."""
        return self.spatial_norm if hasattr(self, "spatial_norm") else self.group_norm

    def keys_values(self, tokens):
        """Single-head keys and values (B, 1, N, C) of normalised tokens (B, N, C)."""
        return self.to_k(tokens).unsqueeze(1), self.to_v(tokens).unsqueeze(1)

    def attend(self, tokens, keys, values):
        """The attention output (B, N, C) of normalised tokens (B, N, C) to keys and values (B, 1, M, C)."""
        out = F.scaled_dot_product_attention(self.to_q(tokens).unsqueeze(1), keys, values)
        return self.to_out[0](out.squeeze(1))

    def tile_program(self, program, zq=None):
        """Global: the keys and values of the whole map are gathered first, then each tile's queries attend."""
        program.attention(self.norm, zq, self.keys_values, self.attend)


class Downsample(nn.Module):
    """LDM's asymmetric downsampling: pad one pixel right and bottom, then a stride-2 3x3 convolution."""

    list_name = "downsamplers"  # where a Level stores it, as in diffusers' state dicts

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x, zq=None):
        return self.conv(F.pad(x, (0, 1, 0, 1)))

    def tile_program(self, program, zq=None):
        program.pad_bottom_right_conv(self.conv)


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 convolution.

    Fast path: one stride-2 transposed convolution of the input with a 4x4 kernel made from the 3x3 one. Through the
    upsampling, even output rows 2i see input rows i-1 (kernel row 0) and i (rows 1 and 2), odd rows 2i+1 see rows i
    (kernel rows 0 and 1) and i+1 (row 2); a stride-2, padding-1 transposed convolution reaches exactly these input
    rows through its kernel rows 3, 1 (even) and 2, 0 (odd), so those get the summed taps (TRANSPOSED_TAPS), and the
    same for columns. That is 16/36 of the multiply-adds of the 3x3 convolution at the doubled resolution, and the
    upsampled map is never made.
    """

    list_name = "upsamplers"
    fast = False  # see use_fast_path
    # TRANSPOSED_TAPS[k]: which rows (or columns) of the 3x3 kernel add up to row k of the 4x4 transposed kernel.
    TRANSPOSED_TAPS = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, zq=None):
        if self.fast:
            weight = self.conv.weight
            taps = torch.tensor(self.TRANSPOSED_TAPS, dtype=weight.dtype, device=weight.device)
            transposed = (taps @ weight @ taps.T).transpose(0, 1)  # (in, out, 4, 4): rows, then columns summed
            return F.conv_transpose2d(x, transposed, self.conv.bias, stride=2, padding=1)
        if x.shape[0] >= 64 or x.numel() * 2 > 2**31:
            x = x.contiguous()  # the channels-last nearest kernel fails on very large tensors
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    def tile_program(self, program, zq=None):
        program.upsample_nearest()
        program.conv(self.conv)


class Chain(nn.Module):
    """Blocks run one after another on (x, zq). forward and tile_program (vqcore.tiling) both walk `parts()`, so a
    tiled pass follows the full pass by construction, whatever the arrangement of the blocks."""

    def parts(self):
        raise NotImplementedError

    def forward(self, x, zq=None):
        for part in self.parts():
            x = part(x, zq)
        return x

    def tile_program(self, program, zq=None):
        for part in self.parts():
            part.tile_program(program, zq)


class Level(Chain):
    """One resolution level: resnets (each followed by attention in the Attn block types), then an optional resampler
    stored as `downsamplers.0` or `upsamplers.0`."""

    def __init__(self, *, in_channels, out_channels, num_layers, groups, act_fn, attention, resampler=None,
                 zq_channels=None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels, groups=groups,
                        act_fn=act_fn, zq_channels=zq_channels)
            for i in range(num_layers)
        )
        self.attentions = nn.ModuleList(
            Attention(out_channels, groups, zq_channels) for _ in range(num_layers if attention else 0)
        )
        self.resampler_name = resampler.list_name if resampler is not None else None
        if resampler is not None:
            setattr(self, self.resampler_name, nn.ModuleList([resampler]))

    def parts(self):
        for i, resnet in enumerate(self.resnets):
            yield resnet
            if self.attentions:
                yield self.attentions[i]
        if self.resampler_name:
            yield getattr(self, self.resampler_name)[0]


class MidBlock(Chain):
    """resnet -> attention (optional) -> resnet at the lowest resolution."""

    def __init__(self, *, channels, groups, act_fn, add_attention, zq_channels=None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels=channels, out_channels=channels, groups=groups, act_fn=act_fn, zq_channels=zq_channels)
            for _ in range(2)
        )
        self.attentions = nn.ModuleList([Attention(channels, groups, zq_channels)] if add_attention else [])

    def parts(self):
        return [self.resnets[0], *self.attentions, self.resnets[1]]


def block_attention(block_types, known, field):
    """Which levels have attention, from diffusers block type names; an unknown name is an error."""
    unknown = [name for name in block_types if name not in known]
    if unknown:
        raise VQCoreError(f"{field}: unsupported block type(s) {unknown}; supported: {sorted(known)}")
    return [known[name] for name in block_types]


class Encoder(nn.Module):
    """Always computes as diffusers does: see use_fast_path for why the fast path leaves it alone."""

    def __init__(self, *, in_channels, out_channels, down_block_types, block_out_channels, layers_per_block,
                 norm_num_groups, act_fn, mid_block_add_attention):
        super().__init__()
        attention = block_attention(down_block_types, DOWN_BLOCK_TYPES, "down_block_types")
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        levels, channels = [], block_out_channels[0]
        for i, out in enumerate(block_out_channels):
            last = i == len(block_out_channels) - 1
            levels.append(Level(in_channels=channels, out_channels=out, num_layers=layers_per_block,
                                groups=norm_num_groups, act_fn=act_fn, attention=attention[i],
                                resampler=None if last else Downsample(out)))
            channels = out
        self.down_blocks = nn.ModuleList(levels)
        self.mid_block = MidBlock(channels=channels, groups=norm_num_groups, act_fn=act_fn,
                                  add_attention=mid_block_add_attention)
        self.conv_norm_out = GroupNorm(norm_num_groups, channels, eps=1e-6)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        x = self.mid_block(x)
        return self.conv_out(silu_(self.conv_norm_out(x)))  # SiLU whatever act_fn says

    def tile_program(self, program):
        """forward, for vqcore.tiling."""
        program.conv(self.conv_in)
        for level in self.down_blocks:
            level.tile_program(program)
        self.mid_block.tile_program(program)
        self.conv_norm_out.tile_program(program)
        program.pointwise(silu_)
        program.conv(self.conv_out)


class Decoder(nn.Module):
    """With zq_channels set (MoVQ), every norm is a SpatialNorm conditioned on zq, the codebook output."""

    fast = False  # channels-last feature maps; see use_fast_path

    def __init__(self, *, in_channels, out_channels, up_block_types, block_out_channels, layers_per_block,
                 norm_num_groups, act_fn, mid_block_add_attention, zq_channels=None):
        super().__init__()
        attention = block_attention(up_block_types, UP_BLOCK_TYPES, "up_block_types")
        reversed_channels = list(reversed(block_out_channels))
        channels = reversed_channels[0]
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.mid_block = MidBlock(channels=channels, groups=norm_num_groups, act_fn=act_fn,
                                  add_attention=mid_block_add_attention, zq_channels=zq_channels)
        levels = []
        for i, out in enumerate(reversed_channels):
            last = i == len(reversed_channels) - 1
            levels.append(Level(in_channels=channels, out_channels=out, num_layers=layers_per_block + 1,
                                groups=norm_num_groups, act_fn=act_fn, attention=attention[i],
                                resampler=None if last else Upsample(out), zq_channels=zq_channels))
            channels = out
        self.up_blocks = nn.ModuleList(levels)
        self.conv_norm_out = make_norm(channels, norm_num_groups, zq_channels)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, z, zq=None):
        if self.fast:
            z = z.contiguous(memory_format=torch.channels_last)
            zq = None if zq is None else zq.contiguous(memory_format=torch.channels_last)
        x = self.conv_in(z)
        x = self.mid_block(x, zq)
        for level in self.up_blocks:
            x = level(x, zq)
        x = self.conv_out(silu_(self.conv_norm_out(x, zq, in_place=self.fast)))
        return x.contiguous() if self.fast else x

    def tile_program(self, program, zq=None):
        """forward, for vqcore.tiling; zq names the map of the quantized latents there."""
        program.conv(self.conv_in)
        self.mid_block.tile_program(program, zq)
        for level in self.up_blocks:
            level.tile_program(program, zq)
        self.conv_norm_out.tile_program(program, zq)
        program.pointwise(silu_)
        program.conv(self.conv_out)


def silu_(x):
    """The encoder's and decoder's output activation, in place."""
    return F.silu(x, inplace=True)


def use_fast_path(model, enabled=True):
    """Switches a VQModel's or AutoencoderKL's decoder to the fast path (channels-last feature maps, upsampling as a
    transposed convolution; on CPU GroupNorm by group_norm_channels_last) or back to diffusers' exact computation;
    returns the model.

    The encoder always computes exactly: channels-last made the ithq-shaped encoder (few channels at full resolution)
    slower than the exact path when another process kept a core busy (bench/bench_autoencoders.py), and an encoder
    that is exact also gives diffusers' tokens and latents wherever they are used."""
    for module in model.decoder.modules():
        if isinstance(module, (Decoder, ResnetBlock, GroupNorm, Attention, Upsample)):
            module.fast = enabled
    return model


class Autoencoder(Configured, nn.Module):
    """What VQModel and AutoencoderKL share: an Encoder and a Decoder built from the config, a 1x1 quant_conv after
    the encoder and post_quant_conv before the decoder (None where the config drops them)."""

    def make_encoder(self, out_channels, spatial=False):
        """The Encoder of self.config, whose architecture is checked here (spatial: the decoder will have spatial
        norms)."""
        c = self.config
        check_architecture(c["block_out_channels"], c["down_block_types"], c["up_block_types"], c["norm_num_groups"],
                           c["act_fn"], spatial)
        return Encoder(in_channels=c["in_channels"], out_channels=out_channels, down_block_types=c["down_block_types"],
                       **self.coder_fields())

    def make_decoder(self, zq_channels=None):
        """The Decoder of self.config, conditioned on zq when zq_channels is set."""
        c = self.config
        return Decoder(in_channels=c["latent_channels"], out_channels=c["out_channels"],
                       up_block_types=c["up_block_types"], zq_channels=zq_channels, **self.coder_fields())

    def coder_fields(self):
        names = ("block_out_channels", "layers_per_block", "norm_num_groups", "act_fn", "mid_block_add_attention")
        return {name: self.config[name] for name in names}

    @property
    def downscale_factor(self):
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    @property
    def dtype(self):
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self):
        return self.decoder.conv_in.weight.device

    def encoder_modules(self):
        """The modules an encode runs, by checkpoint name: where a NaN/inf weight is looked for."""
        return {"encoder": self.encoder, "quant_conv": self.quant_conv}

    def encode_tile_program(self, program):
        """The encoder and quant_conv, for vqcore.tiling."""
        self.encoder.tile_program(program)
        if self.quant_conv is not None:
            program.conv(self.quant_conv)


def check_architecture(block_out_channels, down_block_types, up_block_types, norm_num_groups, act_fn, spatial):
    """Config errors diffusers would only report as an obscure shape error (or not at all)."""
    levels = len(block_out_channels)
    if levels == 0 or len(down_block_types) != levels or len(up_block_types) != levels:
        raise VQCoreError(
            f"block_out_channels {list(block_out_channels)}, down_block_types {list(down_block_types)} and "
            f"up_block_types {list(up_block_types)} must have the same, non-zero length"
        )
    groups = {norm_num_groups, SPATIAL_NORM_GROUPS} if spatial else {norm_num_groups}
    if any(c % g for c in block_out_channels for g in groups):
        raise VQCoreError(
            f"block_out_channels {list(block_out_channels)} must be multiples of norm_num_groups={norm_num_groups}"
            + (f" and of the spatial norm's {SPATIAL_NORM_GROUPS} groups" if spatial else "")
        )
    if act_fn not in ACTIVATIONS:
        raise VQCoreError(f"act_fn {act_fn!r} is not supported; supported: {sorted(ACTIVATIONS)}")


def check_input(x, channels, factor, what):
    """Images or latents going into a model: NCHW, the expected channel count, sizes divisible by factor, finite."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise VQCoreError(f"{what} must be a (batch, {channels}, height, width) tensor; got {shape}")
    if x.shape[2] % factor or x.shape[3] % factor:
        raise VQCoreError(
            f"{what} height and width must be multiples of {factor}; got {x.shape[2]}x{x.shape[3]} (shape {tuple(x.shape)})"
        )
    if not torch.isfinite(x).all():
        raise VQCoreError(f"{what} of shape {tuple(x.shape)} contains NaN or infinite values")
