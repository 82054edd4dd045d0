"""Bad input, one test per case: a clear VQCoreError / CheckpointError naming the file or tensor at fault, and nothing
else breaks (no code from a pickle runs, a good file still loads afterwards)."""

import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vqcore.autoencoder_kl import AutoencoderKL
from vqcore.errors import CheckpointError, VQCoreError
from vqcore.loading import load_autoencoder, load_autoencoder_kl, load_vqmodel
from vqcore.vae_layouts import to_ldm_names
from vqcore.vq_model import VQModel
from unsafe_pickle import CreatesMarkerFile

D, AD, U, AU = "DownEncoderBlock2D", "AttnDownEncoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"


@pytest.fixture
def vq_file(tmp_path):
    """A small valid VQ checkpoint in taming layout (downscale factor 4, attention in the last level)."""
    torch.manual_seed(0)
    model = VQModel(block_out_channels=[32, 32, 64], down_block_types=[D, D, AD], up_block_types=[AU, U, U],
                    latent_channels=4, num_vq_embeddings=16)
    path = tmp_path / "good-vq.safetensors"
    save_file({k: v.contiguous() for k, v in to_ldm_names(model.state_dict()).items()}, path)
    return path


def rewritten(vq_file, path, change):
    """The good checkpoint with change(state) -> state applied, written to path."""
    save_file(change(load_file(vq_file)), path)
    return path


@pytest.fixture
def vq(vq_file):
    return load_vqmodel(vq_file, device="cpu")


def test_truncated_safetensors(vq_file, tmp_path):
    broken = tmp_path / "truncated.safetensors"
    data = vq_file.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors"):
        load_vqmodel(broken, device="cpu")
    assert load_vqmodel(vq_file, device="cpu").num_embeddings == 16  # nothing else broke


