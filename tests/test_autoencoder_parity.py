"""vqcore's VQModel and AutoencoderKL against diffusers (the reference), fp32 on CPU, same saved folder loaded by both.

Every config is a tiny random model whose norms and codebook are perturbed away from their trivial initial values.
"""

import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from vqcore.autoencoder import use_fast_path  # noqa: E402
from vqcore.autoencoder_kl import AutoencoderKL  # noqa: E402
from vqcore.loading import load_autoencoder_kl, load_vqmodel  # noqa: E402
from vqcore.vq_model import VQModel  # noqa: E402

ATOL = 1e-5  # max |difference| allowed for every float output of the fast path; indices must be equal
# The exact path (the default) must be bit-identical. The fast path (decoding with channels-last maps, upsampling as a
# transposed convolution, on CPU torch's channels-last GroupNorm checked for cancellation) moves results by float32
# rounding.
PATHS = ("exact", "fast")


@pytest.fixture
def on_path():
    """on_path(model, path): the model switched to that path."""
    return lambda model, path: use_fast_path(model, path != "exact")

D, AD, U, AU = "DownEncoderBlock2D", "AttnDownEncoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"

VQ_CONFIGS = {
    # vq_embed_dim != latent_channels, attention inside down and up levels, batch 3, non-square.
    "vq_group_embed_dim": dict(
        config=dict(block_out_channels=[32, 64], down_block_types=[D, AD], up_block_types=[AU, U],
                    layers_per_block=1, latent_channels=4, vq_embed_dim=3, num_vq_embeddings=24, norm_num_groups=8),
        image=(3, 3, 20, 28),
    ),
    # MoVQ: SpatialNorm decoder conditioned on the codebook vectors, odd latent size (5x7), batch 1.
    "movq_spatial": dict(
        config=dict(block_out_channels=[32, 32, 64], down_block_types=[D, D, D], up_block_types=[U, U, AU],
                    layers_per_block=1, latent_channels=4, num_vq_embeddings=32, norm_type="spatial",
                    norm_num_groups=16),
        image=(1, 3, 20, 28),
    ),
    # aMUSEd-style: indices decoded through lookup_from_codebook; no mid-block attention; one level.
    "vq_lookup_no_mid_attention": dict(
        config=dict(block_out_channels=[32], layers_per_block=2, latent_channels=8, num_vq_embeddings=16,
                    norm_num_groups=8, mid_block_add_attention=False, lookup_from_codebook=True),
        image=(3, 3, 9, 13),
    ),
}

KL_CONFIGS = {
    # SD-shaped: quant convs, two layers per level, batch 3.
    "kl_sd_like": dict(
        config=dict(block_out_channels=[32, 64], down_block_types=[D, D], up_block_types=[U, U], layers_per_block=2,
                    latent_channels=4, norm_num_groups=16, latents_mean=[0.1, -0.2, 0.3, 0.0],
                    latents_std=[1.5, 0.5, 2.0, 1.0]),
        image=(3, 3, 24, 16),
    ),
    # SD3/Flux-shaped: 16 latent channels, no quant convs, odd latent size (5x3), batch 1.
    "kl_16ch_no_quant_convs": dict(
        config=dict(block_out_channels=[32, 32, 64], down_block_types=[D, D, D], up_block_types=[U, U, U],
                    layers_per_block=1, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                    use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611),
        image=(1, 3, 20, 12),
    ),
    # Attention inside levels but not in the mid block.
    "kl_level_attention_no_mid": dict(
        config=dict(block_out_channels=[32, 64], down_block_types=[AD, D], up_block_types=[U, AU],
                    layers_per_block=1, latent_channels=4, norm_num_groups=8, mid_block_add_attention=False),
        image=(2, 3, 14, 18),
    ),
}


