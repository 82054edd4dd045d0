"""The nodes' use of the host, proven against a recording stand-in for ComfyUI's modules: memory manager before
compute, batch slices sized by free memory, progress to the total, interrupt, OOM → tiled, fp16 overflow → fp32,
model-folder registration."""

import logging
import os
import shutil
import types
from pathlib import Path

import pytest
import torch
from nodes_fakes import FakeHost, InterruptProcessingException
from nodes_support import bound_host, host_module

VQ_FILE = "demo-vq-f8.safetensors"


@pytest.fixture
def fake(pack, demo_models):
    fake = FakeHost(demo_models, host_module(pack).PlainFolders)
    with bound_host(pack, **fake.modules()):
        yield fake


def node(pack, node_id):
    return pack.NODE_CLASS_MAPPINGS[node_id]()


def encode_tokens(pack, vq_vae, batch=1, size=32):
    image = torch.rand(batch, size, size, 3, generator=torch.Generator().manual_seed(0))
    return node(pack, "VQCoreEncode").encode(vq_vae, image)["result"][1]


def test_model_is_loaded_by_the_memory_manager_before_compute(pack, fake):
    (vq_vae,) = node(pack, "VQCoreLoadVQModel").load(VQ_FILE)
    assert ("wrap", vq_vae.patcher) in fake.events, "the model was not wrapped in a ModelPatcher"
    tokens = encode_tokens(pack, vq_vae)
    fake.events.clear()
    fake.record_compute(vq_vae.model.decoder)
    node(pack, "VQCoreDecode").decode(vq_vae, tokens=tokens)
    load = fake.events[fake.index("load")]
    assert fake.index("load") < fake.index("compute")
    assert load[1] == [vq_vae.patcher] and load[3] is True, "full load of our patcher expected"
    assert load[2] > 0, "a memory estimate must be passed to load_models_gpu"


def test_nodes_decode_on_the_fast_path_within_float_rounding_of_the_exact_one(pack, fake):
    """Node users get vqcore's fast path (channels-last maps, transposed-convolution upsampling); it stays within
    float32 rounding of the exact (diffusers-identical) path."""
    (vq_vae,) = node(pack, "VQCoreLoadVQModel").load(VQ_FILE)
    model = vq_vae.model
    upsamplers = [m for m in model.decoder.modules() if type(m).__name__ == "Upsample"]
    assert model.decoder.fast and upsamplers and all(up.fast for up in upsamplers)
    tokens = encode_tokens(pack, vq_vae)
    (fast,) = node(pack, "VQCoreDecode").decode(vq_vae, tokens=tokens)
    pack.vqcore.use_fast_path(model, False)
    (exact,) = node(pack, "VQCoreDecode").decode(vq_vae, tokens=tokens)
    assert 0 < (fast - exact).abs().max() <= 1e-5


def test_batch_is_decoded_in_slices_sized_by_free_memory_and_progress_reaches_total(pack, fake):
    (vq_vae,) = node(pack, "VQCoreLoadVQModel").load(VQ_FILE)
    tokens = encode_tokens(pack, vq_vae, batch=3)
    fake.events.clear()
    fake.record_compute(vq_vae.model.decoder)
    fake.free_memory = 1  # room for less than one image: one image per slice
    (image,) = node(pack, "VQCoreDecode").decode(vq_vae, tokens=tokens, unique_id="7")
    assert image.shape == (3, 32, 32, 3)
    assert sum(e[0] == "compute" for e in fake.events) == 3
    bar = fake.progress_bars[-1]
    assert (bar.current, bar.total, bar.node_id) == (3, 3, "7")

    fake.events.clear()
    fake.free_memory = 1 << 40  # everything fits: one slice
    (again,) = node(pack, "VQCoreDecode").decode(vq_vae, tokens=tokens)
    assert sum(e[0] == "compute" for e in fake.events) == 1
    assert torch.allclose(image, again, atol=1e-5)


def test_interrupt_stops_a_decode_without_output(pack, fake):
    (vq_vae,) = node(pack, "VQCoreLoadVQModel").load(VQ_FILE)
    tokens = encode_tokens(pack, vq_vae, batch=3)
    fake.free_memory = 1
    fake.interrupt_checks, fake.interrupt_after_checks = 0, 2
    fake.events.clear()
    fake.record_compute(vq_vae.model.decoder)
    with pytest.raises(InterruptProcessingException):
        node(pack, "VQCoreDecode").decode(vq_vae, tokens=tokens)
    assert sum(e[0] == "compute" for e in fake.events) == 1, "decoding went on after the interrupt"


