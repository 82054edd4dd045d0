"""Seamless tiling through ComfyUI's own nodes, on the real host: core's VAE Decode (Tiled) and core's retry after a
full decode ran out of memory, on our loader's VAE and on a VAE from core's Load VAE passed through Seamless VAE.

One SD-shaped VAE file (random weights; core's loader only detects the SD layout) is read by both loaders, so every
decode works on the same weights and the same latents, and all are measured in one prompt. ComfyUI 0.33 routes
tiled decodes to a VAE that declares handles_tiling; 0.3.64 ignores the declaration, so there core's node keeps
blending its tiles and only our own tiled node is seamless.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from workflows import build_node

from vqcore.autoencoder_kl import AutoencoderKL
from vqcore.vae_layouts import KL_FAMILIES, to_ldm_names

VAE_FILE = "integration-sd-shaped-vae.safetensors"
IMAGE_FILE = "integration-smooth-noise.png"
IMAGE_SIZE = 96  # pixels; 12x12 latent cells
CORE_TILE, CORE_OVERLAP = 64, 16  # VAE Decode (Tiled) widgets, in pixels: 8-cell tiles, two per side
SEAMLESS_TOLERANCE = 2e-3  # 0..1 scale: the seamless tiler equals the full decode up to float rounding
SEAM_THRESHOLD = 0.05  # core's blended tiles differ from the full decode by more than this on these latents
PROMPT_TIMEOUT = 900


@pytest.fixture(scope="module")
def object_info(comfy):
    return comfy.get("/object_info")


def host_version(comfy):
    version = comfy.get("/system_stats")["system"]["comfyui_version"]
    return tuple(int(part) for part in version.split(".")[:3])


def write_test_files(comfy):
    """The SD-shaped VAE (ch 128, [1, 2, 4, 4], two resnets per level, as core's loader assumes) in LDM names, and a
    smooth random picture to encode."""
    config = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
              "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
              **KL_FAMILIES["sd1"]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = AutoencoderKL(**config).state_dict()
        noise = torch.rand(1, 3, 8, 8)
    vae_dir = comfy.base_dir / "models" / "vae"
    vae_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in to_ldm_names(state).items()}, str(vae_dir / VAE_FILE))
    picture = torch.nn.functional.interpolate(noise, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic").clamp(0, 1)
    (comfy.base_dir / "input").mkdir(exist_ok=True)
    Image.fromarray((picture[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
        comfy.base_dir / "input" / IMAGE_FILE)


@pytest.fixture(scope="module")
def decodes(comfy, object_info):
    """{name: IMAGE tensor} for every decode in the prompt below, plus what the OOM probes reported."""
    write_test_files(comfy)
    tiled = {"tile_size": CORE_TILE, "overlap": CORE_OVERLAP, "temporal_size": 64, "temporal_overlap": 8}
    prompt = {
        "image": {"class_type": "LoadImage", "inputs": {"image": IMAGE_FILE}},
        "core_vae": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_FILE}},
        "our_vae": build_node(object_info, "VQCoreLoadAutoencoderKL", {}, {"vae_name": VAE_FILE}),
        "seamless_vae": {"class_type": "VQCoreSeamlessVAE", "inputs": {"vae": ["core_vae", 0]}},
        "latent": {"class_type": "VAEEncode", "inputs": {"pixels": ["image", 0], "vae": ["core_vae", 0]}},
        "full": {"class_type": "VAEDecode", "inputs": {"samples": ["latent", 0], "vae": ["core_vae", 0]}},
        "core_tiled": {"class_type": "VAEDecodeTiled",
                       "inputs": {"samples": ["latent", 0], "vae": ["core_vae", 0], **tiled}},
        "our_vae_core_tiled": {"class_type": "VAEDecodeTiled",
                               "inputs": {"samples": ["latent", 0], "vae": ["our_vae", 0], **tiled}},
        "seamless_vae_core_tiled": {"class_type": "VAEDecodeTiled",
                                    "inputs": {"samples": ["latent", 0], "vae": ["seamless_vae", 0], **tiled}},
        "seamless_vae_our_tiled": build_node(object_info, "VQCoreTiledVAEDecode", {"VAE,VQ_VAE": ["seamless_vae", 0]},
                                             {"samples": ["latent", 0], "tile_size": CORE_TILE}),
        "our_vae_oom": {"class_type": "TestProbeDecodeOutOfMemory",
                        "inputs": {"vae": ["our_vae", 0], "samples": ["latent", 0], "name": "our_vae_oom"}},
        "seamless_vae_oom": {"class_type": "TestProbeDecodeOutOfMemory",
                             "inputs": {"vae": ["seamless_vae", 0], "samples": ["latent", 0],
                                        "name": "seamless_vae_oom"}},
    }
    decoded = [name for name, node in prompt.items() if node["class_type"] not in ("LoadImage", "VAELoader",
               "VQCoreLoadAutoencoderKL", "VQCoreSeamlessVAE", "VAEEncode")]
    for name in decoded:
        prompt[f"save_{name}"] = {"class_type": "TestProbeSaveTensor", "inputs": {"images": [name, 0], "name": name}}
    entry = comfy.run_prompt(prompt, PROMPT_TIMEOUT)
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    images = {name: load_file(str(comfy.base_dir / "output" / "probes" / f"{name}.safetensors"))["images"]
              for name in decoded}
    decode_calls = {name: entry["outputs"][name]["probe_decode_calls_after_oom"][0]
                    for name in ("our_vae_oom", "seamless_vae_oom")}
    return images, decode_calls


def max_difference(images, name):
    return float((images[name] - images["full"]).abs().max())


def test_core_tiling_shows_seams_on_these_latents(decodes):
    images, _ = decodes
    assert images["full"].shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and images["full"].std() > 0.05
    assert max_difference(images, "core_tiled") > SEAM_THRESHOLD


def test_our_tiled_node_is_seamless_on_a_core_vae_through_seamless_vae(decodes):
    images, _ = decodes
    assert max_difference(images, "seamless_vae_our_tiled") <= SEAMLESS_TOLERANCE


def test_core_tiled_decode_is_seamless_on_our_vaes_where_the_host_has_the_hook(comfy, decodes):
    images, _ = decodes
    differences = {name: max_difference(images, name) for name in ("our_vae_core_tiled", "seamless_vae_core_tiled")}
    if host_version(comfy) >= (0, 33, 0):
        assert max(differences.values()) <= SEAMLESS_TOLERANCE, differences
        assert max_difference(images, "core_tiled") > SEAM_THRESHOLD  # measured on the same latents
    else:  # the declaration is ignored: core blends its tiles as it does for its own VAE
        for name in differences:
            assert float((images[name] - images["core_tiled"]).abs().max()) <= SEAMLESS_TOLERANCE, differences


def test_out_of_memory_in_core_vae_decode_continues_with_the_seamless_tiler(comfy, decodes):
    images, decode_calls = decodes
    for name in ("our_vae_oom", "seamless_vae_oom"):
        assert max_difference(images, name) <= SEAMLESS_TOLERANCE, name
    if host_version(comfy) >= (0, 33, 0):
        # after the failed full decode, ComfyUI's own decode never ran again: the retry was ours
        assert decode_calls == {"our_vae_oom": 0, "seamless_vae_oom": 0}
        assert "retrying with tiled VAE decoding" in comfy.log()
    else:  # 0.3.64 retries with its own tiles, through the VAE's decode (one tile: the latent is small)
        assert min(decode_calls.values()) > 0
