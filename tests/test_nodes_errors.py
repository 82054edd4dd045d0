"""Bad input through the nodes: each error is a VQCoreError whose message starts with the node input at fault."""

import logging
import shutil

import pytest
import torch
from nodes_support import plain_host


@pytest.fixture
def nodes(pack, demo_models):
    with plain_host(pack, demo_models):
        yield {node_id: cls() for node_id, cls in pack.NODE_CLASS_MAPPINGS.items()}


@pytest.fixture
def error(pack):
    def raised(input_name, fn, *args, **kwargs):
        with pytest.raises(pack.vqcore.errors.VQCoreError) as info:
            fn(*args, **kwargs)
        message = str(info.value)
        assert message.startswith(f"{input_name}:"), message
        return message
    return raised


def tokens_of(nodes, vq_vae, size=32):
    image = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(0))
    return nodes["VQCoreEncode"].encode(vq_vae, image)["result"][1]


def test_missing_model_file(nodes, error):
    message = error("vq_model_name", nodes["VQCoreLoadVQModel"].load, "gone.safetensors")
    assert "gone.safetensors" in message and "vq_models" in message
    error("vae_name", nodes["VQCoreLoadAutoencoderKL"].load, "checkpoints:gone.ckpt")
    error("checkpoint", nodes["VQCoreLoadVQDiffusion"].load, "no-such-folder")


def test_model_file_deleted_after_listing(pack, demo_models, tmp_path, error):
    models = tmp_path / "models"
    shutil.copytree(demo_models / "vq_models", models / "vq_models")
    with plain_host(pack, models):
        loader = pack.NODE_CLASS_MAPPINGS["VQCoreLoadVQModel"]()
        path = models / "vq_models" / "demo-vq-f8.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # an interrupted download
        message = error("vq_model_name", loader.load, "demo-vq-f8.safetensors")
        assert "demo-vq-f8.safetensors" in message


def test_wrong_model_kind_in_a_loader(nodes, error):
    assert "AutoencoderKL" in error("vq_model_name", nodes["VQCoreLoadVQModel"].load, "diffusers:demo-sd-vae")
    assert "VQModel" in error("vae_name", nodes["VQCoreLoadAutoencoderKL"].load, "diffusers:demo-ithq-vqvae")
    message = error("vae_name", nodes["VQCoreLoadAutoencoderKL"].load, "demo-flux-ae.safetensors", family="sdxl")
    assert "sdxl" in message


def test_tokens_from_another_codebook(nodes, error):
    (f8,) = nodes["VQCoreLoadVQModel"].load("demo-vq-f8.safetensors")
    (movq,) = nodes["VQCoreLoadVQModel"].load("demo-movq.safetensors")
    tokens = tokens_of(nodes, f8)
    assert "different codebook" in error("tokens", nodes["VQCoreDecode"].decode, movq, tokens=tokens)
    error("tokens", nodes["VQCoreTiledVAEDecode"].decode, movq, 64, tokens=tokens)
    model, clip, _ = nodes["VQCoreLoadVQDiffusion"].load("vq-diffusion-demo")
    (positive,) = nodes["VQCoreCLIPTextEncode"].encode(clip, "x")
    error("tokens", nodes["VQCoreVQDiffusionSampler"].sample, model, positive, 0, 4, 5.0, "fast", 1, 1.0,
          tokens=tokens)


def test_sampler_errors_name_the_node_input_behind_the_sampling_argument(nodes, error):
    """sample() checks the token grid, steps and mode once; the node's error names its own input."""
    model, clip, vq_vae = nodes["VQCoreLoadVQDiffusion"].load("vq-diffusion-demo")
    (positive,) = nodes["VQCoreCLIPTextEncode"].encode(clip, "x")
    sample = nodes["VQCoreVQDiffusionSampler"].sample
    assert "16x16 token grid" in error("tokens", sample, model, positive, 0, 4, 5.0, "fast", 1, 1.0,
                                       tokens=tokens_of(nodes, vq_vae, size=64))
    assert "[1, 100]" in error("steps", sample, model, positive, 0, 101, 5.0, "fast", 1, 1.0)
    assert "mode 'last_steps'" in error("denoise", sample, model, positive, 0, 4, 5.0, "last_steps", 1, 0.5,
                                         tokens=tokens_of(nodes, vq_vae, size=128))