def test_corrupt_safetensors_header(vq_file, tmp_path):
    broken = tmp_path / "corrupt.safetensors"
    data = bytearray(vq_file.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    data[9 : 8 + header_len - 1] = b"#" * (header_len - 2)  # keeps the "{...}" frame, destroys the JSON inside
    broken.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt\.safetensors"):
        load_vqmodel(broken, device="cpu")


def test_file_that_is_not_a_weight_file_at_all(tmp_path):
    broken = tmp_path / "zeros.safetensors"  # e.g. an interrupted download that left a zero-filled file
    broken.write_bytes(bytes(4096))
    with pytest.raises(CheckpointError, match=r"zeros\.safetensors"):
        load_vqmodel(broken, device="cpu")


def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "payload": CreatesMarkerFile(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused"):
        load_autoencoder(path, device="cpu")
    assert not marker.exists()
    with open(path, "rb") as f:  # the file really does run code when unpickled without restrictions
        torch.load(f, weights_only=False)
    assert marker.exists()


def test_text_encoder_file_given_to_vae_loader(tmp_path):
    # CLIP text tower key names as transformers 5 writes them (note "encoder." like a VAE's encoder).
    clip = {
        "embeddings.token_embedding.weight": torch.randn(10, 8),
        "embeddings.position_embedding.weight": torch.randn(7, 8),
        "encoder.layers.0.self_attn.q_proj.weight": torch.randn(8, 8),
        "encoder.layers.0.mlp.fc1.weight": torch.randn(16, 8),
        "final_layer_norm.weight": torch.ones(8),
    }
    save_file(clip, tmp_path / "clip_l.safetensors")
    with pytest.raises(CheckpointError, match=r"clip_l\.safetensors: no VAE weights found.*text encoder"):
        load_autoencoder_kl(tmp_path / "clip_l.safetensors", device="cpu")


def test_missing_keys_are_named(vq_file, tmp_path):
    path = rewritten(vq_file, tmp_path / "missing.safetensors",
                     lambda state: {k: v for k, v in state.items() if k != "decoder.up.0.block.1.conv2.bias"})
    with pytest.raises(CheckpointError, match=r"missing\.safetensors.*missing keys \(1\): decoder\.up\.0\.block\.1\.conv2\.bias"):
        load_vqmodel(path, device="cpu")


def test_extra_keys_are_named(vq_file, tmp_path):
    path = rewritten(vq_file, tmp_path / "extra.safetensors",
                     lambda state: {**state, "encoder.down.0.block.0.time_emb_proj.weight": torch.zeros(32, 8)})
    with pytest.raises(CheckpointError, match=r"extra\.safetensors.*unexpected keys \(1\): encoder\.down\.0\.block\.0\.time_emb_proj\.weight"):
        load_vqmodel(path, device="cpu")


def test_image_size_not_divisible_by_downscale_factor(vq):
    with pytest.raises(VQCoreError, match=r"multiples of 4.*\(1, 3, 18, 16\)"):
        vq.encode(torch.zeros(1, 3, 18, 16))
    assert vq.encode(torch.zeros(1, 3, 16, 16)).shape == (1, 4, 4, 4)


def test_wrong_channel_count(vq):
    with pytest.raises(VQCoreError, match=r"\(1, 4, 16, 16\)"):
        vq.encode(torch.zeros(1, 4, 16, 16))


def test_nan_input(vq):
    x = torch.zeros(1, 3, 16, 16)
    x[0, 1, 3, 5] = float("nan")
    with pytest.raises(VQCoreError, match="NaN"):
        vq.encode(x)


@pytest.mark.parametrize("call, message", [
    (lambda m: m.decode(torch.zeros(1, 5, 4, 4)), "(batch, 4, height, width)"),
    (lambda m: m.decode_indices(torch.full((1, 4, 4), 16)), "16 entries"),
    (lambda m: m.decode_indices(torch.zeros(1, 4, 4)), "integer"),
], ids=["latent channels", "index out of range", "float indices"])
def test_bad_latents_and_indices(vq, call, message):
    with pytest.raises(VQCoreError, match=re.escape(message)):
        call(vq)


def test_config_errors_are_reported_before_building():
    with pytest.raises(VQCoreError, match="vq_embed_dim"):
        VQModel(block_out_channels=[32], norm_type="spatial", latent_channels=4, vq_embed_dim=3)
    with pytest.raises(VQCoreError, match="unsupported block type"):
        AutoencoderKL(down_block_types=["CrossAttnDownBlock2D"])
    with pytest.raises(VQCoreError, match="same, non-zero length"):
        AutoencoderKL(block_out_channels=[32, 64])
    assert VQModel.from_config({"_class_name": "VQModel", "latent_channels": 2, "unknown": 1}).config["latent_channels"] == 2


def test_shape_mismatch_is_named(tmp_path, vq_file):
    path = rewritten(vq_file, tmp_path / "shapes.safetensors",
                     lambda state: {**state, "post_quant_conv.bias": torch.zeros(5)})
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): post_quant_conv\.bias \(file \(5,\), model \(4,\)\)"):
        load_vqmodel(path, device="cpu")


def test_tensor_with_wrong_rank_for_inferring_the_architecture(tmp_path, vq_file):
    path = rewritten(vq_file, tmp_path / "flat-codebook.safetensors",  # a damaged codebook, flattened
                     lambda state: {**state, "quantize.embedding.weight": torch.zeros(16)})
    with pytest.raises(CheckpointError, match=r"flat-codebook\.safetensors: tensor quantize\.embedding\.weight has shape \(16,\)"):
        load_vqmodel(path, device="cpu")


def test_integer_weights_are_named(tmp_path, vq_file):
    path = rewritten(vq_file, tmp_path / "int.safetensors",
                     lambda state: {**state, "encoder.conv_in.weight": state["encoder.conv_in.weight"].to(torch.int32)})
    with pytest.raises(CheckpointError, match=r"int\.safetensors.*not floating point \(1\): encoder\.conv_in\.weight \(torch\.int32\)"):
        load_vqmodel(path, device="cpu")


def test_widths_not_multiples_of_32_ask_for_the_group_count(tmp_path, vq_file):
    def narrow(state):  # the first level 24 channels wide, which the conventional 32 GroupNorm groups cannot divide
        return {k: v[:24] if k.startswith("encoder.down.0.block.0.conv1.") else v for k, v in state.items()}

    path = rewritten(vq_file, tmp_path / "narrow.safetensors", narrow)
    with pytest.raises(CheckpointError, match=r"narrow\.safetensors: the widths \[24, 32, 64\] are not multiples of 32"
                                              r".*config=\{'norm_num_groups': N\}.*beside the weight file"):
        load_vqmodel(path, device="cpu")


def test_unknown_dtype_name(vq_file):
    with pytest.raises(VQCoreError, match=r"dtype must be one of auto, fp32, fp16, bf16; got 'fp8'"):
        load_vqmodel(vq_file, device="cpu", dtype="fp8")


def test_folder_given_as_a_weight_file(tmp_path):
    from vqcore.checkpoint import read_state_dict

    (tmp_path / "vae.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"vae\.safetensors: is a folder, not a weight file"):
        read_state_dict(tmp_path / "vae.safetensors")


def test_file_holding_one_bare_tensor(tmp_path):
    torch.save(torch.zeros(3, 4), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match=r"bare\.pt: holds a single tensor \(3, 4\), not named weights"):
        load_autoencoder(tmp_path / "bare.pt", device="cpu")


# ------------------------------------------------------------------------------------------------------------------
# Damaged weights, misleading layouts and file kinds: the error names the file's own tensor


@pytest.mark.parametrize("key, value", [("decoder.up.1.block.0.conv1.weight", float("nan")),
                                        ("quantize.embedding.weight", float("nan")),
                                        ("encoder.mid.attn_1.q.weight", float("inf"))],
                         ids=["NaN weight", "NaN codebook entry", "inf weight"])
def test_non_finite_weight_is_named(vq_file, tmp_path, key, value):
    def damage(state):
        state[key] = state[key].clone()
        state[key].view(-1)[3] = value
        return state

    path = rewritten(vq_file, tmp_path / "damaged.safetensors", damage)
    with pytest.raises(CheckpointError, match=rf"damaged\.safetensors: weight {re.escape(key)} holds "
                                              rf"{int(value != value)} NaN and {int(value == float('inf'))} infinite"):
        load_vqmodel(path, device="cpu")


def test_weight_that_overflows_half_precision_is_named(vq_file, tmp_path):
    path = rewritten(vq_file, tmp_path / "large.safetensors",
                     lambda state: {**state, "post_quant_conv.bias": torch.full((4,), 1e6)})
    assert load_vqmodel(path, device="cpu").post_quant_conv.bias.max() == 1e6
    with pytest.raises(CheckpointError, match=r"large\.safetensors: weight post_quant_conv\.bias overflows torch\.float16"):
        load_vqmodel(path, device="cpu", dtype="fp16")


def test_transposed_decoder_conv_in_is_blamed_on_itself(vq_file, tmp_path):
    path = rewritten(vq_file, tmp_path / "transposed.safetensors", lambda state: {
        **state, "decoder.conv_in.weight": state["decoder.conv_in.weight"].transpose(0, 1).contiguous()})
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): decoder\.conv_in\.weight \(file \(4, 64, 3, 3\), "
                                              r"model \(64, 4, 3, 3\)\)") as error:
        load_vqmodel(path, device="cpu")
    assert "encoder.conv_out" not in str(error.value)


def test_transposed_decoder_conv_in_of_a_kl_file_without_quant_convs(tmp_path):
    torch.manual_seed(0)
    state = to_ldm_names(AutoencoderKL(block_out_channels=[32, 64], down_block_types=[D, D], up_block_types=[U, U],
                                       latent_channels=16, use_quant_conv=False, use_post_quant_conv=False).state_dict())
    state["decoder.conv_in.weight"] = state["decoder.conv_in.weight"].transpose(0, 1)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match=r"ae\.safetensors.*shape mismatches \(1\): decoder\.conv_in\.weight"):
        load_autoencoder(tmp_path / "ae.safetensors", device="cpu")


