"""`python -m vqcore demo-models DIR` then `python -m vqcore roundtrip` on its files: PNGs written, right sizes."""


from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vqcore.__main__ import main
from vqcore.loading import load_autoencoder
from unsafe_pickle import CreatesMarkerFile

# Every single file demo-models must write, with the model kind and latent scaling its loader should find.
EXPECTED_FILES = {
    "vae/demo-sd-vae.safetensors": ("AutoencoderKL", 0.18215),
    "vae/demo-sdxl-vae.safetensors": ("AutoencoderKL", 0.13025),
    "vae/demo-flux-ae.safetensors": ("AutoencoderKL", 0.3611),
    "vae/demo-sd-vae-diffusers-keys.safetensors": ("AutoencoderKL", 0.18215),
    "checkpoints/demo-sd15-checkpoint.ckpt": ("AutoencoderKL", 0.18215),
    "checkpoints/demo-sd3-checkpoint.safetensors": ("AutoencoderKL", 1.5305),
    "vq_models/demo-vq-f4.ckpt": ("VQModel", None),
    "vq_models/demo-vq-f8.safetensors": ("VQModel", None),
    "vq_models/demo-vq-f16.safetensors": ("VQModel", None),
    "vq_models/demo-movq.safetensors": ("VQModel", None),
    "vq_models/demo-movq-diffusers-keys.safetensors": ("VQModel", None),
    "vq_models/demo-ithq-vqvae.pth": ("VQModel", None),
    "diffusers/demo-sd-vae": ("AutoencoderKL", 0.18215),
    "diffusers/demo-ithq-vqvae": ("VQModel", None),
}


@pytest.mark.parametrize("name", EXPECTED_FILES)
def test_demo_file_loads_as_expected(demo_models, name):
    kind, scaling = EXPECTED_FILES[name]
    model = load_autoencoder(demo_models / name, device="cpu")
    assert type(model).__name__ == kind
    if scaling is not None:
        assert model.config["scaling_factor"] == scaling


def test_demo_models_are_seeded(demo_models, tmp_path):
    main(["demo-models", str(tmp_path)])
    for name in ("vae/demo-flux-ae.safetensors", "vq_models/demo-ithq-vqvae.pth"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "vae/demo-flux-ae.safetensors").read_bytes() == (demo_models / "vae/demo-flux-ae.safetensors").read_bytes()


def test_roundtrip_with_generated_test_pattern(demo_models, tmp_path, capsys):
    out = tmp_path / "movq.png"
    assert main(["roundtrip", str(demo_models / "vq_models/demo-movq.safetensors"), str(out), "--size", "64", "--device", "cpu"]) == 0
    assert "VQ" in capsys.readouterr().out
    with Image.open(out) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 64))
        assert np.asarray(im).std() > 0


