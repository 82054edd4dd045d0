"""Bad arguments and tensors given to vqcore's models, sampler and device helpers: each is a VQCoreError whose
message names the argument or tensor at fault (never a torch error from deep inside, never a NaN image)."""

import re

import pytest
import torch

from vqcore import tiling
from vqcore.autoencoder_kl import AutoencoderKL
from vqcore.devices import available_devices, default_device, resolve_device
from vqcore.errors import NonFiniteResult, VQCoreError
from vqcore.loading import load_autoencoder
from vqcore.sampler import sample
from vqcore.scheduler import VQDiffusionScheduler
from vqcore.transformer import VQDiffusionTransformer
from vqcore.vq_diffusion import load_vq_diffusion
from vqcore.vq_model import VQModel

TWO_LEVELS = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2)


@pytest.fixture(scope="module")
def vq_model():
    torch.manual_seed(0)
    return VQModel(**TWO_LEVELS, latent_channels=4, num_vq_embeddings=16).eval()


@pytest.fixture(scope="module")
def kl_model():
    torch.manual_seed(1)
    return AutoencoderKL(**TWO_LEVELS).eval()


@pytest.mark.parametrize("name", ["vq_model", "kl_model"])
def test_tiled_empty_batch_matches_full(name, request):
    model = request.getfixturevalue(name)
    latents, images = torch.zeros(0, model.latent_channels, 8, 8), torch.zeros(0, 3, 16, 16)
    with torch.no_grad():
        assert tiling.tiled_decode(model, latents, tile_size=32).shape == model.decode(latents).shape == (0, 3, 16, 16)
        tiled, full = tiling.tiled_encode(model, images, tile_size=32), model.encode(images)
    moments = lambda encoded: getattr(encoded, "moments", encoded)
    assert moments(tiled).shape == moments(full).shape
    assert moments(full).shape[0] == 0 and moments(full).shape[2:] == (8, 8)


# ---- input dtypes ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vq_model", "kl_model"])
def test_half_precision_image_into_a_float32_model_is_cast(name, request):
    model = request.getfixturevalue(name)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)).half() * 2 - 1
    with torch.no_grad():
        moments = lambda encoded: getattr(encoded, "moments", encoded)
        assert torch.equal(moments(model.encode(image)), moments(model.encode(image.float())))
        latents = torch.randn(1, model.latent_channels, 4, 4).half()
        assert torch.equal(model.decode(latents), model.decode(latents.float()))


@pytest.mark.parametrize("name", ["vq_model", "kl_model"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_images_and_latents_are_refused(name, dtype, request):
    model = request.getfixturevalue(name)
    calls = [("encode images", model.encode, torch.zeros(1, 3, 16, 16, dtype=dtype)),
             ("decode latents", model.decode, torch.zeros(1, model.latent_channels, 4, 4, dtype=dtype)),
             ("tiled_encode images", lambda x: tiling.tiled_encode(model, x, tile_size=32), torch.zeros(1, 3, 16, 16, dtype=dtype)),
             ("tiled_decode latents", lambda x: tiling.tiled_decode(model, x, tile_size=32),
              torch.zeros(1, model.latent_channels, 4, 4, dtype=dtype))]
    for what, fn, x in calls:
        with pytest.raises(VQCoreError) as info:
            fn(x)
        message = str(info.value)
        assert what in message and str(dtype) in message and "[-1, 1]" in message, message
    if dtype == torch.uint8:
        assert "127.5" in message  # how to get there from 8-bit pixels


# ---- codebook lookups -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("index", [16, 1000, -1])
def test_codebook_index_out_of_range(vq_model, index):
    indices = torch.tensor([[0, 3], [index, 2]])
    with pytest.raises(VQCoreError, match=r"get_codebook_entry indices must lie in \[0, 15\].*" + str(index)):
        vq_model.quantize.get_codebook_entry(indices.flatten(), (1, 2, 2, 4))
    with pytest.raises(VQCoreError, match=r"indices must lie in \[0, 15\]"):
        vq_model.decode_indices(indices[None])


def test_codebook_entry_bad_indices_or_shape(vq_model):
    with pytest.raises(VQCoreError, match="integer tensor; got torch.float32"):
        vq_model.quantize.get_codebook_entry(torch.zeros(4), (1, 2, 2, 4))
    with pytest.raises(VQCoreError, match=r"shape must be \(batch, height, width, 4\).*\(1, 2, 3, 4\)"):
        vq_model.quantize.get_codebook_entry(torch.zeros(4, dtype=torch.long), (1, 2, 3, 4))
    assert vq_model.quantize.get_codebook_entry(torch.arange(4), (1, 2, 2, 4)).shape == (1, 4, 2, 2)


# ---- devices and seeds ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device, says", [("cuda:7", "not available"), ("gpu0", "not a device name"),
                                          ("mps:3", "not available"), ("cpu:1", "not available")])
def test_unknown_or_absent_device(device, says, demo_models):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(VQCoreError) as info:
        resolve_device(device)
    message = str(info.value)
    assert repr(device) in message and says in message and "cpu" in message.split("available")[-1], message
    with pytest.raises(VQCoreError, match=re.escape(repr(device))):
        load_autoencoder(demo_models / "vq_models" / "demo-vq-f8.safetensors", device=device)
    with pytest.raises(VQCoreError, match=re.escape(repr(device))):
        load_vq_diffusion(demo_models / "diffusers" / "vq-diffusion-demo", device=device)