def test_mask_of_the_wrong_size(nodes, error):
    model, clip, vq_vae = nodes["VQCoreLoadVQDiffusion"].load("vq-diffusion-demo")
    (positive,) = nodes["VQCoreCLIPTextEncode"].encode(clip, "x")
    tokens = tokens_of(nodes, vq_vae, size=128)
    sample = nodes["VQCoreVQDiffusionSampler"].sample
    message = error("mask", sample, model, positive, 0, 4, 5.0, "fast", 1, 1.0, tokens=tokens,
                    mask=torch.ones(1, 100, 100))
    assert "100x100" in message and "128x128" in message
    error("mask", sample, model, positive, 0, 4, 5.0, "fast", 1, 1.0, mask=torch.ones(1, 128, 128))


def test_mask_of_an_image_that_vq_encode_cropped(nodes):
    """The image and its mask come from one Load Image; VQ Encode centre-crops 135x130 to 128x128 for factor 8."""
    model, clip, vq_vae = nodes["VQCoreLoadVQDiffusion"].load("vq-diffusion-demo")
    (positive,) = nodes["VQCoreCLIPTextEncode"].encode(clip, "x")
    image = torch.rand(1, 130, 135, 3, generator=torch.Generator().manual_seed(0))
    tokens = nodes["VQCoreEncode"].encode(vq_vae, image)["result"][1]
    mask = torch.zeros(1, 130, 135)
    mask[:, 1 + 8:1 + 16, 3 + 40:3 + 41] = 1  # one pixel column of token row 1, column 5 after the crop
    result = nodes["VQCoreVQDiffusionSampler"].sample(model, positive, 0, 4, 5.0, "fast", 1, 1.0, tokens=tokens,
                                                      mask=mask)["result"][0]["indices"]
    changed = result != tokens["indices"]
    assert changed[0, 1, 5] and changed.sum() == 1


def test_image_too_small_and_other_shapes(nodes, error):
    (f8,) = nodes["VQCoreLoadVQModel"].load("demo-vq-f8.safetensors")
    assert "4x4" in error("image", nodes["VQCoreEncode"].encode, f8, torch.rand(1, 4, 4, 3))
    error("samples", nodes["VQCoreDecode"].decode, f8, samples={"samples": torch.zeros(1, 3, 4, 4)})
    error("tile_size", nodes["VQCoreTiledVAEDecode"].decode, f8, 8, samples={"samples": torch.zeros(1, 4, 4, 4)})
    (vae,) = nodes["VQCoreLoadAutoencoderKL"].load("demo-sd-vae.safetensors")
    error("samples", vae.decode, torch.zeros(1, 16, 4, 4))
    error("vq_vae", nodes["VQCoreEncode"].encode, vae, torch.rand(1, 32, 32, 3))


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_nan_weight_is_an_error_not_a_black_image(pack, nodes, dtype, caplog):
    """fp16 NaN/inf is computed again in fp32 (the fp16 overflow fallback); NaN/inf in fp32 is an error naming the
    weight, for tokens, latents and the tiled decode alike."""
    (vq_vae,) = nodes["VQCoreLoadVQModel"].load("demo-vq-f8.safetensors", dtype=dtype)
    tokens = tokens_of(nodes, vq_vae)
    with torch.no_grad():
        vq_vae.model.decoder.conv_out.weight.view(-1)[0] = float("nan")
    calls = [lambda: nodes["VQCoreDecode"].decode(vq_vae, tokens=tokens),
             lambda: nodes["VQCoreDecode"].decode(vq_vae, samples={"samples": torch.randn(1, 4, 4, 4)}),
             lambda: nodes["VQCoreTiledVAEDecode"].decode(vq_vae, 64, tokens=tokens)]
    for call in calls:
        with caplog.at_level(logging.WARNING, logger="vqcore"), \
                pytest.raises(pack.vqcore.errors.VQCoreError, match=r"decoder\.conv_out\.weight contains NaN"):
            call()
    assert ("computing again in float32" in caplog.text) == (dtype == "fp16")
    assert vq_vae.dtype == torch.float32


def test_float32_result_with_nan_from_the_vae_stand_in_is_an_error(pack, nodes):
    (vae,) = nodes["VQCoreLoadAutoencoderKL"].load("demo-sd-vae.safetensors", dtype="fp32")
    latents = torch.randn(1, 4, 4, 4)
    assert torch.isfinite(vae.decode(latents)).all()
    with torch.no_grad():
        pack.nodes.vae_adapter.kl_handle(vae, "vae").model.decoder.conv_in.weight.view(-1)[0] = float("inf")
    with pytest.raises(pack.vqcore.errors.VQCoreError, match=r"decoder\.conv_in\.weight contains NaN/inf"):
        vae.decode(latents)