def test_tiled_decode_reports_progress_per_tile_and_stops_on_interrupt(pack, fake):
    (vq_vae,) = node(pack, "VQCoreLoadVQModel").load(VQ_FILE)
    tokens = encode_tokens(pack, vq_vae, size=64)
    tiled = node(pack, "VQCoreTiledVAEDecode")
    out = tiled.decode(vq_vae, 32, tokens=tokens, unique_id="5")
    bar = fake.progress_bars[-1]
    assert bar.node_id == "5" and bar.current == bar.total > 1
    assert out["ui"]["vqcore_tiles"][0]["grid"] == [2, 2]
    fake.interrupt_checks, fake.interrupt_after_checks = 0, 3
    fake.events.clear()
    with pytest.raises(InterruptProcessingException):
        tiled.decode(vq_vae, 32, tokens=tokens)
    assert [e[0] for e in fake.events].count("progress") == 2, "tiles ran after the interrupt"


def test_out_of_memory_in_full_decode_falls_back_to_tiled_decode(pack, fake, caplog):
    (vq_vae,) = node(pack, "VQCoreLoadVQModel").load(VQ_FILE)
    tokens = encode_tokens(pack, vq_vae, size=64)
    (reference,) = node(pack, "VQCoreDecode").decode(vq_vae, tokens=tokens)
    full_decode = vq_vae.model.decode_embeddings

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    vq_vae.model.decode_embeddings = out_of_memory
    try:
        with caplog.at_level(logging.WARNING, logger="vqcore"):
            (image,) = node(pack, "VQCoreDecode").decode(vq_vae, tokens=tokens)
    finally:
        vq_vae.model.decode_embeddings = full_decode
    assert "tiled" in caplog.text
    assert image.shape == reference.shape
    assert (image - reference).abs().max() <= 2e-3, "the tiled fallback must equal the full decode"


class AcceleratorError(RuntimeError):
    """How ComfyUI 0.33 sees some device out-of-memory errors (torch.AcceleratorError), told apart by is_oom."""


def test_out_of_memory_is_what_the_host_says_it_is(pack, fake, caplog):
    """Where the host has is_oom (ComfyUI 0.33+), it decides; other errors still surface as themselves."""
    (vq_vae,) = node(pack, "VQCoreLoadVQModel").load(VQ_FILE)
    tokens = encode_tokens(pack, vq_vae, size=64)
    (reference,) = node(pack, "VQCoreDecode").decode(vq_vae, tokens=tokens)
    fake.mm.is_oom = lambda e: isinstance(e, AcceleratorError) and "out of memory" in str(e)
    full_decode = vq_vae.model.decode_embeddings
    for error, falls_back in ((AcceleratorError("CUDA error: out of memory"), True),
                              (AcceleratorError("CUDA error: illegal memory access"), False)):
        def failing(*args, **kwargs):
            raise error

        vq_vae.model.decode_embeddings = failing
        try:
            if falls_back:
                (image,) = node(pack, "VQCoreDecode").decode(vq_vae, tokens=tokens)
                assert (image - reference).abs().max() <= 2e-3
            else:
                with pytest.raises(AcceleratorError, match="illegal memory access"):
                    node(pack, "VQCoreDecode").decode(vq_vae, tokens=tokens)
        finally:
            vq_vae.model.decode_embeddings = full_decode


def test_out_of_memory_in_full_encode_falls_back_to_tiled_encode(pack, fake, caplog):
    (vae,) = node(pack, "VQCoreLoadAutoencoderKL").load("demo-sd-vae.safetensors")
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    reference = vae.encode(image)
    model = vae.first_stage_model

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    model.encode = out_of_memory
    try:
        with caplog.at_level(logging.WARNING, logger="vqcore"):
            latents = vae.encode(image)
    finally:
        del model.encode
    assert "tiled encode" in caplog.text
    assert latents.shape == reference.shape and (latents - reference).abs().max() <= 1e-3


def test_half_precision_overflow_is_recomputed_in_fp32(pack, fake, caplog):
    (vq_vae,) = node(pack, "VQCoreLoadVQModel").load(VQ_FILE, dtype="fp16")
    assert vq_vae.dtype == torch.float16
    tokens = encode_tokens(pack, vq_vae)
    with torch.no_grad():  # activations beyond fp16's 65504 before the first norm, harmless in fp32
        vq_vae.model.quantize.embedding.weight.mul_(1e4)
        vq_vae.model.decoder.conv_in.weight.mul_(1e3)
    with caplog.at_level(logging.WARNING, logger="vqcore"):
        (image,) = node(pack, "VQCoreDecode").decode(vq_vae, tokens=tokens)
    assert torch.isfinite(image).all() and image.std() > 0, "a black or NaN image came out"
    assert "float32" in caplog.text and vq_vae.dtype == torch.float32