def test_messages_use_the_files_prefix_and_names(vq_file, tmp_path):
    state = {f"first_stage_model.{k}": v for k, v in load_file(vq_file).items() if k != "decoder.mid.attn_1.q.bias"}
    state["first_stage_model.encoder.down.1.block.0.conv2.bias"] = torch.zeros(7)
    save_file(state, tmp_path / "full.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): first_stage_model\.decoder\.mid\.attn_1\.q\.bias; "
                                              r"shape mismatches \(1\): first_stage_model\.encoder\.down\.1\.block\.0\.conv2\.bias"):
        load_vqmodel(tmp_path / "full.safetensors", device="cpu")


def test_folder_config_without_architecture_fields(vq_file, tmp_path):
    folder = tmp_path / "vqvae"
    folder.mkdir()
    state = VQModel.from_config({"block_out_channels": [32, 32, 64], "down_block_types": [D, D, AD],
                                 "up_block_types": [AU, U, U], "latent_channels": 4, "num_vq_embeddings": 16}).state_dict()
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text('{"_class_name": "VQModel", "scaling_factor": 1.0}')
    with pytest.raises(CheckpointError, match=r"vqvae/config\.json: \w+ \(not set; VQModel's default\) gives \w+ = .*"
                                              r"but the weights of .*vqvae say") as error:
        load_vqmodel(folder, device="cpu")
    assert "unexpected keys" not in str(error.value)


