"""vqcore.flax.FlaxAutoencoderKL against vqcore's torch AutoencoderKL on its exact path (diffusers' bits, see
test_autoencoder_parity.py), both loaded from the same files: fp32 on CPU within ATOL, bf16 within BF16_BOUND of fp32,
and the torch loader's errors word for word for damaged files.

The optional-dependency tests at the top run everywhere; the rest skip where JAX or Flax is not installed.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vqcore.autoencoder import ACTIVATIONS
from vqcore.autoencoder_kl import AutoencoderKL
from vqcore.errors import CheckpointError, VQCoreError
from vqcore.loading import load_autoencoder_kl
from vqcore.vq_model import VQModel
from unsafe_pickle import CreatesMarkerFile

ROOT = Path(__file__).resolve().parents[1]
try:
    import flax.linen  # noqa: F401
    import jax

    HAS_JAX = True
except ImportError:
    HAS_JAX = False
needs_jax = pytest.mark.skipif(not HAS_JAX, reason="JAX/Flax not installed (pip install jax jaxlib flax); "
                                                   "vqcore.flax untested")
D, AD, U, AU = "DownEncoderBlock2D", "AttnDownEncoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"

ATOL = 1e-5  # max |Flax - torch| for every fp32 output
# bf16 compute (parameters, activations and convolution outputs rounded to 8 significant bits; GroupNorm statistics
# and softmax in fp32): max |bf16 - fp32| of every output, relative to the output's largest magnitude.
BF16_BOUND = 0.05


def test_jax_is_optional():
    """`import vqcore` does not import JAX; without JAX, jaxlib or Flax, importing vqcore.flax raises one VQCoreError
    naming the missing package. One fresh interpreter (imports are slow), the packages hidden in turn."""
    code = """if True:
        import sys, vqcore, vqcore.loading
        from vqcore.errors import VQCoreError
        print(sorted({"jax", "flax"} & set(sys.modules)))
        for missing in ("jax", "jaxlib", "flax"):
            sys.modules[missing] = None  # as if not installed
            try:
                import vqcore.flax
            except VQCoreError as e:
                print(e)
            for name in [n for n in sys.modules if n.split(".")[0] in ("jax", "jaxlib", "flax")]:
                del sys.modules[name]  # what the failed import left half-initialised
    """
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]"] + [
        f"vqcore.flax needs the optional package {missing!r}, which is not installed: pip install jax jaxlib flax"
        for missing in ("jax", "jaxlib", "flax")]


if HAS_JAX:
    import jax.numpy as jnp
    from ldm_layout import to_original_layout
    from test_autoencoder_parity import KL_CONFIGS, image, perturb

    import vqcore.flax
    from vqcore.flax import FlaxAutoencoderKL
    from vqcore.flax.autoencoder_kl import ACTIVATIONS as FLAX_ACTIVATIONS
    from vqcore.flax.loading import model_fields

    # The torch parity tests' KL configs, and what they leave out: three layers per level, GELU / Mish resnets,
    # a quant conv without a post-quant conv, attention in every level.
    CONFIGS = {
        **KL_CONFIGS,
        "kl_three_layers_gelu": dict(
            config=dict(block_out_channels=[16, 32], down_block_types=[D, D], up_block_types=[U, U],
                        layers_per_block=3, latent_channels=4, norm_num_groups=8, act_fn="gelu"),
            image=(2, 3, 12, 20),
        ),
        "kl_attention_everywhere_mish": dict(
            config=dict(block_out_channels=[16, 16, 32], down_block_types=[AD, AD, AD], up_block_types=[AU, AU, AU],
                        layers_per_block=1, latent_channels=2, norm_num_groups=4, act_fn="mish",
                        use_post_quant_conv=False),
            image=(1, 3, 16, 24),
        ),
    }
else:
    CONFIGS = {}


def save_diffusers_folder(config, folder, seed):
    """A perturbed random torch AutoencoderKL written as a diffusers folder (config.json + safetensors)."""
    torch.manual_seed(seed)
    model = perturb(AutoencoderKL(**config), seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **model.config}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "diffusion_pytorch_model.safetensors")
    return folder


def save_ldm_file(config, path, seed, prefix=""):
    """The same kind of model as one file in the original LDM layout (the tests' own key mapping), under `prefix`."""
    torch.manual_seed(seed)
    model = perturb(AutoencoderKL(**config), seed)
    state = {prefix + k: v for k, v in to_original_layout(model.state_dict()).items()}
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": {**state, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}}, path)
    return path


def max_diff(ours, reference):
    ours = np.asarray(ours, np.float32)
    reference = reference.numpy() if isinstance(reference, torch.Tensor) else np.asarray(reference, np.float32)
    assert ours.shape == reference.shape
    return float(np.abs(ours - reference).max())


def apply(model, method, params, x):
    return model.apply({"params": params}, x, method=method)


if HAS_JAX:
    # Compiled once per (model fields, method, input shape): equal models loaded in different tests share it.
    jitted_apply = jax.jit(apply, static_argnums=(0, 1))


def rbg_key(seed):
    """A key of JAX's "rbg" kind: XLA on CPU compiles the default (threefry) key's normal draw for seconds per shape.
    sample(key) maps any kind of key to noise the same way; the default kind is checked once, on the small model."""
    return jax.random.key(seed, impl="rbg")


def flax_call(model, params, method, x, jit=True):
    """model.apply with `method`, jitted by default (one compilation costs less than op-by-op dispatch)."""
    return (jitted_apply if jit else apply)(model, method, params, jnp.asarray(np.asarray(x)))


@torch.inference_mode()
def assert_flax_matches_torch(model, params, reference, x, key):
    """encode (posterior fields, kl, mode), a seeded sample and decode: Flax within ATOL of the torch exact path."""
    posterior = flax_call(model, params, FlaxAutoencoderKL.encode, x)
    ref_posterior = reference.encode(x)
    for field in ("mean", "logvar", "std", "var"):
        diff = max_diff(getattr(posterior, field), getattr(ref_posterior, field))
        assert diff <= ATOL, f"posterior {field}: max |diff| {diff:.3g} > {ATOL}"
    assert max_diff(posterior.kl(), ref_posterior.kl()) <= ATOL * float(ref_posterior.kl().abs().max()), "kl"
    assert max_diff(posterior.mode(), ref_posterior.mode()) <= ATOL, "mode"

    # The key's noise is jax.random.normal(key, NCHW latent shape); the same noise in the torch posterior's formula.
    sample = posterior.sample(key)
    noise = torch.from_numpy(np.array(jax.random.normal(key, posterior.mean.shape, jnp.float32)))
    ref_sample = ref_posterior.mean + ref_posterior.std * noise
    assert float(noise.std()) > 0.5 and not torch.equal(ref_sample, ref_posterior.mean)
    diff = max_diff(sample, ref_sample)
    assert diff <= ATOL, f"seeded sample: max |diff| {diff:.3g} > {ATOL}"

    decoded = flax_call(model, params, FlaxAutoencoderKL.decode, ref_sample)
    ref_decoded = reference.decode(ref_sample)
    assert decoded.shape == ref_decoded.shape == (x.shape[0], reference.config["out_channels"], *x.shape[2:])
    diff = max_diff(decoded, ref_decoded)
    assert diff <= ATOL, f"decode: max |diff| {diff:.3g} > {ATOL}"
    return posterior


@needs_jax
@pytest.mark.parametrize("layout", ["diffusers folder", "LDM file"])
@pytest.mark.parametrize("name", CONFIGS)
def test_flax_matches_torch(name, layout, tmp_path):
    """Every config from a diffusers folder and from an LDM single file (with the config as config=: the fields that
    shapes cannot tell, checked against the weights), both loaders on the same file."""
    case = CONFIGS[name]
    if layout == "diffusers folder":
        path, config = save_diffusers_folder(case["config"], tmp_path / "vae", seed=3), None
    else:
        path, config = save_ldm_file(case["config"], tmp_path / "vae.safetensors", seed=3), case["config"]
    reference = load_autoencoder_kl(path, device="cpu", dtype="fp32", config=config)
    model, params = vqcore.flax.load_autoencoder_kl(path, config=config)
    assert model.dtype == jnp.float32
    assert_flax_matches_torch(model, params, reference, image(case["image"], seed=4), key=rbg_key(5))


@needs_jax
@pytest.mark.parametrize("layout", ["vae.safetensors", "sd-full-checkpoint.ckpt", "ae.safetensors"])
def test_flax_matches_torch_from_single_files(layout, tmp_path):
    """Config read off the shapes: an LDM VAE file, the VAE inside a full SD checkpoint (pickle, first_stage_model.),
    and a Flux-style 16-channel file without quant convs (family flux guessed from the name)."""
    sd = dict(block_out_channels=[32, 64], down_block_types=[D, D], up_block_types=[U, U], layers_per_block=2,
              latent_channels=4)
    flux = dict(block_out_channels=[32, 32, 64], down_block_types=[D, D, D], up_block_types=[U, U, U],
                latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    config, prefix = {"vae.safetensors": (sd, ""), "sd-full-checkpoint.ckpt": (sd, "first_stage_model."),
                      "ae.safetensors": (flux, "")}[layout]
    path = save_ldm_file(config, tmp_path / layout, seed=6, prefix=prefix)
    reference = load_autoencoder_kl(path, device="cpu", dtype="fp32")
    model, params = vqcore.flax.load_autoencoder_kl(path)
    for field in ("latent_channels", "use_quant_conv", "scaling_factor", "shift_factor", "latents_mean", "latents_std"):
        assert getattr(model, field) == reference.config[field], field
    assert model.scaling_factor == (0.3611 if layout == "ae.safetensors" else 0.18215)
    assert_flax_matches_torch(model, params, reference, image((2, 3, 16, 24), seed=7), key=rbg_key(8))


@needs_jax
def test_config_file_beside_an_ldm_file_and_config_argument(tmp_path):
    """An LDM file with 8 GroupNorm groups (shapes cannot tell: the torch loader assumes 32 and refuses the widths),
    read through the YAML beside it or config=, as by the torch loader."""
    from test_single_file_loading import eight_group_kl, ldm_yaml, weights, write_yaml

    ref = eight_group_kl()
    path = tmp_path / "kl-f4-8g.safetensors"
    save_file(to_original_layout(weights(ref)), path)
    with pytest.raises(CheckpointError) as torch_error:
        load_autoencoder_kl(path, device="cpu")
    with pytest.raises(CheckpointError, match=r"kl-f4-8g\.safetensors: the widths \[24, 48\] are not multiples of 32") \
            as flax_error:
        vqcore.flax.load_autoencoder_kl(path)
    assert str(flax_error.value) == str(torch_error.value)

    yaml_file = write_yaml(tmp_path / "kl-f4-8g.yaml", ldm_yaml(ref, kl=True, norm_num_groups=8))
    model, params = vqcore.flax.load_autoencoder_kl(path)
    assert (model.norm_num_groups, model.sample_size) == (8, 64)
    assert_flax_matches_torch(model, params, load_autoencoder_kl(path, device="cpu"), image((1, 3, 12, 16), seed=16),
                              key=rbg_key(17))
    yaml_file.rename(tmp_path / "elsewhere.yaml")
    for config in ({"norm_num_groups": 8}, tmp_path / "elsewhere.yaml"):
        other, other_params = vqcore.flax.load_autoencoder_kl(path, config=config)
        assert other.norm_num_groups == 8 and other.block_out_channels == model.block_out_channels
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), other_params, params))


