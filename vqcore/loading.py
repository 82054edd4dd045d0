"""Loading a VQModel or AutoencoderKL from a diffusers folder or from a single weight file in any known layout.

    model = load_autoencoder("vae/sdxl_vae.safetensors", device="cuda", dtype="fp16", family="sdxl")

* Folder: `config.json` + `diffusion_pytorch_model[.<variant>].safetensors|.bin` (sharded too); a pipeline folder
  with a `vae/` or `vqvae/` component works as well. The config is used as written.
* Single file (`.safetensors`, `.sft`, `.ckpt`, `.pt`, `.pth`, `.bin`): the VAE is found under any known prefix,
  its keys are renamed to diffusers names (vqcore.vae_layouts) and the architecture is read off the tensor shapes.

Loading is strict: a key the model lacks, a key the file lacks, or a shape that differs is a CheckpointError naming
the file and the keys. Tensors are read straight onto the target device (safetensors are opened lazily, so only
the VAE's tensors of a full checkpoint are read) and the model is built without random initialisation.
"""

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .autoencoder_kl import AutoencoderKL
from .checkpoint import is_safetensors, read_config, read_folder_state_dict, read_state_dict
from .devices import default_device, resolve_dtype
from .errors import CheckpointError, VQCoreError
from .vae_layouts import (
    apply_family,
    guess_kl_family,
    infer_config,
    model_kind,
    select_vae_keys,
    to_diffusers_names,
)
from .vq_model import VQModel

MODEL_CLASSES = {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}
KIND_CLASS_NAMES = {"vq": "VQModel", "kl": "AutoencoderKL"}
DESCRIPTIONS = {"VQModel": "a VQ autoencoder (VQModel)", "AutoencoderKL": "a KL autoencoder (AutoencoderKL)"}
PIPELINE_COMPONENTS = ("vae", "vqvae")


def load_vqmodel(path, device=None, dtype=None, variant=None) -> VQModel:
    """A VQModel (taming VQGAN, MoVQ, VQ-Diffusion VQ-VAE, ...) from a folder or single file."""
    return _load(path, device, dtype, "auto", variant, expected="VQModel")


def load_autoencoder_kl(path, device=None, dtype=None, family="auto", variant=None) -> AutoencoderKL:
    """An AutoencoderKL (SD1/2/XL, SD3, Flux, ... VAEs) from a folder or single file.

    `family` (see vqcore.vae_layouts.KL_FAMILIES) sets the latent scaling constants that shapes cannot tell;
    "auto" keeps a folder's config.json, and for single files guesses from the surrounding checkpoint keys, the
    file name, then the latent channel count (4 → sd1, 16 → flux).
    """
    return _load(path, device, dtype, family, variant, expected="AutoencoderKL")


def load_autoencoder(path, device=None, dtype=None, family="auto", variant=None):
    """Whichever autoencoder the path holds: VQModel or AutoencoderKL."""
    return _load(path, device, dtype, family, variant, expected=None)


def _load(path, device, dtype, family, variant, expected):
    device = torch.device(device) if device is not None else default_device()
    dtype = torch.float32 if dtype is None else resolve_dtype(dtype, device)
    config, state, source = read_autoencoder(path, device, family, variant, expected)
    return build_model(MODEL_CLASSES[config["_class_name"]], config, state, device, dtype, source)


def read_autoencoder(path, device="cpu", family="auto", variant=None, expected=None):
    """(config, state dict in diffusers names, source) of the autoencoder a folder or single file holds, without
    building a model; the torch loaders above and vqcore.flax both read through here. `expected` is a class name
    ("VQModel", "AutoencoderKL") or None for either."""
    path = Path(path)
    device = torch.device(device)
    if path.is_dir():
        config, state, source = _read_folder(path, device, variant)
    else:
        config, state, source = _read_single_file(path, device)
    class_name = config["_class_name"]
    if expected and class_name != expected:
        raise CheckpointError(f"{source}: holds {DESCRIPTIONS[class_name]}, not {DESCRIPTIONS[expected]}")
    if family != "auto":
        config = apply_family(config, family, source)
    return config, state, source


def _read_folder(folder, device, variant):
    if not (folder / "config.json").is_file():
        component = next((folder / c for c in PIPELINE_COMPONENTS if (folder / c / "config.json").is_file()), None)
        if component is None:
            raise CheckpointError(f"{folder}: no config.json, and no {' or '.join(PIPELINE_COMPONENTS)}/ component folder")
        folder = component
    config = read_config(folder)
    # A shard holds any slice of the VAE, so the VAE's keys are picked from all shards together.
    state = read_folder_state_dict(folder, variant=variant)
    state = to_diffusers_names({name: state[key].to(device) for key, name in select_vae_keys(state, folder).items()},
                               folder)
    class_name = config.get("_class_name")
    if class_name not in MODEL_CLASSES:
        class_name = KIND_CLASS_NAMES[model_kind(state)]
    return {**config, "_class_name": class_name}, state, folder


def _read_single_file(path, device):
    raw, all_keys = _read_vae_tensors(path, device)
    state = to_diffusers_names(raw, path)
    config = infer_config(state, path)
    if config["_class_name"] == "AutoencoderKL":
        family = guess_kl_family(config, path.name, all_keys)
        if family:
            config = apply_family(config, family, path)
    return config, state, path


def _read_vae_tensors(path, device):
    """The VAE's tensors of one file ({name without its prefix: tensor}, on `device`) and the names of all tensors in
    the file."""
    path = Path(path)
    if path.is_file() and path.stat().st_size > 0 and is_safetensors(path):
        try:
            with safe_open(str(path), framework="pt", device=_safetensors_device(device)) as f:
                keys = list(f.keys())
                return {name: f.get_tensor(key) for key, name in select_vae_keys(keys, path).items()}, keys
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    # Pickles must be parsed whole; parse on the CPU and move only the selected tensors.
    state = read_state_dict(path, "cpu")
    return {name: state[key].to(device) for key, name in select_vae_keys(state, path).items()}, list(state)


def _safetensors_device(device):
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def build_model(cls, config, state, device, dtype, source):
    """cls built from its config dict and loaded strictly with `state`; any problem is a CheckpointError naming
    `source`."""
    try:
        with torch.device("meta"):  # no random initialisation, no memory until the real tensors are assigned
            model = cls.from_config(config)
    except (VQCoreError, TypeError) as e:  # channel counts no GroupNorm divides; a field missing from the config
        raise CheckpointError(f"{source}: {e}") from e
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, cls.__name__, source)
    state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise CheckpointError(f"{source}: no weights for {', '.join(left_on_meta)}")
    return model.to(device).eval().requires_grad_(False)


def check_keys(expected, state, class_name, source):
    """CheckpointError naming `source` unless `state` has exactly the keys of `expected` ({name: shape}), with those
    shapes, all floating point."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k} (file {tuple(state[k].shape)}, model {expected[k]})"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    not_float = [f"{k} ({state[k].dtype})" for k in sorted(state) if not state[k].is_floating_point()]
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:12])}{', ...' if len(items) > 12 else ''}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched),
                             ("not floating point", not_float))
        if items
    ]
    if problems:
        raise CheckpointError(f"{source}: the weights do not fit the {class_name} architecture: {'; '.join(problems)}")
