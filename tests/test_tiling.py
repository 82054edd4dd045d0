"""Seamless tiling: tiled decode/encode equal the full pass, where naive blended tiling (diffusers' algorithm) does not.

Tiny random models (fp32, CPU) whose norm affines are perturbed; the inputs have a strong spatial trend in mean and
scale, so per-tile GroupNorm statistics really differ from the global ones.
"""

import pytest
import torch

from vqcore.autoencoder import Attention, Chain, Level, MidBlock, Upsample
from vqcore.autoencoder_kl import AutoencoderKL
from vqcore.errors import VQCoreError
from vqcore.tiling import TilingCancelled, tiled_decode, tiled_encode
from vqcore.vq_model import VQModel

diffusers = pytest.importorskip("diffusers")

PIXEL_TOLERANCE = 2e-3  # max |difference| on the 0..1 pixel scale, tiled vs full
LATENT_TOLERANCE = 2e-3  # max |difference| of encoder outputs (latents, KL mean and logvar)
NAIVE_FACTOR = 10  # naive blended tiling must be off by more than this many tolerances on the same input
TILE = 16  # pixels: the 76x92 images below split into 5x6 tiles; 76 and 92 are not multiples of 16
LATENT_SIZE = (19, 23)  # factor-4 models -> 76x92 images

D, AD, U, AU = "DownEncoderBlock2D", "AttnDownEncoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"
KL_CONFIG = dict(block_out_channels=[32, 32, 64], down_block_types=[D, AD, D], up_block_types=[U, AU, U],
                 layers_per_block=1, latent_channels=4, norm_num_groups=8)
MOVQ_CONFIG = dict(block_out_channels=[32, 32, 64], down_block_types=[D, D, D], up_block_types=[U, AU, U],
                   layers_per_block=1, latent_channels=4, num_vq_embeddings=32, norm_type="spatial",
                   norm_num_groups=16)