def test_out_of_memory_in_vq_encode_falls_back_to_tiled_encode(pack, fake, caplog):
    (vq_vae,) = node(pack, "VQCoreLoadVQModel").load(VQ_FILE)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    reference = node(pack, "VQCoreEncode").encode(vq_vae, image)["result"]

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    vq_vae.model.encode = out_of_memory
    try:
        with caplog.at_level(logging.WARNING, logger="vqcore"):
            latent, tokens = node(pack, "VQCoreEncode").encode(vq_vae, image)["result"]
    finally:
        del vq_vae.model.encode
    assert "tiled encode" in caplog.text
    assert (latent["samples"] - reference[0]["samples"]).abs().max() <= 1e-3
    assert torch.equal(tokens["indices"], reference[1]["indices"])


def test_half_precision_overflow_in_vq_encode_is_recomputed_in_fp32(pack, fake, caplog):
    (vq_vae,) = node(pack, "VQCoreLoadVQModel").load(VQ_FILE, dtype="fp16")
    with torch.no_grad():  # activations beyond fp16's 65504 before the first norm, harmless in fp32
        vq_vae.model.encoder.conv_in.weight.mul_(5e4)  # largest weight about 1e4
    image = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(4))
    with caplog.at_level(logging.WARNING, logger="vqcore"):
        latent, tokens = node(pack, "VQCoreEncode").encode(vq_vae, image)["result"]
    assert "computing again in float32" in caplog.text and vq_vae.dtype == torch.float32
    assert torch.isfinite(latent["samples"]).all()
    again_latent, again = node(pack, "VQCoreEncode").encode(vq_vae, image)["result"]  # now float32 throughout
    assert torch.equal(tokens["indices"], again["indices"]) and torch.equal(latent["samples"], again_latent["samples"])


def test_model_folders_merge_with_user_configured_paths(pack, demo_models, tmp_path):
    host = host_module(pack)
    fake = FakeHost(demo_models, host.PlainFolders)
    extra = tmp_path / "my_vq_models"
    extra.mkdir()
    (extra / "mine.safetensors").write_bytes((demo_models / "vq_models" / VQ_FILE).read_bytes())
    fake.folders.folder_names_and_paths["vq_models"] = ([str(extra)], set())  # as extra_model_paths.yaml leaves it
    with bound_host(pack, **fake.modules()):
        dirs, extensions = fake.folders.folder_names_and_paths["vq_models"]
        assert dirs == [str(extra), str(demo_models / "vq_models")]
        assert ".safetensors" in extensions and ".ckpt" in extensions
        choices = pack.NODE_CLASS_MAPPINGS["VQCoreLoadVQModel"].INPUT_TYPES()["required"]["vq_model_name"][0]
        assert "mine.safetensors" in choices and VQ_FILE in choices
        for folder in ("vae", "checkpoints", "diffusers"):
            assert fake.folders.folder_names_and_paths[folder][0] == [str(demo_models / folder)]


def test_diffusers_folders_are_walked_again_only_when_a_folder_changed(pack, tmp_path, monkeypatch):
    host = host_module(pack)
    demo = Path(pack.__file__).parent / "vqcore" / "demo_weights" / "models" / "diffusers" / "vqcore-photo-vq-f4"
    shutil.copytree(demo, tmp_path / "diffusers" / "org" / "photo")
    walks = []
    real_walk = os.walk
    monkeypatch.setattr(host.os, "walk", lambda *a, **k: walks.append(a[0]) or real_walk(*a, **k))
    loader = pack.NODE_CLASS_MAPPINGS["VQCoreLoadVQModel"]
    with bound_host(pack, folder_paths=host.PlainFolders(tmp_path)):
        assert "diffusers:org/photo" in loader.INPUT_TYPES()["required"]["vq_model_name"][0]
        loader.INPUT_TYPES()
        assert len(walks) == 1, "nothing changed: the folders were walked again"
        shutil.copytree(tmp_path / "diffusers" / "org" / "photo", tmp_path / "diffusers" / "org" / "copy")
        os.utime(tmp_path / "diffusers" / "org", ns=(0, 0))  # the new entry's mtime, also on coarse-clock filesystems
        assert "diffusers:org/copy" in loader.INPUT_TYPES()["required"]["vq_model_name"][0]
        assert len(walks) == 2


