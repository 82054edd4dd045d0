"""The demo checkpoint, loading, the generate command, and one clear error per kind of bad input."""

import json
import logging
import shutil

import pytest
import torch

from vqcore.errors import CheckpointError, VQCoreError
from vqcore.demo import demo_vocabulary
from vqcore.vq_diffusion import load_vq_diffusion


@pytest.fixture(scope="module")
def demo_folder(demo_models):
    return demo_models / "diffusers" / "vq-diffusion-demo"  # tests that change it work on a copy


@pytest.fixture(scope="module")
def demo(demo_folder):
    return load_vq_diffusion(demo_folder, device="cpu")


def test_demo_model_loads_and_generates(demo):
    assert demo.null_embeddings.shape == (77, 32)
    vocab = demo_vocabulary()
    assert demo.text_encoder.tokenizer("ab").input_ids == [vocab["<|startoftext|>"], vocab["a"], vocab["b</w>"], vocab["<|endoftext|>"]]
    tokens = demo.generate(["a red cube"], num_images_per_prompt=2, steps=4, mode="fast", seed=1)
    assert tokens.shape == (2, 16, 16) and tokens.dtype == torch.long
    again = demo.generate(["a red cube"], num_images_per_prompt=2, steps=4, mode="fast", seed=1)
    assert torch.equal(tokens, again)
    images = demo.decode(tokens)
    assert images.shape == (2, 3, 128, 128) and torch.isfinite(images).all()


def test_generate_command_writes_png(demo_folder, tmp_path, capsys):
    from PIL import Image

    from vqcore.__main__ import main

    out = tmp_path / "out.png"
    assert main(["generate", "a red cube", str(out), "--checkpoint", str(demo_folder), "--steps", "3", "--mode", "fast"]) == 0
    assert "step 3/3" in capsys.readouterr().out
    assert Image.open(out).size == (128, 128)


def test_long_prompt_warns_with_the_cut_text(demo, caplog):
    with caplog.at_level(logging.WARNING):
        demo.text_encoder.encode([" ".join(["cat"] * 30) + " zebra"])
    assert "zebra" in caplog.text


def test_token_ids_out_of_range(demo):
    bad = torch.full((1, 256), 65)
    with pytest.raises(VQCoreError, match=r"\[0, 64\]"):
        demo.transformer(bad, torch.zeros(1, 77, 32), 5)


def test_token_grid_not_matching_the_checkpoint(demo):
    with pytest.raises(VQCoreError, match="16x16"):
        demo.generate(["x"], steps=2, mode="fast", init_tokens=torch.zeros(1, 8, 8, dtype=torch.long))


@pytest.mark.parametrize("steps", [0, 101])
def test_steps_outside_the_schedule(demo, steps):
    with pytest.raises(VQCoreError, match="steps must be an integer in"):
        demo.generate(["x"], steps=steps, mode="fast")


@pytest.mark.parametrize("rate", [0.0, 1.5, -0.2])
def test_truncation_outside_zero_one(demo, rate):
    with pytest.raises(VQCoreError, match="truncation rate"):
        demo.generate(["x"], steps=2, mode="fast", truncation_rate=rate)


def test_missing_tokenizer_files(demo_folder, tmp_path):
    broken = shutil.copytree(demo_folder, tmp_path / "broken")
    (broken / "tokenizer" / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_vq_diffusion(broken, device="cpu")


def test_folder_that_is_not_vq_diffusion(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(CheckpointError, match="not a VQ-Diffusion checkpoint"):
        load_vq_diffusion(tmp_path, device="cpu")


@pytest.mark.parametrize("config_file, drop", [("scheduler/scheduler_config.json", "num_vec_classes"),
                                               ("transformer/config.json", "sample_size")])
def test_config_missing_a_required_field_names_the_file(demo_folder, tmp_path, config_file, drop):
    broken = shutil.copytree(demo_folder, tmp_path / "broken")
    config = json.loads((broken / config_file).read_text())
    del config[drop]
    (broken / config_file).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"{config_file}: .*{drop}"):
        load_vq_diffusion(broken, device="cpu")


def test_variant_present_for_some_components_only(demo_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    mixed = shutil.copytree(demo_folder, tmp_path / "mixed")
    weights = mixed / "vqvae" / "diffusion_pytorch_model.safetensors"
    fp16 = {k: (v + 1).half() for k, v in load_file(weights).items()}  # shifted, to see which file was read
    save_file(fp16, weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
    model = load_vq_diffusion(mixed, device="cpu", variant="fp16")  # the other components have no fp16 files
    assert torch.equal(model.vqvae.decoder.conv_out.weight, fp16["decoder.conv_out.weight"].float())