@pytest.mark.parametrize("name, factor", [
    ("vae/demo-flux-ae.safetensors", 2),
    ("checkpoints/demo-sd15-checkpoint.ckpt", 2),
    ("vq_models/demo-vq-f16.safetensors", 16),
    ("vq_models/demo-ithq-vqvae.pth", 8),
    ("diffusers/demo-ithq-vqvae", 8),
])
def test_roundtrip_crops_input_image_to_downscale_multiple(demo_models, tmp_path, name, factor, capsys):
    source, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8)).save(source)
    assert main(["roundtrip", str(demo_models / name), str(source), str(out), "--device", "cpu"]) == 0
    with Image.open(out) as im:
        assert im.size == (50 // factor * factor, 37 // factor * factor)
    assert "cropping" in capsys.readouterr().err  # 37 is a multiple of no factor


def test_roundtrip_family_option_and_errors(demo_models, tmp_path, capsys):
    flux = str(demo_models / "vae/demo-flux-ae.safetensors")
    assert main(["roundtrip", flux, str(tmp_path / "sd3.png"), "--family", "sd3", "--size", "16", "--device", "cpu"]) == 0
    assert "scaling_factor 1.5305" in capsys.readouterr().out
    assert main(["roundtrip", flux, str(tmp_path / "x.png"), "--family", "sdxl", "--device", "cpu"]) == 1
    assert "demo-flux-ae.safetensors: family 'sdxl'" in capsys.readouterr().err
    assert main(["roundtrip", flux, str(tmp_path / "missing.png"), str(tmp_path / "y.png"), "--device", "cpu"]) == 1
    assert "missing.png" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


@pytest.mark.parametrize("arguments, message", [
    (["{out_dir}/missing-folder/out.png"], "missing-folder does not exist"),
    (["{out_dir}/out.png", "--size", "-5"], "--size must be a positive integer; got -5"),
    (["{out_dir}/out.jpg"], "out.jpg: the output must be a .png file"),
    (["{out_dir}"], "is a folder"),
], ids=["missing folder", "negative size", "not a png", "folder as output"])
def test_roundtrip_checks_its_arguments_before_loading(demo_models, tmp_path, capsys, monkeypatch, arguments, message):
    import vqcore.loading

    monkeypatch.setattr(vqcore.loading, "load_autoencoder", lambda *a, **kw: pytest.fail("loaded before checking"))
    args = [a.format(out_dir=tmp_path) for a in arguments]
    assert main(["roundtrip", str(demo_models / "vq_models/demo-movq.safetensors"), *args, "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1  # one line, no traceback
    assert not list(tmp_path.rglob("*.png"))


def test_generate_checks_its_output_before_loading(tmp_path, capsys):
    assert main(["generate", "a cube", str(tmp_path / "no-such-dir" / "x.png"), "--checkpoint", str(tmp_path)]) == 1
    assert "no-such-dir does not exist" in capsys.readouterr().err


def test_generate_config_option_reaches_the_vqvae(demo_models, tmp_path, capsys):
    config = tmp_path / "vqvae.json"
    config.write_text('{"latent_channels": 7}')
    out = tmp_path / "x.png"
    folder = demo_models / "diffusers" / "vq-diffusion-demo"
    assert main(["generate", "a cube", str(out), "--checkpoint", str(folder), "--config", str(config)]) == 1
    assert "vqvae.json: latent_channels gives latent_channels = 7, but the weights of" in capsys.readouterr().err
    assert not out.exists()


def nan_at(key, count):
    def change(state):
        state[key] = state[key].clone()
        state[key].view(-1)[:count] = float("nan")
        return state
    return change


def without(key):
    return lambda state: {k: v for k, v in state.items() if k != key}


def transposed(key):
    return lambda state: {**state, key: state[key].transpose(0, 1).contiguous()}


def kl_and_vq(state):
    from vqcore.autoencoder_kl import AutoencoderKL
    from vqcore.vae_layouts import to_ldm_names

    kl = AutoencoderKL(block_out_channels=[32], down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"])
    return {**{f"vae.{k}": v.contiguous() for k, v in to_ldm_names(kl.state_dict()).items()},
            **{f"vqvae.{k}": v for k, v in state.items()}}


def write_bad_file(source, folder, case):
    """The demo VQ file damaged as `case` says: (file name, how it is written, words the error must contain)."""
    name, how, _ = BAD_FILES[case]
    path = folder / name
    state = load_file(source)
    if how == "truncated":
        path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    elif how == "pickled":
        torch.save(state, path)
    elif how == "runs code":
        torch.save({"state_dict": state, "payload": CreatesMarkerFile(folder / "code-ran")}, path)
    elif how == "text":
        path.write_text("not a checkpoint")
    else:
        save_file(how(state), path)
    return path


# The bad-input corpus as the command line meets it: each file is refused with one line naming the file and the
# culprit, exit status 1, and no PNG.
BAD_FILES = {
    "NaN weight": ("nan.safetensors", nan_at("decoder.conv_out.bias", 3), "weight decoder.conv_out.bias holds 3 NaN"),
    "NaN codebook entry": ("nan-codebook.safetensors", nan_at("quantize.embedding.weight", 1),
                           "weight quantize.embedding.weight holds 1 NaN"),
    "missing tensor": ("missing.safetensors", without("decoder.conv_out.bias"), "missing keys (1): decoder.conv_out.bias"),
    "transposed decoder.conv_in": ("transposed.safetensors", transposed("decoder.conv_in.weight"),
                                   "shape mismatches (1): decoder.conv_in.weight"),
    "KL and VQ in one file": ("both.safetensors", kl_and_vq, "holds two autoencoders"),
    "truncated": ("truncated.safetensors", "truncated", "not a readable safetensors file"),
    "pickle under a safetensors name": ("pickled.safetensors", "pickled", "this is a pickle file"),
    "code-running pickle": ("evil.ckpt", "runs code", "refused to load: the file may run code"),
    "not a weight file": ("notes.ckpt", "text", "not a readable checkpoint"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_roundtrip_of_a_bad_file_exits_non_zero_without_png(demo_models, tmp_path, capsys, case):
    model = write_bad_file(demo_models / "vq_models/demo-vq-f8.safetensors", tmp_path, case)
    assert main(["roundtrip", str(model), str(tmp_path / "out.png"), "--size", "32", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {model}") and BAD_FILES[case][2] in err and err.count("\n") == 1, err
    assert not list(tmp_path.rglob("*.png"))
    assert not (tmp_path / "code-ran").exists()


def test_nan_output_is_an_error_not_a_black_png(tmp_path):
    from vqcore.__main__ import save_png
    from vqcore.errors import VQCoreError

    images = torch.zeros(1, 3, 8, 8)
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(VQCoreError, match=r"out\.png: not written: the model produced NaN"):
        save_png(images, tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()


def test_roundtrip_config_option(demo_models, tmp_path, capsys):
    import yaml

    config = tmp_path / "vae.yaml"
    config.write_text(yaml.safe_dump({"model": {"params": {"scale_factor": 0.5, "embed_dim": 4,
                                                           "ddconfig": {"double_z": True, "z_channels": 4}}}}))
    sd_vae = str(demo_models / "vae/demo-sd-vae.safetensors")
    assert main(["roundtrip", sd_vae, str(tmp_path / "a.png"), "--config", str(config), "--size", "16", "--device", "cpu"]) == 0
    assert "scaling_factor 0.5" in capsys.readouterr().out
    config.write_text(yaml.safe_dump({"model": {"params": {"ddconfig": {"double_z": False}}}}))
    assert main(["roundtrip", sd_vae, str(tmp_path / "b.png"), "--config", str(config), "--device", "cpu"]) == 1
    assert "vae.yaml: ddconfig double_z: False describes a VQ autoencoder" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()