def test_available_devices_resolve():
    for name in available_devices():
        assert resolve_device(name) == torch.device(name)
    assert resolve_device(None) == default_device()


@pytest.fixture(scope="module")
def tiny_sampler():
    torch.manual_seed(0)
    transformer = VQDiffusionTransformer(num_attention_heads=1, attention_head_dim=8, num_layers=1, cross_attention_dim=8,
                                         sample_size=2, num_vector_embeds=5, num_embeds_ada_norm=4).eval()
    return transformer, VQDiffusionScheduler(5, num_train_timesteps=4)


@pytest.mark.parametrize("seed", [2**70, 2**64, -1, 2.5, "7", True])
def test_seed_out_of_range(tiny_sampler, seed):
    with pytest.raises(VQCoreError, match=r"seed must be an integer in \[0, 2\*\*64 - 1\]") as info:
        sample(*tiny_sampler, torch.zeros(1, 3, 8), guidance_scale=1.0, seed=seed)
    assert repr(seed) in str(info.value)


def test_every_comfyui_seed_is_accepted(tiny_sampler):
    runs = [sample(*tiny_sampler, torch.zeros(1, 3, 8), guidance_scale=1.0, seed=seed) for seed in (0, 2**63, 2**64 - 1)]
    assert all(tokens.shape == (1, 2, 2) for tokens in runs)


# ---- NaN/inf results ------------------------------------------------------------------------------------------------

def poisoned(model, name, value=float("nan")):
    """A copy of the model with one entry of weight `name` set to value."""
    copy = type(model).from_config(model.config).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        copy.get_parameter(name).view(-1)[0] = value
    return copy


def assert_names(fn, *parts, error=NonFiniteResult):
    with pytest.raises(error) as info, torch.no_grad():
        fn()
    message = str(info.value)
    assert all(part in message for part in parts), message
    return message


@pytest.mark.parametrize("name", ["vq_model", "kl_model"])
def test_nan_weight_is_named_by_every_decode_and_encode(name, request):
    model = request.getfixturevalue(name)
    latents, image = torch.randn(1, model.latent_channels, 4, 4), torch.rand(1, 3, 16, 16) * 2 - 1
    decoder = poisoned(model, "decoder.conv_out.weight")
    for what, fn in [("decode", lambda: decoder.decode(latents)),
                     ("tiled_decode", lambda: tiling.tiled_decode(decoder, latents, tile_size=32))]:
        assert_names(fn, what, "finite latents", "decoder.conv_out.weight")
    encoder = poisoned(model, "encoder.conv_in.weight", float("inf"))
    for what, fn in [("encode", lambda: encoder.encode(image)),
                     ("tiled_encode", lambda: tiling.tiled_encode(encoder, image, tile_size=32))]:
        assert_names(fn, what, "finite images", "encoder.conv_in.weight")
    with torch.no_grad():  # a NaN weight the pass does not use is not blamed, and does not stop it
        assert torch.isfinite(decoder.encode(image) if name == "vq_model" else decoder.encode(image).moments).all()


@pytest.mark.parametrize("name", ["vq_model", "kl_model"])
def test_float32_overflow_names_the_input(name, request):
    model = request.getfixturevalue(name)
    huge = torch.full((1, model.latent_channels, 4, 4), 3e38)
    decode = (lambda: model.decode(huge, force_not_quantize=True)) if name == "vq_model" else (lambda: model.decode(huge))
    assert_names(decode, "decode", "finite latents", "3e+38", "overflowed float32")


def test_half_precision_overflow_says_to_use_float32(kl_model):
    model = poisoned(kl_model, "decoder.conv_in.weight", 6e4)  # activations beyond fp16's 65504, fine in fp32
    latents = torch.full((1, 4, 4, 4), 100.0)
    with torch.no_grad():
        assert torch.isfinite(model.decode(latents)).all()
    assert_names(lambda: model.half().decode(latents), "overflowed float16", "load the model in float32")


def test_nan_latents_are_named_not_the_weights(vq_model):
    latents = torch.randn(1, 4, 4, 4)
    latents[0, 0, 0, 0] = float("nan")
    assert_names(lambda: vq_model.decode(latents), "latents", "NaN", error=VQCoreError)
    assert_names(lambda: vq_model.quantize(latents), "quantize latents", "NaN", error=VQCoreError)


def test_nan_codebook_entry_is_an_error_not_a_black_image(vq_model):
    model = poisoned(vq_model, "quantize.embedding.weight")  # entry 0
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    message = assert_names(lambda: model.quantize(latents), "codebook entries [0]", "quantize.embedding.weight")
    assert "16 latent pixels" in message  # argmin took the NaN code everywhere
    for fn in (lambda: model.decode(latents), lambda: tiling.tiled_decode(model, latents, tile_size=32)):
        assert_names(fn, "quantize.embedding.weight")
    assert_names(lambda: model.decode_indices(torch.zeros(1, 4, 4, dtype=torch.long)), "codebook indices",
                 "quantize.embedding.weight")
    with torch.no_grad():  # codes other than the damaged one still decode
        assert torch.isfinite(model.decode_indices(torch.ones(1, 4, 4, dtype=torch.long))).all()