@pytest.fixture
def vq_diffusion(pack, fake):
    model, clip, vq_vae = node(pack, "VQCoreLoadVQDiffusion").load("vq-diffusion-demo")
    (positive,) = node(pack, "VQCoreCLIPTextEncode").encode(clip, "a red cube")
    return model, positive, vq_vae


def run_sampler(pack, model, positive, steps=8, **options):
    return node(pack, "VQCoreVQDiffusionSampler").sample(model, positive, seed=3, steps=steps, guidance=5.0,
                                                        sampling_mode="fast", batch_size=1, unique_id="9", **options)


def test_sampler_loads_models_first_reports_progress_to_total_and_sends_previews(pack, fake, vq_diffusion):
    model, positive, vq_vae = vq_diffusion
    fake.events.clear()
    fake.record_compute(model.transformer)
    out = run_sampler(pack, model, positive)
    load = fake.events[fake.index("load")]
    assert fake.index("load") < fake.index("compute")
    assert model.patcher in load[1] and vq_vae.patcher in load[1] and load[2] > 0 and load[3] is True
    bar = fake.progress_bars[-1]
    assert (bar.current, bar.total, bar.node_id) == (8, 8, "9")
    assert bar.previews, "no preview was sent"
    kind, image, max_size = bar.previews[-1]
    assert kind == "JPEG" and image.size == (128, 128) and max_size > 0
    assert out["result"][0]["indices"].shape == (1, 16, 16)
    assert out["ui"]["vqcore_sampler"][0]["steps"] == 8


def test_sampler_sends_no_previews_when_the_user_turned_them_off(pack, fake, vq_diffusion):
    model, positive, _ = vq_diffusion
    fake.cli_args.args.preview_method = "none"  # ComfyUI's --preview-method none, or the front end's setting
    fake.record_compute(model.vq.model.decoder, "preview_decode")
    run_sampler(pack, model, positive)
    bar = fake.progress_bars[-1]
    assert bar.current == bar.total == 8 and bar.previews == []
    assert ("preview_decode",) not in fake.events, "previews were decoded although none are shown"


def test_interrupt_stops_the_sampler_within_one_step_and_leaves_inputs_untouched(pack, fake, vq_diffusion):
    model, positive, vq_vae = vq_diffusion
    image = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(1))
    tokens = node(pack, "VQCoreEncode").encode(vq_vae, image)["result"][1]
    before = tokens["indices"].clone()
    mask = torch.zeros(1, 128, 128)
    mask[:, 32:96, 32:96] = 1
    fake.events.clear()
    fake.record_compute(model.transformer)
    fake.interrupt_checks, fake.interrupt_after_checks = 0, 4  # checked before every step: stop before step 4
    with pytest.raises(InterruptProcessingException):
        run_sampler(pack, model, positive, steps=20, tokens=tokens, mask=mask)
    assert sum(e[0] == "compute" for e in fake.events) == 3, "steps ran after the interrupt"
    assert torch.equal(tokens["indices"], before), "the input tokens were modified"
    assert model.truncation_rate == 1.0


class RecordingComfyVAE:
    """Stands in for comfy.sd.VAE: records what our loader builds it from; full decode as ComfyUI's (model space)."""

    def __init__(self, sd=None, device=None, config=None, dtype=None, metadata=None):
        self.sd, self.config, self.vae_dtype = sd, config, dtype
        self.first_stage_model = types.SimpleNamespace()
        self.handles_tiling = False

    def get_sd(self):
        return self.sd


def reference_decode(pack, path, latents):
    model = pack.vqcore.loading.load_autoencoder_kl(path, "cpu")
    with torch.no_grad():
        return model.decode(latents)