@needs_jax
@pytest.mark.parametrize("name", ["kl_sd_like", "kl_16ch_no_quant_convs", "kl_level_attention_no_mid"])
def test_bf16_compute_stays_near_fp32(name, tmp_path):
    case = CONFIGS[name]
    folder = save_diffusers_folder(case["config"], tmp_path, seed=11)
    model, params = vqcore.flax.load_autoencoder_kl(folder)
    half, half_params = vqcore.flax.load_autoencoder_kl(folder, dtype="bf16")
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(half_params)} == {jnp.dtype(jnp.bfloat16)}
    x = image(case["image"], seed=12).numpy()
    posterior = flax_call(model, params, FlaxAutoencoderKL.encode, x)
    half_posterior = flax_call(half, half_params, FlaxAutoencoderKL.encode, x)
    z = posterior.mean
    decoded = flax_call(model, params, FlaxAutoencoderKL.decode, z)
    half_decoded = flax_call(half, half_params, FlaxAutoencoderKL.decode, z)
    assert half_posterior.mean.dtype == half_decoded.dtype == jnp.bfloat16
    for what, ours, full in (("mean", half_posterior.mean, posterior.mean),
                             ("logvar", half_posterior.logvar, posterior.logvar), ("decode", half_decoded, decoded)):
        scale = float(jnp.abs(full).max())
        relative = max_diff(ours, full) / scale
        print(f"bf16 {name} {what}: max |bf16 - fp32| / max |fp32| = {relative:.3g}")  # shown by pytest -rP
        assert relative <= BF16_BOUND, f"bf16 {what}: max |bf16 - fp32| {relative:.3g} of the output scale"
        assert relative > 0, f"bf16 {what} equals fp32: not computed in bf16?"