def model_pair(ours_cls, theirs_cls, config, seed):
    """A diffusers model with perturbed norms and codebook, and ours loaded from its state dict (strict)."""
    torch.manual_seed(seed)
    theirs = perturbed(theirs_cls(**config).eval(), seed + 1)
    ours = ours_cls(**config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def perturbed(model, seed):
    """The model with its norm affines moved off (1, 0) and a codebook spread as wide as the latents."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
            elif "embedding" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def kl_models():
    return model_pair(AutoencoderKL, diffusers.AutoencoderKL, KL_CONFIG, seed=0)


@pytest.fixture(scope="module")
def movq_models():
    return model_pair(VQModel, diffusers.VQModel, MOVQ_CONFIG, seed=1)


def trending_latents(batch, channels, seed):
    """Latents whose mean drifts top to bottom and whose scale grows left to right."""
    gen = torch.Generator().manual_seed(seed)
    h, w = LATENT_SIZE
    noise = torch.randn(batch, channels, h, w, generator=gen)
    return noise * torch.linspace(0.2, 3.0, w) + torch.linspace(-2.0, 2.0, h)[:, None]


def trending_images(batch, seed):
    gen = torch.Generator().manual_seed(seed)
    h, w = 4 * LATENT_SIZE[0], 4 * LATENT_SIZE[1]
    noise = torch.rand(batch, 3, h, w, generator=gen) * 2 - 1
    return (noise * torch.linspace(0.1, 1.0, w) + torch.linspace(-0.5, 0.5, h)[:, None]).clamp(-1, 1)


def pixel_error(a, b):
    """max |a - b| on the 0..1 scale of images in [-1, 1]."""
    return ((a - b) / 2).abs().max().item()


def assert_tiling_seamless(tiled, full, reference, naive):
    """Our full decode is diffusers'; our tiled decode equals it, diffusers' blended tiling does not."""
    assert full.std() > 0.2  # outputs are not near-constant, so the bounds below mean something
    assert pixel_error(full, reference) < 1e-5
    assert tiled.shape == full.shape
    assert pixel_error(tiled, full) <= PIXEL_TOLERANCE
    assert pixel_error(naive, full) > NAIVE_FACTOR * PIXEL_TOLERANCE


def naive_blended_tiling(fn, x, tile_in, tile_out, overlap=0.25):
    """diffusers' tiled_decode / _tiled_encode algorithm: overlapping tiles processed independently, cross-faded
    (in place, against already blended neighbours) and cropped."""
    stride, blend = int(tile_in * (1 - overlap)), int(tile_out * overlap)
    keep = tile_out - blend
    rows = [[fn(x[..., i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[-1], stride)]
            for i in range(0, x.shape[-2], stride)]
    result = []
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                above, e = rows[i - 1][j], min(rows[i - 1][j].shape[-2], tile.shape[-2], blend)
                for y in range(e):
                    tile[..., y, :] = above[..., y - e, :] * (1 - y / e) + tile[..., y, :] * (y / e)
            if j > 0:
                left, e = row[j - 1], min(row[j - 1].shape[-1], tile.shape[-1], blend)
                for c in range(e):
                    tile[..., c] = left[..., c - e] * (1 - c / e) + tile[..., c] * (c / e)
        result.append(torch.cat([tile[..., :keep, :keep] for tile in row], dim=-1))
    return torch.cat(result, dim=-2)


def test_naive_reimplementation_matches_diffusers(kl_models):
    """The blended-tiling baseline used below for the VQ model is diffusers' own algorithm."""
    _, theirs = kl_models
    z = trending_latents(1, 4, seed=5)
    theirs.tile_sample_min_size, theirs.tile_latent_min_size = 8 * 4, 8
    with torch.no_grad():
        expected = theirs.tiled_decode(z).sample
        got = naive_blended_tiling(lambda t: theirs.decoder(theirs.post_quant_conv(t)), z, 8, 32)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-6


def test_kl_tiled_decode_equals_full_decode_where_blending_does_not(kl_models):
    ours, theirs = kl_models
    z = trending_latents(2, 4, seed=2)
    with torch.no_grad():
        full = ours.decode(z)
        reference = theirs.decode(z).sample
        theirs.tile_sample_min_size, theirs.tile_latent_min_size = 8 * 4, 8  # 4x4 blended tiles
        naive = theirs.tiled_decode(z).sample
    assert full.shape == (2, 3, 76, 92)
    assert_tiling_seamless(tiled_decode(ours, z, tile_size=TILE), full, reference, naive)


def test_movq_tiled_decode_equals_full_decode_where_blending_does_not(movq_models):
    ours, theirs = movq_models
    z = trending_latents(1, 4, seed=3)
    with torch.no_grad():
        full = ours.decode(z)
        reference = theirs.decode(z).sample
        naive = naive_blended_tiling(lambda t: theirs.decode(t).sample, z, 8, 32)
    assert_tiling_seamless(tiled_decode(ours, z, tile_size=TILE), full, reference, naive)


class AttentionFirstLevel(Chain):
    """An up level no stock decoder has: attention at the input's resolution, a stock attention level, then a mid
    block at the level's output resolution. It states only its arrangement; tiling follows from its blocks."""

    def __init__(self, in_channels, out_channels, groups, zq_channels):
        super().__init__()
        self.first = Attention(in_channels, groups, zq_channels)
        self.level = Level(in_channels=in_channels, out_channels=out_channels, num_layers=2, groups=groups,
                           act_fn="silu", attention=True, resampler=Upsample(out_channels), zq_channels=zq_channels)
        self.last = MidBlock(channels=out_channels, groups=groups, act_fn="silu", add_attention=True,
                             zq_channels=zq_channels)

    def parts(self):
        return [self.first, self.level, self.last]


def test_a_new_block_arrangement_tiles_seamlessly():
    """A 3-level MoVQ decoder whose middle up level is rearranged (attention before it, a mid block after it): the
    tiled decode equals the full one, where blended tiling does not."""
    torch.manual_seed(11)
    model = VQModel(**MOVQ_CONFIG).eval()
    model.decoder.up_blocks[1] = AttentionFirstLevel(64, 32, MOVQ_CONFIG["norm_num_groups"], 4)
    perturbed(model, seed=12)
    z = trending_latents(1, 4, seed=13)
    with torch.no_grad():
        full = model.decode(z)
        naive = naive_blended_tiling(model.decode, z, 8, 32)
    assert full.shape == (1, 3, 76, 92) and full.std() > 0.2
    assert pixel_error(tiled_decode(model, z, tile_size=TILE), full) <= PIXEL_TOLERANCE
    assert pixel_error(naive, full) > NAIVE_FACTOR * PIXEL_TOLERANCE


def test_vq_decode_of_codebook_vectors_and_indices(movq_models):
    ours, _ = movq_models
    z = trending_latents(1, 4, seed=4)
    with torch.no_grad():
        quant, _, indices = ours.quantize(z)
        full = ours.decode_indices(indices)
    from_vectors = tiled_decode(ours, quant, tile_size=TILE, force_not_quantize=True)
    from_indices = tiled_decode(ours, indices, tile_size=TILE, force_not_quantize=True)
    assert pixel_error(from_vectors, full) <= PIXEL_TOLERANCE
    assert pixel_error(from_indices, full) <= PIXEL_TOLERANCE


def test_kl_tiled_encode_equals_full_encode_where_blending_does_not(kl_models):
    ours, theirs = kl_models
    images = trending_images(2, seed=6)
    with torch.no_grad():
        full = ours.encode(images)
        theirs.tile_sample_min_size, theirs.tile_latent_min_size = 8 * 4, 8
        naive_mean = theirs._tiled_encode(images)[:, :4]
    tiled = tiled_encode(ours, images, tile_size=TILE)
    assert full.mean.std() > 0.1
    assert (tiled.mean - full.mean).abs().max().item() <= LATENT_TOLERANCE
    assert (tiled.logvar - full.logvar).abs().max().item() <= LATENT_TOLERANCE
    assert (naive_mean - full.mean).abs().max().item() > NAIVE_FACTOR * LATENT_TOLERANCE


def test_vq_tiled_encode_equals_full_encode_where_blending_does_not(movq_models):
    ours, theirs = movq_models
    images = trending_images(1, seed=7)
    with torch.no_grad():
        full = ours.encode(images)
        naive = naive_blended_tiling(lambda t: theirs.encode(t).latents, images, 32, 8)
    tiled = tiled_encode(ours, images, tile_size=TILE)
    assert full.std() > 0.1
    assert tiled.shape == full.shape
    assert (tiled - full).abs().max().item() <= LATENT_TOLERANCE
    assert (naive - full).abs().max().item() > NAIVE_FACTOR * LATENT_TOLERANCE


def test_progress_and_cancel(kl_models):
    ours, _ = kl_models
    z = trending_latents(1, 4, seed=8)
    calls = []
    tiled_decode(ours, z, tile_size=TILE, progress=lambda done, total: calls.append((done, total)))
    total = calls[-1][1]
    assert calls == [(i + 1, total) for i in range(total)]
    seen = []
    with pytest.raises(TilingCancelled):
        tiled_decode(ours, z, tile_size=TILE, should_cancel=lambda: len(seen) >= 3,
                     progress=lambda done, total: seen.append(done))
    assert len(seen) == 3


def test_tile_size_below_minimum(kl_models):
    ours, _ = kl_models
    with pytest.raises(VQCoreError, match="tile_size"):
        tiled_decode(ours, trending_latents(1, 4, seed=9), tile_size=8)  # minimum: 4 latent pixels = 16 here
    with pytest.raises(VQCoreError, match="tile_size"):
        tiled_encode(ours, trending_images(1, seed=9), tile_size=15)


def test_wrong_channel_count(kl_models, movq_models):
    with pytest.raises(VQCoreError, match=r"tiled_decode latents.*\(1, 3, 19, 23\)"):
        tiled_decode(kl_models[0], trending_latents(1, 3, seed=10), tile_size=TILE)
    with pytest.raises(VQCoreError, match=r"tiled_decode latents.*\(1, 5, 19, 23\)"):
        tiled_decode(movq_models[0], trending_latents(1, 5, seed=10), tile_size=TILE)
    with pytest.raises(VQCoreError, match=r"tiled_encode images.*\(1, 4, 8, 8\)"):
        tiled_encode(kl_models[0], torch.zeros(1, 4, 8, 8), tile_size=TILE)
