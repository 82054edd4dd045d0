"""Seamless tiled VAE decode and encode: the tiled result equals the full decode/encode, not a blend of tiles.

Why ordinary tiling shows seams: every GroupNorm in the autoencoder normalises with the mean and variance of the
*whole* feature map. Decoding tiles independently (and cross-fading them, as diffusers' and ComfyUI's tiled decoders
do) normalises each tile with its own statistics, so tiles differ in tone and the blend only hides the edges.

Design: the network is cut into *segments*, each the chain of local operations between two normalisations:
GroupNorm/SpatialNorm with known statistics -> activation -> 3x3 conv -> (+ residual, 1x1 convs, nearest x2
upsampling, LDM's pad-right-bottom stride-2 downsampling) -> up to the next norm. A segment is run tile by tile:

* The tile grid is laid on the segment's output; for every tile the region each operation needs is worked out
  backwards from the tile's core (3x3 conv: one pixel each side; nearest x2: half the region, rounded outwards;
  stride-2 downsampling: from 2*start, so the stride stays aligned with the full map). The input region is read,
  each operation's result is cropped to exactly what the next one needs, and only the core is kept. Values a
  convolution's zero padding touches are kept only at the true image border, so every core value equals the
  full-map value.
* The core is written into the segment's output map, kept on the offload device (CPU by default) as one block per
  tile. While the cores are written, the statistics the next norm needs (per group mean and variance, merged across
  tiles in float64) are gathered from them; each pixel is counted once.
* The next segment then normalises with those global statistics, so each norm sees exactly what the full pass sees.
* Maps are freed as soon as no later segment reads them, and within their last segment block by block as the tiles
  pass (a resnet's 1x1 shortcut is made in its first segment, so the wide input goes early), so the offload device
  holds about one stage map plus a tile, not the several maps a full pass keeps alive.
* Self-attention (mid block, and the attention levels some models have) mixes all pixels, so it is computed globally
  at its resolution: keys and values of the whole map are gathered tile by tile on the compute device, then each
  tile's queries attend to them with scaled_dot_product_attention (PyTorch's memory-efficient kernels).
* SpatialNorm (MoVQ) is GroupNorm with global statistics, times conv_y(zq) plus conv_b(zq), where zq, the codebook
  output at latent resolution, is nearest-upsampled per tile exactly as F.interpolate does for the whole map.

The blocks describe themselves (their `tile_program` methods in vqcore.autoencoder build a Program from the operations
below); this module knows the operations and the scheduling, not the blocks.

The compute device holds about one tile (plus, during attention, the keys and values at that resolution). Tile size
in output pixels (decode) or input pixels (encode) is the one knob; at a level 2**k times smaller the tiles are
tile_size / 2**k pixels. Batches are processed one image at a time.
"""

import ctypes

import torch
import torch.nn.functional as F

from .autoencoder import check_input, group_statistics
from .autoencoder_kl import DiagonalGaussian
from .errors import Cancelled, VQCoreError
from .model_io import check_floating, check_result

MIN_TILE_LATENTS = 4  # smallest tile, in latent pixels: below this the halos cost more than the tiles