# A small model for what is checked once: random init, eager (op-by-op) calls; attention in a level and the mid block.
TINY = dict(block_out_channels=[8, 16], down_block_types=[AD, D], up_block_types=[U, AU], layers_per_block=1,
            latent_channels=2, norm_num_groups=4)


@needs_jax
def test_random_init_direct_construction_and_eager_calls():
    """The seed API without a file: init_weights(rng) gives the parameters the loader would fill, in the torch
    model's shapes; with the torch model's weights both agree; eager calls equal jitted ones."""
    model = FlaxAutoencoderKL(**model_fields(TINY))
    params = model.init_weights(rbg_key(0))
    torch.manual_seed(0)
    reference = perturb(AutoencoderKL(**TINY), seed=0).eval()
    layout = vqcore.flax.loading.parameter_layout(model)
    assert {name: shape for name, (_, shape) in layout.items()} == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()}
    flat = jax.tree_util.tree_leaves(params)
    assert len(flat) == len(layout) and all(float(jnp.abs(leaf).sum()) > 0 for leaf in flat if leaf.ndim > 1)

    params = vqcore.flax.params_from_state_dict(model, reference.state_dict(), "random weights")
    x = image((2, 3, 8, 12), seed=13)
    posterior = assert_flax_matches_torch(model, params, reference, x, key=jax.random.key(14))  # the default kind
    eager = flax_call(model, params, FlaxAutoencoderKL.encode, x, jit=False)
    assert max_diff(eager.mean, posterior.mean) <= ATOL and max_diff(eager.logvar, posterior.logvar) <= ATOL
    z = posterior.sample(jax.random.key(14))
    assert max_diff(flax_call(model, params, FlaxAutoencoderKL.decode, z, jit=False),
                    flax_call(model, params, FlaxAutoencoderKL.decode, z)) <= ATOL
    reconstruction = model.apply({"params": params}, jnp.asarray(x.numpy()))  # __call__: decode(mode), eager
    assert max_diff(reconstruction, flax_call(model, params, FlaxAutoencoderKL.decode, posterior.mode())) <= ATOL