def perturb(model, seed):
    """Move norm affines and the codebook away from their initial values so that they matter in the comparison."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
            elif "embedding" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    return model


def save_reference(cls, config, folder, seed):
    torch.manual_seed(seed)
    reference = perturb(cls(**config), seed).eval()
    reference.save_pretrained(folder)
    return reference


def assert_close(ours, reference, what, path):
    assert ours.shape == reference.shape, what
    diff = (ours - reference).abs().max().item()
    bound = 0.0 if path == "exact" else ATOL
    assert diff <= bound, f"{what} ({path} path): max |diff| {diff:.3g} > {bound}"


def image(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", VQ_CONFIGS)
@torch.inference_mode()
def test_vqmodel_matches_diffusers(name, path, tmp_path, on_path):
    case = VQ_CONFIGS[name]
    reference = save_reference(diffusers.VQModel, case["config"], tmp_path, seed=1)
    ours = on_path(load_vqmodel(tmp_path, device="cpu", dtype="fp32"), path)
    x = image(case["image"], seed=2)

    latents = ours.encode(x)
    ref_latents = reference.encode(x).latents
    assert_close(latents, ref_latents, "encode", path)

    z_q, loss, indices = ours.quantize(latents)
    ref_z_q, ref_loss, (_, _, ref_indices) = reference.quantize(ref_latents)
    b, e, h, w = ref_z_q.shape
    assert indices.shape == (b, h, w)
    assert torch.equal(indices.flatten(), ref_indices)
    assert len(indices.unique()) > 1, "degenerate test model: every pixel picked the same code"
    assert_close(z_q, ref_z_q, "quantize z_q", path)
    assert_close(loss, ref_loss, "commit loss", path)

    assert_close(ours.decode(latents), reference.decode(ref_latents).sample, "decode (quantizing)", path)
    embeddings = ours.indices_to_embeddings(indices)
    ref_embeddings = reference.quantize.get_codebook_entry(ref_indices, (b, h, w, e))
    assert_close(embeddings, ref_embeddings, "indices_to_embeddings", path)
    if case["config"].get("lookup_from_codebook"):
        ref_image = reference.decode(ref_indices, force_not_quantize=True, shape=(b, h, w, e)).sample
        assert_close(ours.decode(indices, force_not_quantize=True), ref_image, "decode (lookup_from_codebook)", path)
    else:
        ref_image = reference.decode(ref_embeddings, force_not_quantize=True).sample
        assert_close(ours.decode(embeddings, force_not_quantize=True), ref_image, "decode (force_not_quantize)", path)
        assert_close(ours.decode(latents, force_not_quantize=True),
                     reference.decode(ref_latents, force_not_quantize=True).sample, "decode (unquantized latents)", path)
    assert_close(ours.decode_indices(indices), ref_image, "decode_indices", path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", KL_CONFIGS)
@torch.inference_mode()
def test_autoencoder_kl_matches_diffusers(name, path, tmp_path, on_path):
    case = KL_CONFIGS[name]
    reference = save_reference(diffusers.AutoencoderKL, case["config"], tmp_path, seed=3)
    ours = on_path(load_autoencoder_kl(tmp_path, device="cpu", dtype="fp32"), path)
    x = image(case["image"], seed=4)

    posterior = ours.encode(x)
    ref_posterior = reference.encode(x).latent_dist
    for field in ("mean", "logvar", "std", "var"):
        assert_close(getattr(posterior, field), getattr(ref_posterior, field), f"posterior {field}", path)
    assert_close(posterior.kl(), ref_posterior.kl(), "kl", path)
    assert_close(posterior.mode(), ref_posterior.mode(), "mode", path)
    sample = posterior.sample(torch.Generator().manual_seed(5))
    assert_close(sample, ref_posterior.sample(torch.Generator().manual_seed(5)), "seeded sample", path)
    generators = [torch.Generator().manual_seed(6 + i) for i in range(x.shape[0])]
    ref_generators = [torch.Generator().manual_seed(6 + i) for i in range(x.shape[0])]
    assert_close(posterior.sample(generators), ref_posterior.sample(ref_generators), "per-item seeded sample", path)

    assert_close(ours.decode(sample), reference.decode(sample).sample, "decode", path)


# Against the same model computed in float64 (diffusers'), the fast path must be as accurate as the exact path
# (diffusers' float32 bits): its largest error may exceed the exact path's by float32 rounding, ROUNDING times the
# magnitude of the output (16 float32 ulps; the exact and fast paths round in different orders).
ROUNDING = 16 * torch.finfo(torch.float32).eps
# A 3-level f4 VQ model as diffusers initialises it (norms at weight 1, bias 0): on a low-contrast image its feature
# maps have a large mean against their spread, where torch's channels-last CPU GroupNorm loses precision.
DEFAULT_INIT_F4 = dict(
    config=dict(block_out_channels=[32, 64, 64], down_block_types=[D] * 3, up_block_types=[U] * 3,
                layers_per_block=1, latent_channels=4, num_vq_embeddings=256, norm_num_groups=32),
    image=(2, 3, 64, 64),
)
PRECISION_CONFIGS = {**VQ_CONFIGS, **KL_CONFIGS, "vq_f4_default_init": DEFAULT_INIT_F4}


def low_contrast(shape, seed):
    """A nearly flat grey image: pixels 0.6 +- 0.02."""
    return 0.6 + 0.02 * image(shape, seed)


def assert_as_accurate(fast, exact, truth, what):
    """fast and exact: float32 outputs of the two paths; truth: the float64 one."""
    fast_error, exact_error = ((out.double() - truth).abs().max().item() for out in (fast, exact))
    bound = exact_error + ROUNDING * truth.abs().max().item()
    assert fast_error <= bound, f"{what}: fast path {fast_error:.3g} from float64, exact path {exact_error:.3g}"


@pytest.mark.parametrize("name", PRECISION_CONFIGS)
@torch.inference_mode()
def test_fast_path_is_as_accurate_as_the_exact_path(name):
    """Encodes of an ordinary and a low-contrast image, decodes of the latents and of latents with a large mean
    (3 +- 0.1): the fast path's distance from float64 is the exact path's up to float32 rounding."""
    case = PRECISION_CONFIGS[name]
    vq = name not in KL_CONFIGS
    torch.manual_seed(1)
    reference = (diffusers.VQModel if vq else diffusers.AutoencoderKL)(**case["config"]).eval()
    if case is not DEFAULT_INIT_F4:
        perturb(reference, seed=1)
    exact = (VQModel if vq else AutoencoderKL).from_config(dict(reference.config))
    exact.load_state_dict(reference.state_dict(), strict=True)
    fast, float64 = use_fast_path(copy.deepcopy(exact)), copy.deepcopy(reference).double()
    spatial = case["config"].get("norm_type") == "spatial"

    if vq:
        encode, encode64 = (lambda model, x: model.encode(x)), (lambda x: float64.encode(x).latents)
        decode = lambda model, z: model.decode_embeddings(z)  # the decoder, without quantizing
        decode64 = lambda z: float64.decoder(float64.post_quant_conv(z), z if spatial else None)
    else:
        encode = lambda model, x: model.encode(x).moments
        encode64 = lambda x: float64.encode(x).latent_dist.parameters
        decode, decode64 = (lambda model, z: model.decode(z)), (lambda z: float64.decode(z).sample)
    images = {"an image": image(case["image"], seed=2), "a low-contrast image": low_contrast(case["image"], 2)}
    for what, x in images.items():
        assert_as_accurate(encode(fast, x), encode(exact, x), encode64(x.double()), f"encode of {what}")
    latents = encode(exact, image(case["image"], seed=2))[:, :exact.latent_channels]
    large_mean = 3 + 0.1 * torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    for what, z in (("latents", latents), ("latents with a large mean", large_mean)):
        assert_as_accurate(decode(fast, z), decode(exact, z), decode64(z.double()), f"decode of {what}")


@torch.inference_mode()
def test_fast_path_quantizes_a_low_contrast_batch_like_the_exact_path():
    """4096 tokens per image of a 3-level f4 VQ model over a low-contrast batch, with a codebook of 64 latent vectors
    of another low-contrast image (so that many latents lie near the boundary between two codes): a model on the fast
    path picks the exact path's tokens (a channels-last encoder with torch's GroupNorm flips about 20)."""
    torch.manual_seed(0)
    exact = VQModel(**DEFAULT_INIT_F4["config"]).eval()
    other = exact.encode(low_contrast((1, 3, 256, 256), seed=3))
    vectors = other.permute(0, 2, 3, 1).reshape(-1, other.shape[1])
    chosen = torch.randperm(len(vectors), generator=torch.Generator().manual_seed(2))[:64]
    exact.quantize.embedding.weight[:64] = vectors[chosen]
    exact.quantize.embedding.weight[64:] = 10.0  # far from every latent
    fast = use_fast_path(copy.deepcopy(exact))
    x = low_contrast((2, 3, 256, 256), seed=1)
    tokens = exact.quantize(exact.encode(x))[2]
    assert len(tokens.unique()) > 32
    flipped = (fast.quantize(fast.encode(x))[2] != tokens).sum().item()
    assert flipped == 0, f"{flipped} of {tokens.numel()} tokens differ from the exact path's"


def test_fp16_sample_is_drawn_in_half_precision():
    """diffusers draws posterior noise in the model dtype; on CPU an fp16 draw differs from an fp32 draw cast down."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from vqcore.autoencoder_kl import DiagonalGaussian

    moments = torch.randn(2, 8, 5, 3).half()
    ours = DiagonalGaussian(moments).sample(torch.Generator().manual_seed(7))
    reference = DiagonalGaussianDistribution(moments).sample(torch.Generator().manual_seed(7))
    assert ours.dtype == torch.float16 and torch.equal(ours, reference)