def glibc_malloc_trim():
    """glibc's malloc_trim, or None elsewhere."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # TypeError: Windows cannot open the running program this way
        return None


MALLOC_TRIM = glibc_malloc_trim()


class TilingCancelled(Cancelled):
    """should_cancel() returned True between two tiles."""


# ---------------------------------------------------------------------------------------------------------------------
# Regions are (top, bottom, left, right) with exclusive ends, in the coordinates of one feature map of size (H, W).


def crop(x, have, want):
    """x covers region `have`; return the part covering `want` (a sub-region)."""
    return x[..., want[0] - have[0]:want[1] - have[0], want[2] - have[2]:want[3] - have[2]]


class Conv3x3:
    """3x3 convolution, stride 1, zero padding 1."""

    def __init__(self, conv):
        self.conv = conv

    def out_size(self, size):
        return size

    def need(self, want, size):
        return max(want[0] - 1, 0), min(want[1] + 1, size[0]), max(want[2] - 1, 0), min(want[3] + 1, size[1])

    def run(self, x, have, want, size, ctx):
        # The layer's own zero padding is right at the image border; next to an interior edge it makes wrong values,
        # but only in the outermost row/column, which `want` (at least one pixel in from such an edge) leaves out.
        return crop(self.conv(x), have, want)


class Upsample2x:
    """Nearest-neighbour x2 upsampling."""

    def out_size(self, size):
        return 2 * size[0], 2 * size[1]

    def need(self, want, size):
        return want[0] // 2, (want[1] + 1) // 2, want[2] // 2, (want[3] + 1) // 2

    def run(self, x, have, want, size, ctx):
        y = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return crop(y, tuple(2 * v for v in have), want)


class PadConvStride2:
    """LDM downsampling: pad one zero row/column at the bottom/right, then a 3x3 stride-2 convolution."""

    def __init__(self, conv):
        if conv.kernel_size != (3, 3) or conv.stride != (2, 2) or conv.padding != (0, 0):
            raise VQCoreError(f"tiling supports 3x3 stride-2 pad-0 downsampling convolutions; got {conv}")
        self.conv = conv

    def out_size(self, size):
        return size[0] // 2, size[1] // 2

    def need(self, want, size):
        # Output pixel i reads padded rows 2i..2i+2; starting at an even row keeps the stride aligned with the full map.
        return 2 * want[0], min(2 * want[1] + 1, size[0]), 2 * want[2], min(2 * want[3] + 1, size[1])

    def run(self, x, have, want, size, ctx):
        pad = (0, int(have[3] == size[1]), 0, int(have[1] == size[0]))
        y = F.conv2d(F.pad(x, pad) if any(pad) else x, self.conv.weight, self.conv.bias, stride=2)
        top, left = have[0] // 2, have[2] // 2
        return crop(y, (top, top + y.shape[-2], left, left + y.shape[-1]), want)


class Pointwise:
    """Any per-pixel operation: a 1x1 convolution, or an activation (always right after a norm, so it may work in
    place on the norm's fresh output)."""

    def __init__(self, fn):
        self.fn = fn

    def out_size(self, size):
        return size

    def need(self, want, size):
        return want

    def run(self, x, have, want, size, ctx):
        return self.fn(x)


class AddResidual(Pointwise):
    """x + the residual map, read at the same pixels."""

    def __init__(self, source):
        self.source = source

    def run(self, x, have, want, size, ctx):
        return x.add_(ctx.read(self.source, have))


class Normalise(Pointwise):
    """nn.GroupNorm `norm` of map `source` with the statistics gathered over the whole map, then, given a map zq,
    modulate(normalised, zq nearest-upsampled to the tile)."""

    def __init__(self, norm, source, zq=None, modulate=None):
        self.norm, self.source, self.zq, self.modulate = norm, source, zq, modulate

    def run(self, x, have, want, size, ctx):
        scale, shift = ctx.affine(self)
        y = torch.addcmul(shift, x, scale)
        if self.zq is not None:
            y = self.modulate(y, ctx.read_nearest(self.zq, have, size))
        return y


# ---------------------------------------------------------------------------------------------------------------------
# Feature maps on the offload device and the statistics gathered from them.


def overlap(a, b):
    """The intersection of two regions, or None."""
    region = (max(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), min(a[3], b[3]))
    return region if region[0] < region[1] and region[2] < region[3] else None


class StageMap:
    """A (1, C, H, W) map stored in blocks, one per tile of the stage that wrote it, so that the blocks no later tile
    reads can be freed while the reading stage is still running.

    Blocks and the tiles read from them are channels-last: CPU convolutions then need no reordered copy of their
    input (less memory per tile, and faster), and GPU convolutions in half precision prefer it too.
    """

    def __init__(self, blocks, size):
        self.blocks = blocks  # region -> (1, C, h, w) tensor
        self.size = size

    @classmethod
    def wrap(cls, tensor):
        return cls({(0, tensor.shape[-2], 0, tensor.shape[-1]): tensor}, tuple(tensor.shape[-2:]))

    @classmethod
    def empty(cls, channels, size, cores, device, dtype):
        blocks = {core: torch.empty(1, channels, core[1] - core[0], core[3] - core[2], device=device, dtype=dtype,
                                    memory_format=torch.channels_last) for core in cores}
        return cls(blocks, size)

    def read(self, region, device, dtype):
        parts = [(block, tensor, overlap(block, region)) for block, tensor in self.blocks.items()]
        parts = [part for part in parts if part[2] is not None]
        if len(parts) == 1 and parts[0][2] == region:  # inside one block: a view, or one copy to the device
            return crop(parts[0][1], parts[0][0], region).to(device=device, dtype=dtype,
                                                              memory_format=torch.channels_last)
        channels = parts[0][1].shape[1]
        tile = torch.empty(1, channels, region[1] - region[0], region[3] - region[2], device=device, dtype=dtype,
                           memory_format=torch.channels_last)
        covered = 0
        for block, tensor, part in parts:
            crop(tile, region, part).copy_(crop(tensor, block, part))
            covered += (part[1] - part[0]) * (part[3] - part[2])
        if covered != tile.shape[-2] * tile.shape[-1]:
            raise RuntimeError("tiling read a block that was already freed")  # a scheduling bug, not bad input
        return tile

    def write(self, core, tile):
        self.blocks[core].copy_(tile)

    def free_unneeded(self, row_top, next_top, next_left):
        """Free what no later tile reads: the tiles left in this tile row read from (row_top, next_left) on, later
        tile rows from next_top down. Of a block that later rows read only in part (a halo), a copy of that part is
        kept."""
        for block in list(self.blocks):
            if block[1] > row_top and block[3] > next_left:
                continue  # the rest of this tile row reads it
            if block[1] <= next_top:
                del self.blocks[block]
            elif block[0] < next_top:
                kept = (next_top, block[1], block[2], block[3])
                self.blocks[kept] = crop(self.blocks.pop(block), block, kept).clone()

    def tensor(self):
        any_block = next(iter(self.blocks.values()))
        out = any_block.new_empty(1, any_block.shape[1], *self.size)
        for block, tensor in self.blocks.items():
            crop(out, (0, self.size[0], 0, self.size[1]), block).copy_(tensor)
        return out


class GroupStats:
    """Per-group mean and variance over the whole map, merged from tile cores.

    Each tile gives per-channel means and variances in one fused pass (var_mean, no copy of the channels-last tile);
    channels are merged into groups and tiles into the map in float64 with Chan's parallel formula, which, unlike
    sums of squares, does not cancel when the mean is large.
    """

    def __init__(self, groups):
        self.groups = groups
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, core):
        # fp16/bf16 tiles are reduced in float32; the merging is done on the CPU (MPS has no float64).
        var, mean = torch.var_mean(core.float(), dim=(2, 3), correction=0)
        group_mean, group_var = (t[0] for t in group_statistics(mean.cpu(), var.cpu(), self.groups))
        n = core.numel() // self.groups
        total = self.count + n
        delta = group_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + group_var * n + delta.square() * (self.count * n / total)
        self.count = total

    def mean_var(self):
        return self.mean, self.m2 / self.count


