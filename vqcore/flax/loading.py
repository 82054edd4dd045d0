"""Loading a FlaxAutoencoderKL from every file vqcore.load_autoencoder_kl reads, through the same reading code.

    model, params = load_autoencoder_kl("ae.safetensors", dtype="bf16")

vqcore.loading.read_autoencoder finds the VAE, renames its keys to diffusers names and reads (or infers) the config,
exactly as for the torch model; the tensors are then converted to the Flax parameter tree, and no torch model is
built. The expected keys and shapes come from the Flax model itself (jax.eval_shape, nothing computed), so a file that
does not fit it gets the torch loader's CheckpointError, word for word.

Conversion of a diffusers-named tensor: the module path's list indices are joined to the names before them
(down_blocks.0 -> down_blocks_0); convolution weights (out, in, kh, kw) become kernels (kh, kw, in, out), linear
weights (out, in) become kernels (in, out), GroupNorm weights become scales, biases stay biases.
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import traverse_util

from ..autoencoder_kl import AutoencoderKL
from ..errors import CheckpointError, VQCoreError
from ..loading import check_finite, check_keys, read_autoencoder
from .autoencoder_kl import FlaxAutoencoderKL

DTYPE_NAMES = {"fp32": jnp.float32, "fp16": jnp.float16, "bf16": jnp.bfloat16}
# A Flax parameter name -> the torch parameter name, and the axis order that turns a torch tensor into it.
LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
TO_FLAX_AXES = {4: (2, 3, 1, 0), 2: (1, 0), 1: (0,)}


def load_autoencoder_kl(path, dtype=jnp.float32, family="auto", variant=None, config=None):
    """(FlaxAutoencoderKL, params) from a diffusers folder or a single file in any layout vqcore reads.

    `dtype` ("fp32", "fp16", "bf16" or a JAX floating dtype) is the compute dtype and the parameters' dtype.
    `family`, `variant` and `config` (and a config file beside a single file) as for vqcore.load_autoencoder_kl.
    """
    dtype = resolve_dtype(dtype)
    config, state, source, file_name = read_autoencoder(path, "cpu", family, variant, "AutoencoderKL", config)
    try:
        model = FlaxAutoencoderKL(**model_fields(config), dtype=dtype)
    except (VQCoreError, TypeError) as e:  # as the torch loader: channel counts no GroupNorm divides, ...
        raise CheckpointError(f"{source}: {e}") from e
    return model, params_from_state_dict(model, state, source, file_name)


def resolve_dtype(dtype):
    """A JAX floating dtype from vqcore's dtype names or anything jnp.dtype takes."""
    try:
        resolved = jnp.dtype(DTYPE_NAMES.get(dtype, dtype))
    except TypeError:
        resolved = None
    if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
        raise VQCoreError(f"dtype must be one of {', '.join(DTYPE_NAMES)} or a JAX floating dtype; got {dtype!r}")
    return resolved


def model_fields(config):
    """The FlaxAutoencoderKL fields of a diffusers AutoencoderKL config: the torch model's, lists as tuples."""
    return {key: tuple(value) if isinstance(value, list) else value
            for key, value in AutoencoderKL.config_kwargs(config).items()}


def parameter_layout(model):
    """{diffusers name: (Flax parameter path, torch shape)} for every parameter of the model, from shapes alone."""
    shapes = jax.eval_shape(model.init_weights, jax.random.key(0))
    layout = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        modules = [".".join(part.rsplit("_", 1)) if part.rsplit("_", 1)[-1].isdigit() else part for part in path[:-1]]
        torch_shape = tuple(leaf.shape[i] for i in np.argsort(TO_FLAX_AXES[len(leaf.shape)]))
        layout[".".join([*modules, LEAVES[path[-1]]])] = (path, torch_shape)
    return layout


def params_from_state_dict(model, state, source, file_name=str):
    """The Flax parameter tree of `model` (in its dtype) from a diffusers-named state dict of torch tensors; a
    CheckpointError naming `source` when the state dict does not fit the model or holds NaN or infinite values
    (also after rounding to the model's dtype), as from the torch loader."""
    layout = parameter_layout(model)
    check_keys({name: shape for name, (_, shape) in layout.items()}, state, "AutoencoderKL", source, file_name)
    # Rounded by torch first (float32 -> bfloat16/float16 rounds to nearest even there as in JAX), so that the torch
    # loader's finiteness check sees the same values; the rounded values pass exactly through float32 numpy arrays.
    rounded = {name: state[name].detach().to("cpu", getattr(torch, jnp.dtype(model.dtype).name)) for name in layout}
    check_finite(rounded, source, file_name, original=state)
    flat = {}
    for name, (path, _) in layout.items():
        tensor = rounded[name].to(torch.float32).numpy()  # numpy has no bfloat16
        flat[path] = jnp.asarray(tensor.transpose(TO_FLAX_AXES[tensor.ndim]), dtype=model.dtype)
    return traverse_util.unflatten_dict(flat)