def test_latent_scaling_helpers_follow_diffusers_pipelines():
    sd = AutoencoderKL(scaling_factor=0.5)
    flux = AutoencoderKL(latent_channels=2, scaling_factor=0.5, shift_factor=0.25)
    sdxl_like = AutoencoderKL(latent_channels=2, scaling_factor=0.5, latents_mean=[1.0, 2.0], latents_std=[2.0, 4.0])
    z = torch.ones(1, 4, 2, 2)
    assert torch.equal(sd.scale_latents(z), z * 0.5) and torch.equal(sd.unscale_latents(z * 0.5), z)
    z2 = z[:, :2]
    assert torch.equal(flux.scale_latents(z2), (z2 - 0.25) * 0.5)
    assert torch.equal(flux.unscale_latents(z2), z2 / 0.5 + 0.25)
    expected = torch.tensor([0.0, -0.125]).view(1, 2, 1, 1).expand(1, 2, 2, 2)  # (1 - mean) * 0.5 / std
    assert torch.equal(sdxl_like.scale_latents(z2), expected)
    assert torch.allclose(sdxl_like.unscale_latents(expected), z2)


SMALL_KL = dict(block_out_channels=[32, 32], down_block_types=[D, D], up_block_types=[U, U], latent_channels=4)


@pytest.mark.parametrize("safe_serialization", [True, False])
@torch.inference_mode()
def test_sharded_folder_loads(safe_serialization, tmp_path):
    """Shards split the VAE anywhere: most hold neither conv_in, so no shard can be read as a VAE on its own."""
    torch.manual_seed(8)
    reference = perturb(diffusers.AutoencoderKL(**SMALL_KL), 8).eval()
    reference.save_pretrained(tmp_path, max_shard_size="40KB", safe_serialization=safe_serialization)
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*"))) > 2
    x = image((1, 3, 8, 8), seed=9)
    assert_close(load_autoencoder_kl(tmp_path, device="cpu").encode(x).mean, reference.encode(x).latent_dist.mean, "encode",
                 "exact")


@torch.inference_mode()
def test_sharded_fp16_variant_folder_loads(tmp_path):
    """diffusers names the variant's shard index x.safetensors.index.fp16.json (variant after "index")."""
    torch.manual_seed(10)
    reference = perturb(diffusers.AutoencoderKL(**SMALL_KL), 10).eval().half()
    reference.save_pretrained(tmp_path, max_shard_size="20KB", variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    ours = load_autoencoder_kl(tmp_path, device="cpu", variant="fp16")
    assert torch.equal(ours.decoder.conv_out.weight, reference.decoder.conv_out.weight.float())