# ---------------------------------------------------------------------------------------------------------------------
# Segments ("stages") and the program the blocks build of them.


def tile_grid(size, tile):
    """Tile cores, row by row."""
    return [[(top, min(top + tile, size[0]), left, min(left + tile, size[1])) for left in range(0, size[1], tile)]
            for top in range(0, size[0], tile)]


class Stage:
    """A chain of local operations from map `source` to map `output`, run tile by tile. Side outputs are maps made
    by a per-pixel function of the source at the tile core (a resnet's 1x1 shortcut)."""

    def __init__(self, source, ops, sizes, output, level, side_outputs):
        self.source, self.ops, self.sizes, self.output, self.level = source, ops, sizes, output, level
        self.side_outputs = side_outputs
        self.passes = 1

    @property
    def reads(self):
        return [self.source] + [op.source for op in self.ops if isinstance(op, (AddResidual, Normalise))] + \
            [op.zq for op in self.ops if isinstance(op, Normalise) and op.zq]

    def regions(self, core):
        """The region each operation needs, worked backwards from the tile core: regions[i] is the input of ops[i]."""
        regions = [core]
        for op, size in zip(reversed(self.ops), reversed(self.sizes[:-1])):
            regions.insert(0, op.need(regions[0], size))
        return regions

    def first_needed(self, core):
        """(top, left) of what this tile reads from each map it reads on the tile grid."""
        regions = self.regions(core)
        needed = {self.source: regions[0][:3:2]}
        for op, region in zip(self.ops, regions):
            if isinstance(op, AddResidual):
                needed[op.source] = region[:3:2]
        return needed

    def compute(self, ctx, core):
        regions = self.regions(core)
        x = ctx.read(self.source, regions[0])
        for op, have, want, size in zip(self.ops, regions, regions[1:], self.sizes):
            x = op.run(x, have, want, size, ctx)
        return x