@needs_jax
def test_activations_match_torch():
    x = torch.linspace(-6, 6, 101)
    assert set(FLAX_ACTIVATIONS) == set(ACTIVATIONS)
    for name, torch_act in ACTIVATIONS.items():
        assert max_diff(FLAX_ACTIVATIONS[name](jnp.asarray(x.numpy())), torch_act(x.clone())) <= 1e-6, name


@needs_jax
def test_latent_scaling_follows_the_torch_model():
    z = np.linspace(-2, 2, 16, dtype=np.float32).reshape(1, 2, 2, 4)
    for constants in (dict(scaling_factor=0.5), dict(scaling_factor=0.5, shift_factor=0.25),
                      dict(scaling_factor=0.5, latents_mean=[1.0, 2.0], latents_std=[2.0, 4.0])):
        reference = AutoencoderKL(latent_channels=2, **constants)
        model = FlaxAutoencoderKL(latent_channels=2, **model_fields(constants))
        assert max_diff(model.scale_latents(jnp.asarray(z)), reference.scale_latents(torch.from_numpy(z))) <= 1e-6
        assert max_diff(model.unscale_latents(jnp.asarray(z)), reference.unscale_latents(torch.from_numpy(z))) <= 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Bad input: the torch loader's errors, word for word


GOOD_KL = dict(block_out_channels=[32, 64], down_block_types=[D, D], up_block_types=[U, U], latent_channels=4)