def test_kl_and_vq_autoencoders_in_one_file(vq_file, tmp_path):
    torch.manual_seed(1)
    kl = to_ldm_names(AutoencoderKL(block_out_channels=[32, 64], down_block_types=[D, D], up_block_types=[U, U]).state_dict())
    both = {**{f"vae.{k}": v.contiguous() for k, v in kl.items()}, **{f"vqvae.{k}": v for k, v in load_file(vq_file).items()}}
    save_file(both, tmp_path / "both.safetensors")
    with pytest.raises(CheckpointError, match=r"both\.safetensors: holds two autoencoders, a KL autoencoder under 'vae\.' "
                                              r"and a VQ autoencoder under 'vqvae\.'; load it with the VQ loader"):
        load_autoencoder(tmp_path / "both.safetensors", device="cpu")
    assert load_vqmodel(tmp_path / "both.safetensors", device="cpu").num_embeddings == 16  # the loader says which
    assert load_autoencoder_kl(tmp_path / "both.safetensors", device="cpu").config["latent_channels"] == 4


def test_pickle_under_a_safetensors_name(vq_file, tmp_path):
    torch.save(load_file(vq_file), tmp_path / "pickled.safetensors")
    with pytest.raises(CheckpointError, match=r"pickled\.safetensors: this is a pickle file \(torch\.save\), not safetensors"):
        load_vqmodel(tmp_path / "pickled.safetensors", device="cpu")
    (tmp_path / "pickled.safetensors").rename(tmp_path / "pickled.ckpt")
    assert load_vqmodel(tmp_path / "pickled.ckpt", device="cpu").num_embeddings == 16


def test_refusal_of_a_code_running_pickle_is_in_our_words_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"encoder.conv_in.weight": torch.zeros(1), "payload": CreatesMarkerFile(tmp_path / "marker")}, path)
    with pytest.raises(CheckpointError) as error:
        load_autoencoder(path, device="cpu")
    message = str(error.value)
    assert message.startswith(f"{path}: refused to load: the file may run code when loaded")
    for torch_words in ("weights_only", "likely succeed", "GLOBAL", "torch.serialization", "trust"):
        assert torch_words not in message
    assert error.value.__cause__ is None and error.value.__suppress_context__  # nor in the traceback


def test_not_a_torch_file_under_a_pickle_name(tmp_path):
    (tmp_path / "notes.ckpt").write_text("just some text, not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes\.ckpt: not a readable checkpoint .*neither like safetensors nor"):
        load_autoencoder(tmp_path / "notes.ckpt", device="cpu")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"gone\.safetensors: no such file"):
        load_vqmodel(tmp_path / "gone.safetensors", device="cpu")


# ------------------------------------------------------------------------------------------------------------------
# VQ-Diffusion: every component's weights are checked at load


@pytest.fixture(scope="module")
def vq_diffusion_names(demo_models):
    """{component folder: (weight file, a tensor name in it)} of the demo VQ-Diffusion folder."""
    folder = demo_models / "diffusers" / "vq-diffusion-demo"
    text = folder / "text_encoder" / "model.safetensors"
    return {"transformer": ("diffusion_pytorch_model.safetensors", "transformer_blocks.0.attn1.to_q.weight"),
            "text_encoder": ("model.safetensors", next(k for k in load_file(text) if k.endswith("layers.0.self_attn.q_proj.weight"))),
            "learned_classifier_free_sampling_embeddings": ("diffusion_pytorch_model.safetensors", "embeddings"),
            "vqvae": ("diffusion_pytorch_model.safetensors", "quantize.embedding.weight")}


@pytest.mark.parametrize("component", ["transformer", "text_encoder", "learned_classifier_free_sampling_embeddings",
                                       "vqvae"])
def test_non_finite_vq_diffusion_weight_is_named(demo_models, vq_diffusion_names, tmp_path, component):
    import shutil

    from vqcore.vq_diffusion import load_vq_diffusion

    folder = shutil.copytree(demo_models / "diffusers" / "vq-diffusion-demo", tmp_path / "damaged")
    file_name, key = vq_diffusion_names[component]
    state = load_file(folder / component / file_name)
    assert key in state
    state[key].view(-1)[5] = float("nan")
    save_file(state, folder / component / file_name)
    with pytest.raises(CheckpointError, match=rf"damaged/{component}: weight {re.escape(key)} holds 1 NaN"):
        load_vq_diffusion(folder, device="cpu")


def test_vq_diffusion_config_overrides_the_vqvae(demo_models):
    from vqcore.vq_diffusion import load_vq_diffusion

    folder = demo_models / "diffusers" / "vq-diffusion-demo"
    assert load_vq_diffusion(folder, device="cpu", config={"scaling_factor": 0.5}).vqvae.config["scaling_factor"] == 0.5
    with pytest.raises(CheckpointError, match=r"config=: latent_channels gives latent_channels = 7, but the weights of "
                                              r".*vq-diffusion-demo/vqvae say"):
        load_vq_diffusion(folder, device="cpu", config={"latent_channels": 7})