class AttentionStage:
    """Self-attention with residual over the whole map: keys_values(tokens) of every tile are gathered first, then
    attend(tokens, keys, values) gives each tile's output; tokens are the tile's pixels after the norm."""

    def __init__(self, norm, keys_values, attend, source, output, size, level):
        self.norm, self.keys_values, self.attend = norm, keys_values, attend
        self.source, self.output, self.level = source, output, level
        self.sizes = [size, size]
        self.side_outputs = []
        self.passes = 2

    @property
    def reads(self):
        return [self.source] + ([self.norm.zq] if self.norm.zq else [])

    def first_needed(self, core):
        return {self.source: core[:3:2]}

    def tokens(self, ctx, core):
        """(residual (1, C, h, w), normalised tokens (1, h*w, C)) of one tile."""
        x = ctx.read(self.source, core)
        return x, self.norm.run(x, core, core, self.sizes[0], ctx).flatten(2).transpose(1, 2)

    def gather_keys_values(self, ctx, grid):
        """keys and values (1, heads, H * W, C) in the map's pixel order."""
        keys = values = None
        for core in (core for row in grid for core in row):
            ctx.tick()
            k, v = self.keys_values(self.tokens(ctx, core)[1])
            if keys is None:
                h, w = self.sizes[0]
                keys = k.new_empty(*k.shape[:2], h, w, k.shape[-1])
                values = v.new_empty(*v.shape[:2], h, w, v.shape[-1])
            shape = (*k.shape[:2], core[1] - core[0], core[3] - core[2], -1)
            keys[:, :, core[0]:core[1], core[2]:core[3]] = k.view(shape)
            values[:, :, core[0]:core[1], core[2]:core[3]] = v.view(shape)
            ctx.done_tile()
        self.keys, self.values = keys.flatten(2, 3), values.flatten(2, 3)

    def compute(self, ctx, core):
        x, tokens = self.tokens(ctx, core)
        return self.attend(tokens, self.keys, self.values).transpose(1, 2).reshape(x.shape).add_(x)

    def release(self):
        self.keys = self.values = None