def rewrite(good, path, change):
    from safetensors.torch import load_file

    save_file(change(load_file(good)), path)
    return path


def damaged(kind, good, folder):
    """A damaged or wrong file of the given kind, written into folder."""
    if kind == "truncated":
        (folder / "truncated.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        return folder / "truncated.safetensors"
    if kind == "zeros":
        (folder / "zeros.safetensors").write_bytes(bytes(4096))
        return folder / "zeros.safetensors"
    if kind == "no such file":
        return folder / "missing.safetensors"
    if kind == "folder without config":
        (folder / "empty").mkdir()
        return folder / "empty"
    if kind == "missing key":
        return rewrite(good, folder / "missing-key.safetensors",
                       lambda s: {k: v for k, v in s.items() if k != "decoder.up.0.block.1.conv2.bias"})
    if kind == "extra key":
        return rewrite(good, folder / "extra.safetensors",
                       lambda s: {**s, "encoder.down.0.block.0.time_emb_proj.weight": torch.zeros(32, 8)})
    if kind == "shape mismatch":
        return rewrite(good, folder / "shapes.safetensors", lambda s: {**s, "post_quant_conv.bias": torch.zeros(5)})
    if kind in ("NaN weight", "infinite weight"):
        key, value = {"NaN weight": ("decoder.up.1.block.0.conv1.weight", float("nan")),
                      "infinite weight": ("encoder.mid.attn_1.q.weight", float("inf"))}[kind]
        return rewrite(good, folder / "non-finite.safetensors",
                       lambda s: {**s, key: s[key].flatten().index_fill(0, torch.tensor([3]), value).view(s[key].shape)})
    if kind == "integer weights":
        return rewrite(good, folder / "int.safetensors",
                       lambda s: {**s, "encoder.conv_in.weight": s["encoder.conv_in.weight"].to(torch.int32)})
    if kind == "channels no GroupNorm divides":
        return rewrite(good, folder / "narrow.safetensors", lambda s: {
            k: v[:24] if k.startswith("encoder.down.0.block.0.conv1.") else v for k, v in s.items()})
    if kind == "text encoder":
        save_file({"embeddings.token_embedding.weight": torch.randn(10, 8), "encoder.layers.0.mlp.fc1.weight":
                   torch.randn(16, 8)}, folder / "clip_l.safetensors")
        return folder / "clip_l.safetensors"
    if kind == "VQ model":
        torch.manual_seed(0)
        vq = VQModel(block_out_channels=[32], latent_channels=4, num_vq_embeddings=16)
        save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, folder / "vq.safetensors")
        return folder / "vq.safetensors"
    raise AssertionError(kind)


DAMAGE = ["truncated", "zeros", "no such file", "folder without config", "missing key", "extra key", "shape mismatch",
          "NaN weight", "infinite weight", "integer weights", "channels no GroupNorm divides", "text encoder",
          "VQ model"]


