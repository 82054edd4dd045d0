"""Checkpoints in their original layouts: random diffusers models are written out as LDM / taming / MoVQ / PatchVQGAN
files (the tests' own mapping in ldm_layout.py), loaded by vqcore with the config inferred from shapes alone, and
compared with diffusers on the same weights: fp32, CPU, max |Δ| ≤ 1e-5, codebook indices identical."""

import json
import logging

import pytest
import torch
from ldm_layout import to_old_diffusers_names, to_original_layout, to_patch_vqgan
from safetensors.torch import save_file

from vqcore.errors import CheckpointError
from vqcore.loading import load_autoencoder, load_autoencoder_kl, load_vqmodel

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-5
D, AD, U, AU = "DownEncoderBlock2D", "AttnDownEncoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"
ARCHITECTURE_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
                       "up_block_types", "latent_channels", "mid_block_add_attention")


def kl_model(seed, boc=(32, 64), latent=4, quant_convs=True, layers=1):
    torch.manual_seed(seed)
    n = len(boc)
    model = diffusers.AutoencoderKL(block_out_channels=boc, down_block_types=[D] * n, up_block_types=[U] * n,
                                    layers_per_block=layers, latent_channels=latent, use_quant_conv=quant_convs,
                                    use_post_quant_conv=quant_convs)
    return perturbed(model, seed)


def vq_model(seed, boc, latent, embed_dim=None, codes=32, attention=True, norm_type="group", layers=1):
    torch.manual_seed(seed)
    n = len(boc)
    down, up = [D] * n, [U] * n
    if attention:
        down[-1], up[0] = AD, AU
    model = diffusers.VQModel(block_out_channels=boc, down_block_types=down, up_block_types=up, layers_per_block=layers,
                              latent_channels=latent, vq_embed_dim=embed_dim, num_vq_embeddings=codes,
                              norm_type=norm_type)
    return perturbed(model, seed)