class Program:
    """The stages of a pass, built by the blocks' tile_program methods (vqcore.autoencoder), which describe each
    block's forward in the operations below; every norm closes the open segment.

    Levels count halvings of the resolution from the finest map of the pass (the image, whether it is the input or
    the output): tile_size is in pixels there."""

    input = "input"  # the name of the pass's input map (a MoVQ decoder's zq)

    def __init__(self, size, channels):
        self.stages, self.stats_groups = [], {}
        self.source, self.size, self.channels, self.level = self.input, size, channels, 0
        self.ops, self.sizes, self.side_outputs = [], [size], []
        self.names = 0

    def new_name(self):
        self.names += 1
        return f"map{self.names}"

    def add(self, op, level_change=0):
        self.ops.append(op)
        self.size = op.out_size(self.size)
        self.sizes.append(self.size)
        self.level += level_change

    def conv(self, conv):
        """A stride-1 convolution: 1x1, or 3x3 with zero padding 1."""
        if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0):
            self.add(Pointwise(conv))
        elif conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1):
            self.add(Conv3x3(conv))
        else:
            raise VQCoreError(f"tiling supports 1x1 and 3x3 stride-1 pad-1 convolutions here; got {conv}")
        self.channels = conv.out_channels

    def pad_bottom_right_conv(self, conv):
        """One zero row and column padded at the bottom and right, then conv, a 3x3 stride-2 convolution."""
        if conv.kernel_size != (3, 3) or conv.stride != (2, 2) or conv.padding != (0, 0):
            raise VQCoreError(f"tiling supports 3x3 stride-2 pad-0 downsampling convolutions; got {conv}")
        self.add(PadConvStride2(conv), level_change=1)
        self.channels = conv.out_channels

    def upsample_nearest(self):
        """Nearest-neighbour x2 upsampling."""
        self.add(Upsample2x(), level_change=-1)

    def pointwise(self, fn):
        """Any per-pixel function that keeps the channel count (an activation may work in place)."""
        self.add(Pointwise(fn))

    def close(self, groups):
        """End the open segment; its output gets statistics for a norm with `groups` groups. Returns its name."""
        if self.ops:
            output = self.new_name()
            self.stages.append(Stage(self.source, self.ops, self.sizes, output, self.level, self.side_outputs))
            self.source, self.ops, self.sizes, self.side_outputs = output, [], [self.size], []
        if groups is not None:
            if self.stats_groups.get(self.source, groups) != groups:
                raise VQCoreError("tiling: one feature map normalised with two different group counts")
            self.stats_groups[self.source] = groups
        return self.source

    def normalise(self, norm, zq=None, modulate=None):
        """nn.GroupNorm `norm` with the statistics of the whole map, then modulate(normalised, zq) when zq, the name
        of a map, is given (zq nearest-upsampled to the map's size). Returns the name of the map normalised."""
        source = self.close(norm.num_groups)
        self.add(Normalise(norm, source, zq, modulate))
        return source

    def shortcut(self, fn):
        """A map made by the per-pixel fn from the open segment's input, at each tile core; returns its name."""
        self.side_outputs.append((self.new_name(), fn))
        return self.side_outputs[-1][0]

    def add_residual(self, name):
        """+ map `name` at the same pixels."""
        self.add(AddResidual(name))

    def attention(self, norm, zq, keys_values, attend):
        """Self-attention with residual over the whole map: tokens are the map normalised by `norm` (a norm block,
        given zq), keys_values(tokens) and attend(tokens, keys, values) as AttentionStage takes them."""
        source = norm.tile_program(self, zq)  # closes the open segment and opens one that holds only the norm
        normalise, self.ops, self.sizes = self.ops[0], [], [self.size]
        output = self.new_name()
        self.stages.append(AttentionStage(normalise, keys_values, attend, source, output, self.size, self.level))
        self.source = output

    def finish(self):
        """Closes the last segment and counts levels from the finest map; returns the program."""
        self.close(None)
        finest = min(stage.level for stage in self.stages)
        for stage in self.stages:
            stage.level -= finest
        return self


# ---------------------------------------------------------------------------------------------------------------------
# Running a program.


