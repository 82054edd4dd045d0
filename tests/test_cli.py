"""`python -m vqcore demo-models DIR` then `python -m vqcore roundtrip` on its files: PNGs written, right sizes."""


import numpy as np
import pytest
from PIL import Image

from vqcore.__main__ import main
from vqcore.loading import load_autoencoder

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