def perturbed(model, seed):
    """Norm affines away from 1/0 and a codebook as wide as the latents, so every weight matters and many codes win."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "quantize.embedding.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def assert_vq_matches(model, ref, size=16, batch=2):
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        latents, ref_latents = model.encode(x), ref.encode(x).latents
        _, _, indices = model.quantize(latents)
        _, _, (_, _, ref_indices) = ref.quantize(ref_latents)
        decoded, ref_decoded = model.decode(ref_latents), ref.decode(ref_latents).sample  # each stage on the same input
    assert (latents - ref_latents).abs().max() <= ATOL
    assert torch.equal(indices.flatten(), ref_indices.flatten())
    assert indices.unique().numel() > 1
    assert (decoded - ref_decoded).abs().max() <= ATOL


def assert_kl_matches(model, ref, size=16, batch=2):
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior, ref_posterior = model.encode(x), ref.encode(x).latent_dist
        decoded, ref_decoded = model.decode(ref_posterior.mean), ref.decode(ref_posterior.mean).sample
    assert (posterior.mean - ref_posterior.mean).abs().max() <= ATOL
    assert (posterior.logvar - ref_posterior.logvar).abs().max() <= ATOL
    assert (decoded - ref_decoded).abs().max() <= ATOL


def assert_same_architecture(model, ref):
    def as_list(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    for field in ARCHITECTURE_FIELDS:
        assert as_list(model.config[field]) == as_list(ref.config[field]), field


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------------------------
# Each family in its original layout


def test_sd_vae_ldm_layout_safetensors(tmp_path):
    ref = kl_model(0, layers=2)
    save_file(to_original_layout(weights(ref)), tmp_path / "vae-ft-mse.safetensors")
    model = load_autoencoder_kl(tmp_path / "vae-ft-mse.safetensors", device="cpu")
    assert_same_architecture(model, ref)
    assert model.config["scaling_factor"] == 0.18215  # 4 channels, nothing else known: SD1 constants
    assert_kl_matches(model, ref)


def test_flux_16_channel_vae_without_quant_convs(tmp_path):
    ref = kl_model(1, latent=16, quant_convs=False)
    save_file(to_original_layout(weights(ref)), tmp_path / "ae.safetensors")
    model = load_autoencoder(tmp_path / "ae.safetensors", device="cpu")
    assert model.quant_conv is None and model.post_quant_conv is None
    assert (model.config["scaling_factor"], model.config["shift_factor"]) == (0.3611, 0.1159)
    assert_kl_matches(model, ref)


def test_full_sd_checkpoint_ckpt_with_first_stage_model_prefix(tmp_path):
    ref = kl_model(2)
    vae = {f"first_stage_model.{k}": v for k, v in to_original_layout(weights(ref)).items()}
    others = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
              "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.randn(8),
              "model_ema.decay": torch.tensor(0.999), "first_stage_model.loss.logvar": torch.zeros(())}
    torch.save({"state_dict": {**others, **vae}, "global_step": 10}, tmp_path / "v1-5-pruned.ckpt")
    model = load_autoencoder_kl(tmp_path / "v1-5-pruned.ckpt", device="cpu")
    assert model.config["scaling_factor"] == 0.18215
    assert_kl_matches(model, ref)


@pytest.mark.parametrize("neighbour, family, scaling", [
    ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight", "sdxl", 0.13025),
    ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "sd3", 1.5305),
])
def test_full_checkpoint_family_from_neighbouring_keys(tmp_path, neighbour, family, scaling):
    ref = kl_model(3, latent=16 if family == "sd3" else 4, quant_convs=family != "sd3")
    vae = {f"first_stage_model.{k}": v for k, v in to_original_layout(weights(ref)).items()}
    save_file({neighbour: torch.randn(4, 4), **vae}, tmp_path / "model.safetensors")
    model = load_autoencoder(tmp_path / "model.safetensors", device="cpu")
    assert model.config["scaling_factor"] == scaling
    assert_kl_matches(model, ref)


def test_taming_vqgan_f4_training_checkpoint(tmp_path):
    ref = vq_model(4, boc=(32, 64, 64), latent=3, codes=48, attention=False)
    state = to_original_layout(weights(ref))
    state.update({"loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4), "quantize.used": torch.arange(48)})
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "vq-f4.ckpt")
    model = load_vqmodel(tmp_path / "vq-f4.ckpt", device="cpu")
    assert_same_architecture(model, ref)
    assert_vq_matches(model, ref)


def test_taming_vqgan_f8_attention_in_last_level(tmp_path):
    ref = vq_model(5, boc=(32, 32, 64, 64), latent=4, codes=64, layers=2)
    save_file(to_original_layout(weights(ref)), tmp_path / "vq-f8.safetensors")
    model = load_vqmodel(tmp_path / "vq-f8.safetensors", device="cpu")
    assert model.config["down_block_types"][-1] == AD and model.config["up_block_types"][0] == AU
    assert_vq_matches(model, ref)


def test_taming_vqgan_f16_five_levels(tmp_path):
    ref = vq_model(6, boc=(32, 32, 32, 64, 64), latent=8, codes=64)
    torch.save(to_original_layout(weights(ref)), tmp_path / "vq-f16.pt")
    model = load_vqmodel(tmp_path / "vq-f16.pt", device="cpu")
    assert model.downscale_factor == 16
    assert_vq_matches(model, ref, size=32)


def test_kandinsky_movq_spatial_norm_decoder(tmp_path):
    ref = vq_model(7, boc=(32, 32, 64), latent=4, codes=64, norm_type="spatial")
    save_file(to_original_layout(weights(ref)), tmp_path / "movq_final.safetensors")
    model = load_vqmodel(tmp_path / "movq_final.safetensors", device="cpu")
    assert model.config["norm_type"] == "spatial"
    assert_vq_matches(model, ref)


def test_vq_diffusion_patch_vqgan_raw_codebook(tmp_path):
    ref = vq_model(8, boc=(32, 32, 64), latent=64, embed_dim=32, codes=64)
    torch.save({"model": to_patch_vqgan(weights(ref)), "epoch": 0}, tmp_path / "ithq_vqvae.pth")
    model = load_vqmodel(tmp_path / "ithq_vqvae.pth", device="cpu")
    assert (model.config["vq_embed_dim"], model.config["latent_channels"]) == (32, 64)
    assert_vq_matches(model, ref)


def test_attention_weights_stored_2d_in_ldm_file(tmp_path):
    ref = vq_model(9, boc=(32, 64), latent=4, codes=32)
    save_file(to_original_layout(weights(ref), conv_attention=False), tmp_path / "vq.safetensors")
    assert_vq_matches(load_vqmodel(tmp_path / "vq.safetensors", device="cpu"), ref)


def test_eleven_levels_map_by_path_component_not_substring(tmp_path):
    """`down.1.` must not match `down.10.`, and decoder level 10 must become up_blocks.0."""
    ref = vq_model(10, boc=(32,) * 11, latent=4, codes=8)
    save_file(to_original_layout(weights(ref)), tmp_path / "deep.safetensors")
    model = load_vqmodel(tmp_path / "deep.safetensors", device="cpu")
    loaded = model.state_dict()
    assert loaded.keys() == ref.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in ref.state_dict().items())


# ------------------------------------------------------------------------------------------------------------------
# diffusers names in single files and folders


@pytest.mark.parametrize("prefix", ["", "vae."])
def test_single_file_with_diffusers_keys(tmp_path, prefix):
    ref = vq_model(11, boc=(32, 64), latent=4, codes=32, norm_type="spatial")
    save_file({prefix + k: v for k, v in weights(ref).items()}, tmp_path / "movq-diffusers.safetensors")
    assert_vq_matches(load_autoencoder(tmp_path / "movq-diffusers.safetensors", device="cpu"), ref)


def test_bin_folder_with_old_attention_names_is_read_with_weights_only(tmp_path, monkeypatch):
    ref = vq_model(12, boc=(32, 64), latent=8, embed_dim=4, codes=32)
    ref.save_pretrained(tmp_path / "vqvae", safe_serialization=False)
    (tmp_path / "vqvae" / "diffusion_pytorch_model.bin").unlink()
    torch.save(to_old_diffusers_names(weights(ref)), tmp_path / "vqvae" / "diffusion_pytorch_model.bin")
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw.get("weights_only")) or real_load(*a, **kw))
    model = load_vqmodel(tmp_path / "vqvae", device="cpu")
    assert calls == [True]
    assert_vq_matches(model, ref)


def test_fp16_variant_folder(tmp_path):
    full, half = kl_model(13), kl_model(14)
    full.save_pretrained(tmp_path / "vae")
    save_file({k: v.half() for k, v in weights(half).items()}, tmp_path / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    assert_kl_matches(load_autoencoder_kl(tmp_path / "vae", device="cpu"), full)
    model = load_autoencoder_kl(tmp_path / "vae", device="cpu", variant="fp16")
    assert model.dtype == torch.float32  # dtype None means fp32, whatever the file holds
    half.load_state_dict({k: v.half().float() for k, v in weights(half).items()})
    assert_kl_matches(model, half)
    assert load_autoencoder_kl(tmp_path / "vae", device="cpu", dtype="fp16", variant="fp16").dtype == torch.float16


def test_pipeline_folder_with_vqvae_component(tmp_path):
    ref = vq_model(15, boc=(32, 64), latent=4, codes=32)
    ref.save_pretrained(tmp_path / "pipe" / "vqvae")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "VQDiffusionPipeline"}))
    assert_vq_matches(load_autoencoder(tmp_path / "pipe", device="cpu"), ref)


# ------------------------------------------------------------------------------------------------------------------
# Family option and model-kind checks


def test_family_option_sets_latent_constants(tmp_path):
    ref = kl_model(16)
    save_file(to_original_layout(weights(ref)), tmp_path / "vae.safetensors")
    def load(family):
        return load_autoencoder_kl(tmp_path / "vae.safetensors", device="cpu", family=family)

    assert load("auto").config["scaling_factor"] == 0.18215
    sdxl = load("sdxl")
    assert (sdxl.config["scaling_factor"], sdxl.config["force_upcast"]) == (0.13025, True)
    assert load("sdxl-fp16-fix").config["force_upcast"] is False
    playground = load("playground-v2.5")
    z = torch.ones(1, 4, 2, 2)
    expected = (1 - torch.tensor([-1.6574, 1.886, -1.383, 2.5155])) * 0.5 / torch.tensor([8.4927, 5.9022, 6.5498, 5.2299])
    assert torch.allclose(playground.scale_latents(z)[0, :, 0, 0], expected)
    with pytest.raises(CheckpointError, match="16 latent channels"):
        load("flux")
    with pytest.raises(CheckpointError, match="unknown family"):
        load("sd9")


def test_sdxl_name_hint_and_folder_config_kept(tmp_path):
    ref = kl_model(17)
    save_file(to_original_layout(weights(ref)), tmp_path / "sdxl_vae.safetensors")
    assert load_autoencoder_kl(tmp_path / "sdxl_vae.safetensors", device="cpu").config["scaling_factor"] == 0.13025
    ref.register_to_config(scaling_factor=0.5)
    ref.save_pretrained(tmp_path / "folder")
    assert load_autoencoder_kl(tmp_path / "folder", device="cpu").config["scaling_factor"] == 0.5
    assert load_autoencoder_kl(tmp_path / "folder", device="cpu", family="sd2").config["sample_size"] == 768


def test_vq_loader_refuses_kl_file_and_back(tmp_path):
    save_file(to_original_layout(weights(kl_model(18))), tmp_path / "kl.safetensors")
    save_file(to_original_layout(weights(vq_model(19, boc=(32, 64), latent=4))), tmp_path / "vq.safetensors")
    with pytest.raises(CheckpointError, match=r"kl\.safetensors: holds a KL autoencoder"):
        load_vqmodel(tmp_path / "kl.safetensors", device="cpu")
    with pytest.raises(CheckpointError, match=r"vq\.safetensors: holds a VQ autoencoder"):
        load_autoencoder_kl(tmp_path / "vq.safetensors", device="cpu")


@pytest.mark.parametrize("family, config", [
    ("vq-f4", dict(block_out_channels=[128, 256, 512], latent_channels=3, num_vq_embeddings=8192)),
    ("vq-f8", dict(block_out_channels=[128, 256, 256, 512], latent_channels=4, num_vq_embeddings=16384)),
    ("movq", dict(block_out_channels=[128, 256, 256, 512], latent_channels=4, num_vq_embeddings=16384, norm_type="spatial")),
    ("vq-f16", dict(block_out_channels=[128, 128, 256, 256, 512], latent_channels=8, num_vq_embeddings=16384)),
    ("ithq", dict(block_out_channels=[64, 128, 256, 512], latent_channels=256, vq_embed_dim=128, num_vq_embeddings=4096)),
    (None, dict(block_out_channels=[32, 64], latent_channels=4, num_vq_embeddings=16384)),
])
def test_vq_family_identified_from_published_shapes(family, config):
    from vqcore.vae_layouts import identify_vq_family

    assert identify_vq_family(config) == family


# ------------------------------------------------------------------------------------------------------------------
# Config overrides: config=, a config file beside the weights, checked against the weights


def ldm_yaml(ref, kl, **extra_ddconfig):
    """The taming / LDM YAML that describes a diffusers model `ref` (as the original repositories ship it)."""
    c = ref.config
    boc = list(c.block_out_channels)
    resolution = 64
    attention = [resolution // 2**i for i, t in enumerate(c.down_block_types) if t.startswith("Attn")]
    ddconfig = {"double_z": kl, "z_channels": c.latent_channels, "resolution": resolution, "in_channels": c.in_channels,
                "out_ch": c.out_channels, "ch": boc[0], "ch_mult": [b // boc[0] for b in boc],
                "num_res_blocks": c.layers_per_block, "attn_resolutions": attention, "dropout": 0.0, **extra_ddconfig}
    params = {"embed_dim": c.latent_channels if kl else c.vq_embed_dim or c.latent_channels, "ddconfig": ddconfig,
              "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                             "params": {"disc_start": 10000}}}
    if not kl:
        params["n_embed"] = c.num_vq_embeddings
    target = "ldm.models.autoencoder.AutoencoderKL" if kl else "taming.models.vqgan.VQModel"
    return {"model": {"base_learning_rate": 4.5e-6, "target": target, "params": params}}


def write_yaml(path, doc):
    import yaml

    path.write_text(yaml.safe_dump(doc))
    return path


def exact_outputs(model, size=16):
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        if hasattr(model, "quantize"):
            latents = model.encode(x)
            return latents, model.quantize(latents)[2], model.decode(latents)
        mean = model.encode(x).mean
        return mean, model.decode(mean)


def assert_identical(model, other):
    assert model.state_dict().keys() == other.state_dict().keys()
    for a, b in zip(exact_outputs(model), exact_outputs(other)):
        assert torch.equal(a, b)  # max |Δ| = 0: the same weights and config on the exact path


def eight_group_kl(seed=20):
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(block_out_channels=(24, 48), down_block_types=[D, D], up_block_types=[U, U],
                                    layers_per_block=1, latent_channels=4, norm_num_groups=8)
    return perturbed(model, seed)


def test_ldm_file_with_8_groups_through_a_sidecar_yaml_and_config(tmp_path, caplog):
    ref = eight_group_kl()
    ref.save_pretrained(tmp_path / "diffusers-vae")
    from_folder = load_autoencoder_kl(tmp_path / "diffusers-vae", device="cpu")
    save_file(to_original_layout(weights(ref)), tmp_path / "kl-f4-8g.safetensors")

    with pytest.raises(CheckpointError, match=r"kl-f4-8g\.safetensors: the widths \[24, 48\] are not multiples of 32"):
        load_autoencoder_kl(tmp_path / "kl-f4-8g.safetensors", device="cpu")

    yaml_file = write_yaml(tmp_path / "kl-f4-8g.yaml", ldm_yaml(ref, kl=True, norm_num_groups=8))
    with caplog.at_level(logging.INFO, logger="vqcore"):
        from_sidecar = load_autoencoder_kl(tmp_path / "kl-f4-8g.safetensors", device="cpu")
    assert "kl-f4-8g.safetensors: using the config file beside it, kl-f4-8g.yaml" in caplog.text
    assert from_sidecar.config["norm_num_groups"] == 8 and from_sidecar.config["sample_size"] == 64
    assert_identical(from_sidecar, from_folder)
    assert_kl_matches(from_sidecar, ref)

    yaml_file.rename(tmp_path / "elsewhere.yaml")
    for config in ({"norm_num_groups": 8}, tmp_path / "elsewhere.yaml", str(tmp_path / "diffusers-vae" / "config.json")):
        assert_identical(load_autoencoder_kl(tmp_path / "kl-f4-8g.safetensors", device="cpu", config=config), from_folder)


def test_taming_vq_file_with_a_sidecar_yaml(tmp_path):
    ref = vq_model(21, boc=(32, 64, 64), latent=4, embed_dim=3, codes=32, layers=2)
    ref.save_pretrained(tmp_path / "diffusers-vq")
    torch.save({"state_dict": to_original_layout(weights(ref))}, tmp_path / "vqgan.ckpt")
    write_yaml(tmp_path / "vqgan.yaml", ldm_yaml(ref, kl=False))
    model = load_vqmodel(tmp_path / "vqgan.ckpt", device="cpu")
    assert (model.config["sample_size"], model.config["vq_embed_dim"], model.config["num_vq_embeddings"]) == (64, 3, 32)
    assert_identical(model, load_vqmodel(tmp_path / "diffusers-vq", device="cpu"))
    assert_vq_matches(model, ref)


@pytest.mark.parametrize("change, message", [
    (lambda dd, p: dd.update(ch_mult=[1, 4]), r"ddconfig ch: 24 × ch_mult: \[1, 4\] gives block_out_channels = \[24, 96\], "
                                              r"but the weights of .*kl\.safetensors say \[24, 48\]"),
    (lambda dd, p: dd.update(attn_resolutions=[32]), r"ddconfig attn_resolutions: \[32\] at resolution 64 gives down_block_types"),
    (lambda dd, p: dd.update(z_channels=8) or p.update(embed_dim=8), r"ddconfig z_channels gives latent_channels = 8, but .* say 4"),
    (lambda dd, p: dd.update(num_res_blocks=2), r"ddconfig num_res_blocks gives layers_per_block = 2, but .* say 1"),
    (lambda dd, p: dd.update(double_z=False), r"ddconfig double_z: False describes a VQ autoencoder \(VQModel\), but the "
                                              r"weights of .*kl\.safetensors are a KL autoencoder"),
    (lambda dd, p: p.update(n_embed=16), r"num_vq_embeddings is a field of a VQ autoencoder"),
    (lambda dd, p: dd.update(norm_num_groups=7), r"kl\.safetensors: block_out_channels \[24, 48\] must be multiples of norm_num_groups=7"),
    (lambda dd, p: dd.update(attn_type="linear"), r"kl\.yaml: ddconfig attn_type: linear is not supported"),
], ids=["widths", "attention levels", "latent channels", "layers", "kind", "field of the other kind", "groups", "attention type"])
def test_sidecar_that_contradicts_the_weights(tmp_path, change, message):
    ref = eight_group_kl()
    save_file(to_original_layout(weights(ref)), tmp_path / "kl.safetensors")
    doc = ldm_yaml(ref, kl=True, norm_num_groups=8)
    change(doc["model"]["params"]["ddconfig"], doc["model"]["params"])
    write_yaml(tmp_path / "kl.yaml", doc)
    with pytest.raises(CheckpointError, match=message):
        load_autoencoder(tmp_path / "kl.safetensors", device="cpu")


def test_config_sets_what_shapes_cannot_tell(tmp_path):
    vq = vq_model(22, boc=(32, 64), latent=4, codes=32)
    save_file(to_original_layout(weights(vq)), tmp_path / "vq.safetensors")
    fields = {"act_fn": "silu", "sample_size": 128, "scaling_factor": 0.5, "force_upcast": True, "lookup_from_codebook": True}
    model = load_vqmodel(tmp_path / "vq.safetensors", device="cpu", config=fields)
    assert fields.items() <= model.config.items()
    kl = kl_model(23)
    save_file(to_original_layout(weights(kl)), tmp_path / "kl.safetensors")
    fields = {"scaling_factor": 0.3, "shift_factor": 0.1, "force_upcast": False, "sample_size": 256}
    assert fields.items() <= load_autoencoder_kl(tmp_path / "kl.safetensors", device="cpu", config=fields).config.items()
    with pytest.raises(CheckpointError, match=r"act_fn 'gelu_tanh' is not supported"):
        load_autoencoder_kl(tmp_path / "kl.safetensors", device="cpu", config={"act_fn": "gelu_tanh"})
    with pytest.raises(CheckpointError, match=r"config=: unknown config field 'norm_groups'"):
        load_autoencoder_kl(tmp_path / "kl.safetensors", device="cpu", config={"norm_groups": 8})
    with pytest.raises(CheckpointError, match=r"config=: block_out_channels gives block_out_channels = \[32, 32\], but the "
                                              r"weights of .*kl\.safetensors say \[32, 64\]"):
        load_autoencoder_kl(tmp_path / "kl.safetensors", device="cpu", config={"block_out_channels": [32, 32]})


def test_sd_inference_yaml_beside_a_full_checkpoint(tmp_path):
    ref = kl_model(24)
    vae = {f"first_stage_model.{k}": v for k, v in to_original_layout(weights(ref)).items()}
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3), **vae}, tmp_path / "sd.safetensors")
    first_stage = ldm_yaml(ref, kl=True)["model"]
    write_yaml(tmp_path / "sd.yaml", {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "scale_factor": 0.13025, "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel"},
        "first_stage_config": first_stage}}})
    model = load_autoencoder_kl(tmp_path / "sd.safetensors", device="cpu")
    assert model.config["scaling_factor"] == 0.13025  # the YAML's, over the guess from the neighbouring keys
    assert load_autoencoder_kl(tmp_path / "sd.safetensors", device="cpu", family="sd1").config["scaling_factor"] == 0.18215
    assert_kl_matches(model, ref)


def test_json_sidecar_and_config_json_folder(tmp_path):
    ref = eight_group_kl(25)
    save_file(to_original_layout(weights(ref)), tmp_path / "vae.safetensors")
    (tmp_path / "vae.json").write_text(json.dumps({"norm_num_groups": 8, "scaling_factor": 0.25}))
    model = load_autoencoder(tmp_path / "vae.safetensors", device="cpu")
    assert (model.config["norm_num_groups"], model.config["scaling_factor"]) == (8, 0.25)
    write_yaml(tmp_path / "vae.yaml", {"norm_num_groups": 8})
    with pytest.raises(CheckpointError, match=r"vae\.safetensors: several config files beside it \(vae\.yaml, vae\.json\)"):
        load_autoencoder(tmp_path / "vae.safetensors", device="cpu")
    assert load_autoencoder(tmp_path / "vae.safetensors", device="cpu", config={"norm_num_groups": 8}).config["scaling_factor"] == 0.18215


def test_folder_config_json_that_contradicts_its_weights(tmp_path):
    ref = kl_model(26)
    ref.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, "latent_channels": 8}))
    with pytest.raises(CheckpointError, match=r"vae/config\.json: latent_channels gives latent_channels = 8, but the weights "
                                              r"of .*vae say 4"):
        load_autoencoder_kl(tmp_path / "vae", device="cpu")
    assert load_autoencoder_kl(tmp_path / "vae", device="cpu", config={"latent_channels": 4}).config["latent_channels"] == 4


def test_loader_node_picks_up_the_sidecar(pack, tmp_path):
    from nodes_support import plain_host

    ref = eight_group_kl(27)
    (tmp_path / "models" / "vae").mkdir(parents=True)
    save_file(to_original_layout(weights(ref)), tmp_path / "models" / "vae" / "kl-8g.safetensors")
    write_yaml(tmp_path / "models" / "vae" / "kl-8g.yaml", ldm_yaml(ref, kl=True, norm_num_groups=8))
    with plain_host(pack, tmp_path / "models"):
        loader = pack.NODE_CLASS_MAPPINGS["VQCoreLoadAutoencoderKL"]
        assert loader.INPUT_TYPES()["required"]["vae_name"][0] == ["kl-8g.safetensors"]  # the YAML is no model
        (vae,) = loader().load("kl-8g.safetensors", dtype="fp32")
    assert vae.vqcore_handle.model.config["norm_num_groups"] == 8