class Runner:
    """Runs a program's stages tile by tile for one image; maps live on the offload device."""

    def __init__(self, program, tile_size, device, dtype, offload_device, progress, should_cancel, counter):
        self.program, self.tile_size = program, tile_size
        self.device, self.dtype, self.offload_device = device, dtype, offload_device
        self.progress, self.should_cancel, self.counter = progress, should_cancel, counter
        self.maps, self.stats, self.affines = {}, {}, {}

    def tick(self):
        """Called before every tile: cancellation point."""
        if self.should_cancel is not None and self.should_cancel():
            raise TilingCancelled("tiled VAE pass cancelled")

    def done_tile(self):
        self.counter[0] += 1
        if self.progress is not None:
            self.progress(self.counter[0], self.counter[1])

    def read(self, name, region):
        return self.maps[name].read(region, self.device, self.dtype)

    def read_nearest(self, name, region, size):
        """Map `name` nearest-upsampled to `size` (what F.interpolate(mode="nearest") gives), over `region`."""
        source = self.maps[name]
        rows = torch.arange(region[0], region[1]) * source.size[0] // size[0]
        cols = torch.arange(region[2], region[3]) * source.size[1] // size[1]
        block = self.read(name, (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1))
        rows, cols = (rows - rows[0]).to(self.device), (cols - cols[0]).to(self.device)
        return block.index_select(-2, rows).index_select(-1, cols)

    def affine(self, op):
        """Per-channel scale and shift equal to GroupNorm with the global statistics of op.source."""
        if op not in self.affines:
            self.affines[op] = self.global_affine(op)
        return self.affines[op]

    def global_affine(self, op):
        """Computed in float64 on the CPU, once per stage."""
        norm = op.norm
        mean, var = self.stats[op.source]
        channels = norm.num_channels
        per_channel = channels // norm.num_groups
        rstd = (var + norm.eps).rsqrt().repeat_interleave(per_channel)
        mean = mean.repeat_interleave(per_channel)
        as_float64 = lambda t, default: t.detach().to("cpu", torch.float64) if t is not None else default
        scale = as_float64(norm.weight, 1.0) * rstd
        shift = as_float64(norm.bias, 0.0) - mean * scale
        as_map = lambda t: t.to(device=self.device, dtype=self.dtype).view(1, channels, 1, 1)
        return as_map(scale), as_map(shift)

    def run(self, source):
        self.maps["input"] = StageMap.wrap(source)
        last_use = {}
        for i, stage in enumerate(self.program.stages):
            for name in stage.reads:
                last_use[name] = i
        for i, stage in enumerate(self.program.stages):
            self.run_stage(stage, [name for name, last in last_use.items() if last == i])
            for name in [name for name, last in last_use.items() if last == i]:
                del self.maps[name]
                self.stats.pop(name, None)
        return self.maps[self.program.stages[-1].output].tensor()

    def free_unneeded(self, stage, grid, r, c, last_reads):
        """After tile (r, c): free the blocks of maps last read by this stage that the remaining tiles do not read
        (what a tile reads starts further right along a row and further down the grid)."""
        end = (float("inf"), float("inf"))
        rest_of_row = stage.first_needed(grid[r][c + 1]) if c + 1 < len(grid[r]) else {}
        later_rows = stage.first_needed(grid[r + 1][0]) if r + 1 < len(grid) else {}
        for name in stage.first_needed(grid[r][c]):
            if name in last_reads:
                row_top, next_left = rest_of_row.get(name, end)
                self.maps[name].free_unneeded(row_top, later_rows.get(name, end)[0], next_left)

    def run_stage(self, stage, last_reads):
        size = stage.sizes[-1]
        grid = stage_grid(stage, self.tile_size)
        if isinstance(stage, AttentionStage):
            stage.gather_keys_values(self, grid)
        groups = self.program.stats_groups.get(stage.output)
        stats = GroupStats(groups) if groups else None
        cores = [core for row in grid for core in row]
        for r, row in enumerate(grid):
            for c, core in enumerate(row):
                self.tick()
                tiles = {stage.output: stage.compute(self, core)}
                for name, fn in stage.side_outputs:
                    tiles[name] = fn(self.read(stage.source, core))
                for name, tile in tiles.items():
                    if name not in self.maps:
                        self.maps[name] = StageMap.empty(tile.shape[1], size, cores, self.offload_device, self.dtype)
                    self.maps[name].write(core, tile)
                if stats is not None:
                    stats.add(tiles[stage.output])
                del tiles
                self.free_unneeded(stage, grid, r, c, last_reads)
                self.done_tile()
            if MALLOC_TRIM is not None and self.offload_device.type == "cpu":
                # glibc keeps the freed blocks (tens of MB each) in its heaps rather than returning them to the
                # system, so without this the process would hold about one more stage map.
                MALLOC_TRIM(0)
        if isinstance(stage, AttentionStage):
            stage.release()
        if stats is not None:
            self.stats[stage.output] = stats.mean_var()


def stage_grid(stage, tile_size):
    """The tile cores of a stage: tile_size pixels at image resolution, tile_size / 2**level at the stage's level."""
    return tile_grid(stage.sizes[-1], max(1, tile_size >> stage.level))


def count_tiles(program, tile_size):
    return sum(stage.passes * sum(len(row) for row in stage_grid(stage, tile_size)) for stage in program.stages)