@needs_jax
@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_files_give_the_torch_loaders_error(kind, tmp_path):
    good = save_ldm_file(GOOD_KL, tmp_path / "good.safetensors", seed=15)
    path = damaged(kind, good, tmp_path)
    with pytest.raises(CheckpointError) as torch_error:
        load_autoencoder_kl(path, device="cpu")
    with pytest.raises(CheckpointError) as flax_error:
        vqcore.flax.load_autoencoder_kl(path)
    assert str(flax_error.value) == str(torch_error.value)
    assert path.name in str(flax_error.value)
    assert vqcore.flax.load_autoencoder_kl(good)[0].latent_channels == 4  # nothing else broke


@needs_jax
def test_weight_that_overflows_half_precision_is_named(tmp_path):
    good = save_ldm_file(GOOD_KL, tmp_path / "good.safetensors", seed=15)
    path = rewrite(good, tmp_path / "large.safetensors", lambda s: {**s, "post_quant_conv.bias": torch.full((4,), 1e6)})
    assert float(vqcore.flax.load_autoencoder_kl(path)[1]["post_quant_conv"]["bias"].max()) == 1e6
    with pytest.raises(CheckpointError) as torch_error:
        load_autoencoder_kl(path, device="cpu", dtype="fp16")
    with pytest.raises(CheckpointError) as flax_error:
        vqcore.flax.load_autoencoder_kl(path, dtype="fp16")
    assert str(flax_error.value) == str(torch_error.value)
    assert "large.safetensors: weight post_quant_conv.bias overflows torch.float16" in str(flax_error.value)


@needs_jax
def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "payload": CreatesMarkerFile(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused"):
        vqcore.flax.load_autoencoder_kl(path)
    assert not marker.exists()


@pytest.fixture(scope="module")
def good_model():
    torch.manual_seed(0)
    model = FlaxAutoencoderKL(**model_fields(GOOD_KL))
    return model, vqcore.flax.params_from_state_dict(model, AutoencoderKL(**GOOD_KL).state_dict(), "random weights")


@needs_jax
@pytest.mark.parametrize("images, message", [
    (np.zeros((1, 4, 16, 16)), "FlaxAutoencoderKL.encode images must be a (batch, 3, height, width) tensor; got (1, 4, 16, 16)"),
    (np.zeros((1, 3, 17, 16)), "FlaxAutoencoderKL.encode images height and width must be multiples of 2; got 17x16"),
    (np.full((1, 3, 16, 16), np.nan), "FlaxAutoencoderKL.encode images of shape (1, 3, 16, 16) contains NaN"),
], ids=["channels", "size", "NaN"])
def test_bad_images_are_named(images, message, good_model):
    model, params = good_model
    with pytest.raises(VQCoreError) as error:
        flax_call(model, params, FlaxAutoencoderKL.encode, images, jit=False)  # NaN: only seen outside jit
    assert str(error.value).startswith(message)
    with pytest.raises(VQCoreError, match=r"decode latents must be a \(batch, 4, height, width\) tensor"):
        flax_call(model, params, FlaxAutoencoderKL.decode, np.zeros((1, 16, 4, 4)))


@needs_jax
def test_config_errors_and_dtype_names():
    with pytest.raises(VQCoreError, match="multiples of norm_num_groups=32"):
        FlaxAutoencoderKL(block_out_channels=(24,))
    with pytest.raises(VQCoreError, match="unsupported block type"):
        FlaxAutoencoderKL(down_block_types=("CrossAttnDownBlock2D",))
    with pytest.raises(VQCoreError, match="act_fn 'tanh' is not supported"):
        FlaxAutoencoderKL(act_fn="tanh")
    with pytest.raises(VQCoreError, match=r"dtype must be one of fp32, fp16, bf16 or a JAX floating dtype; got 'int8'"):
        vqcore.flax.load_autoencoder_kl("unused", dtype="int8")