def test_autoencoder_kl_becomes_a_comfy_vae_built_from_ldm_weights(pack, demo_models):
    fake = FakeHost(demo_models, host_module(pack).PlainFolders)
    with bound_host(pack, **fake.modules(), sd=types.SimpleNamespace(VAE=RecordingComfyVAE)):
        loader = node(pack, "VQCoreLoadAutoencoderKL")
        (sd_vae,) = loader.load("demo-sd-vae.safetensors", dtype="fp32")
        (flux,) = loader.load("demo-flux-ae.safetensors", dtype="fp32")
        (half,) = loader.load("demo-sd-vae.safetensors", dtype="fp16")
        assert isinstance(sd_vae, RecordingComfyVAE) and isinstance(flux, RecordingComfyVAE)
        ddconfig = sd_vae.config["params"]["ddconfig"]
        assert (ddconfig["ch"], ddconfig["ch_mult"], ddconfig["z_channels"]) == (32, [1, 2], 4)
        assert "encoder.down.0.block.0.conv1.weight" in sd_vae.sd and sd_vae.sd["decoder.mid.attn_1.q.weight"].ndim == 4
        assert (sd_vae.downscale_ratio, sd_vae.latent_channels) == (2, 4)
        # tied to its vqcore model at load: the model the weights came from, not one rebuilt from get_sd() later
        assert sd_vae.vqcore_handle.model.config["scaling_factor"] == 0.18215
        # Flux has no quant convs; ComfyUI's LDM AutoencoderKL always does: identity convs keep the maths unchanged.
        assert torch.equal(flux.sd["quant_conv.weight"][:, :, 0, 0], torch.eye(32))
        assert torch.equal(flux.sd["post_quant_conv.weight"][:, :, 0, 0], torch.eye(16))
        assert type(half).__name__ == "VAEAdapter", "fp16 needs our overflow fallback"
        assert half.handles_tiling
        # ComfyUI's VAE Encode (Tiled) on the stand-in: latents (the posterior mode) like its plain encode.
        pixels = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(1))
        assert (half.encode_tiled(pixels, 8, 8) - half.encode(pixels)).abs().max() <= 1e-2  # fp16 model
        # The seamless tiled node decodes with the model tied to the VAE at load.
        latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
        out = node(pack, "VQCoreTiledVAEDecode").decode(flux, 32, samples={"samples": latents})
        assert out["result"][0].shape == (1, 16, 16, 3) and out["ui"]["vqcore_tiles"][0]["grid"] == [1, 1]
        expected = reference_decode(pack, demo_models / "vae" / "demo-flux-ae.safetensors", latents)
        assert (out["result"][0] - ((expected + 1) / 2).clamp(0, 1).movedim(1, -1)).abs().max() <= 2e-3


def test_core_tiled_decode_of_our_comfy_vae_goes_to_the_seamless_tiler(pack, demo_models):
    """ComfyUI 0.33 calls first_stage_model.decode_tiled(latents, tile_x=, tile_y=, overlap=) (latent cells) for a
    VAE with handles_tiling and expects the model's -1..1 output; our tiles equal the full decode."""
    fake = FakeHost(demo_models, host_module(pack).PlainFolders)
    with bound_host(pack, **fake.modules(), sd=types.SimpleNamespace(VAE=RecordingComfyVAE)):
        (vae,) = node(pack, "VQCoreLoadAutoencoderKL").load("demo-sd-vae.safetensors", dtype="fp32")
        assert vae.handles_tiling
        latents = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(4))
        fake.progress_bars.clear()
        out = vae.first_stage_model.decode_tiled(latents, tile_x=8, tile_y=8, overlap=2)
        bar = fake.progress_bars[-1]  # our tiler's: 48 px in 16 px tiles
        assert bar.current == bar.total > 1
    expected = reference_decode(pack, demo_models / "vae" / "demo-sd-vae.safetensors", latents)
    assert out.shape == expected.shape and (out - expected).abs().max() <= 2e-3


def test_seamless_vae_routes_a_core_vae_to_the_seamless_tiler_and_leaves_the_input_as_it_was(pack, demo_models):
    fake = FakeHost(demo_models, host_module(pack).PlainFolders)
    path = demo_models / "vae" / "demo-sd-vae.safetensors"
    core_vae = RecordingComfyVAE(sd=pack.vqcore.checkpoint.read_state_dict(path), dtype=torch.float32)
    with bound_host(pack, **fake.modules(), sd=types.SimpleNamespace(VAE=RecordingComfyVAE)):
        (seamless,) = node(pack, "VQCoreSeamlessVAE").wrap(core_vae)
        assert seamless is not core_vae and seamless.handles_tiling and not core_vae.handles_tiling
        assert seamless.get_sd() is core_vae.sd, "the same weights, not a copy"
        latents = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(5))
        out = seamless.first_stage_model.decode_tiled(latents, tile_x=8, tile_y=8, overlap=2)
        (ours,) = node(pack, "VQCoreLoadAutoencoderKL").load("demo-sd-vae.safetensors", dtype="fp32")
        assert node(pack, "VQCoreSeamlessVAE").wrap(ours)[0] is ours, "our VAEs are seamless already"
        with pytest.raises(pack.vqcore.errors.VQCoreError, match="^vae: "):
            node(pack, "VQCoreSeamlessVAE").wrap(RecordingComfyVAE(sd={"taesd_decoder.1.weight": torch.zeros(1)}))
    expected = reference_decode(pack, path, latents)
    assert (out - expected).abs().max() <= 2e-3