# ---------------------------------------------------------------------------------------------------------------------
# Public API.


def check_tile_size(model, tile_size):
    minimum = MIN_TILE_LATENTS * model.downscale_factor
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < minimum:
        raise VQCoreError(
            f"tile_size must be an integer of at least {minimum} pixels ({MIN_TILE_LATENTS} latent pixels of this "
            f"{model.downscale_factor}x autoencoder); got {tile_size!r}"
        )


def run_per_image(program, inputs, tile_size, model, progress, should_cancel, offload_device):
    """Runs the program on each batch item in turn; returns the outputs concatenated on the offload device (for an
    empty batch an empty one of the output's shape, as the full encode and decode give)."""
    if not len(inputs):
        return torch.empty(0, program.channels, *program.size, dtype=model.dtype, device=offload_device)
    counter = [0, count_tiles(program, tile_size) * inputs.shape[0]]
    outputs = []
    with torch.no_grad():
        for item in inputs.split(1):
            runner = Runner(program, tile_size, model.device, model.dtype, torch.device(offload_device), progress,
                            should_cancel, counter)
            outputs.append(runner.run(item))
    return torch.cat(outputs)


def quantize_latents(model, latents, offload_device):
    """model.quantize over the latents in row chunks: the codebook distances of a whole large map would be big."""
    rows = max(1, (1 << 22) // (latents.shape[-1] * model.quantize.num_embeddings))
    chunks = [model.quantize(latents[..., top:top + rows, :].to(model.device, model.dtype))[0].to(offload_device)
              for top in range(0, latents.shape[-2], rows)]
    return torch.cat(chunks, dim=-2)


def tiled_decode(model, latents, tile_size=512, progress=None, should_cancel=None, offload_device="cpu",
                 force_not_quantize=False):
    """model.decode(latents) computed tile by tile, equal to it up to float rounding; returns the image on
    offload_device.

    model: vqcore VQModel or AutoencoderKL. latents: (B, C, h, w), quantized first for a VQModel unless
    force_not_quantize; then they are used as they are (codebook vectors), or, given as integer (B, h, w) codebook
    indices, looked up first. tile_size: tile edge in output pixels. progress(done, total) is called after every
    tile; should_cancel() before every tile (return True to raise TilingCancelled, or raise your own exception).
    """
    check_tile_size(model, tile_size)
    is_vq = hasattr(model, "quantize")
    with torch.no_grad():
        if is_vq and force_not_quantize and isinstance(latents, torch.Tensor) and not latents.is_floating_point():
            quant = model.indices_to_embeddings(latents.to(model.device)).to(offload_device)
        else:
            check_input(latents, model.latent_channels, 1, "tiled_decode latents")
            check_floating(latents, "tiled_decode latents")
            quant = quantize_latents(model, latents, offload_device) if is_vq and not force_not_quantize else latents
    program = Program(tuple(quant.shape[-2:]), quant.shape[1])
    model.decode_tile_program(program)
    images = run_per_image(program.finish(), quant, tile_size, model, progress, should_cancel, offload_device)
    return check_result(images, "tiled_decode", "latents", quant, model.decoder_modules())


def tiled_encode(model, images, tile_size=512, progress=None, should_cancel=None, offload_device="cpu"):
    """model.encode(images) computed tile by tile, equal to it up to float rounding: continuous latents for a VQModel,
    a DiagonalGaussian for an AutoencoderKL, on the model's device (latents are small).

    tile_size: tile edge in input pixels; progress and should_cancel as for tiled_decode.
    """
    check_tile_size(model, tile_size)
    check_input(images, model.config["in_channels"], model.downscale_factor, "tiled_encode images")
    check_floating(images, "tiled_encode images")
    program = Program(tuple(images.shape[-2:]), images.shape[1])
    model.encode_tile_program(program)
    output = run_per_image(program.finish(), images, tile_size, model, progress, should_cancel, offload_device)
    output = check_result(output.to(model.device), "tiled_encode", "images", images, model.encoder_modules())
    return DiagonalGaussian(output) if not hasattr(model, "quantize") else output
