"""Loading a VQModel or AutoencoderKL from a diffusers folder or from a single weight file in any known layout.

    model = load_autoencoder("vae/sdxl_vae.safetensors", device="cuda", dtype="fp16", family="sdxl")
    model = load_vqmodel("vqgan.ckpt", config="vqgan.yaml")   # or config={"norm_num_groups": 8}

* Folder: `config.json` + `diffusion_pytorch_model[.<variant>].safetensors|.bin` (sharded too); a pipeline folder
  with a `vae/` or `vqvae/` component works as well.
* Single file (`.safetensors`, `.sft`, `.ckpt`, `.pt`, `.pth`, `.bin`): the VAE is found under any known prefix,
  its keys are renamed to diffusers names (vqcore.vae_layouts) and the architecture is read off the tensor shapes.
  A config file beside it with the same stem (`vqgan.yaml`, `vqgan.json`) is used as if passed as `config=`.
* `config=` (vqcore.vae_config): diffusers fields as a dict, a config.json or a taming/LDM YAML; it wins over
  what the shapes and the folder's config.json say, and is checked against the weights.

Loading is strict: a key the model lacks, a key the file lacks, a shape that differs, or a NaN/inf weight is a
CheckpointError naming the file and the keys as the file spells them. Tensors are read straight onto the target
device (safetensors lazily: only the VAE's tensors of a full checkpoint are read) and the model is built without
random initialisation.
"""

from pathlib import Path

import torch

from .autoencoder_kl import AutoencoderKL
from .checkpoint import read_config, read_folder_state_dict, read_state_dict
from .devices import resolve_device, resolve_dtype
from .errors import CheckpointError, VQCoreError
from .vae_config import DESCRIPTIONS, apply_overrides, folder_override, read_override, sidecar_override
from .vae_layouts import (
    apply_family,
    file_key_names,
    guess_kl_family,
    select_vae_keys,
    shape_config,
    to_diffusers_names,
    with_norm_defaults,
)
from .vq_model import VQModel

MODEL_CLASSES = {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}
CLASS_KINDS = {"VQModel": "vq", "AutoencoderKL": "kl"}
PIPELINE_COMPONENTS = ("vae", "vqvae")


def load_vqmodel(path, device=None, dtype=None, variant=None, config=None) -> VQModel:
    """A VQModel (taming VQGAN, MoVQ, VQ-Diffusion VQ-VAE, ...) from a folder or single file."""
    return _load(path, device, dtype, "auto", variant, config, expected="VQModel")


def load_autoencoder_kl(path, device=None, dtype=None, family="auto", variant=None, config=None) -> AutoencoderKL:
    """An AutoencoderKL (SD1/2/XL, SD3, Flux, ... VAEs) from a folder or single file.

    `family` (see vqcore.vae_layouts.KL_FAMILIES) sets the latent scaling constants that shapes cannot tell, over
    any config; "auto" keeps the config's (a folder's config.json, config=, a config file beside the weights), and
    otherwise guesses from the surrounding checkpoint keys, the file name, then the latent channel count
    (4 → sd1, 16 → flux).
    """
    return _load(path, device, dtype, family, variant, config, expected="AutoencoderKL")


def load_autoencoder(path, device=None, dtype=None, family="auto", variant=None, config=None):
    """Whichever autoencoder the path holds: VQModel or AutoencoderKL."""
    return _load(path, device, dtype, family, variant, config, expected=None)


def _load(path, device, dtype, family, variant, config, expected):
    device = resolve_device(device)
    dtype = torch.float32 if dtype is None else resolve_dtype(dtype, device)
    model_config, state, source, file_name = _read_autoencoder(path, device, family, variant, expected, config)
    return build_model(MODEL_CLASSES[model_config["_class_name"]], model_config, state, device, dtype, source, file_name)


def read_autoencoder(path, device="cpu", family="auto", variant=None, expected=None, config=None):
    """(config, state dict in diffusers names, source, file_name) of the autoencoder a folder or single file holds,
    without building a model; the torch loaders above and vqcore.flax both read through here. `expected` is a class name
    ("VQModel", "AutoencoderKL") or None for either; file_name(key) spells a diffusers key as the file does."""
    return _read_autoencoder(path, torch.device(device), family, variant, expected, config)


def _read_autoencoder(path, device, family, variant, expected, config):
    path = Path(path)
    kind = CLASS_KINDS.get(expected)
    if path.is_dir():
        source, state, file_name, folder_config = _read_folder(path, device, variant, kind)
        shapes = shape_config(state, source, file_name)
        model_config = dict(shapes)
        overrides = [folder_override(folder_config, source / "config.json", shapes["_class_name"])]
    else:
        source, (state, file_name, file_keys) = path, _read_single_file(path, device, kind)
        shapes = shape_config(state, source, file_name)
        guessed = guess_kl_family(shapes, path.name, file_keys) if shapes["_class_name"] == "AutoencoderKL" else None
        model_config = apply_family(shapes, guessed, source) if guessed else dict(shapes)
        sidecar = sidecar_override(path) if config is None else None  # config= replaces the file beside the weights
        overrides = [sidecar] if sidecar else []
    if config is not None:
        overrides.append(read_override(config))
    model_config = apply_overrides(model_config, shapes, overrides, source)
    model_config = with_norm_defaults(model_config, source)
    class_name = model_config["_class_name"]
    if expected and class_name != expected:
        raise CheckpointError(f"{source}: holds {DESCRIPTIONS[class_name]}, not {DESCRIPTIONS[expected]}")
    if family != "auto":
        model_config = apply_family(model_config, family, source)
    return model_config, state, source, file_name


def _read_folder(folder, device, variant, kind):
    """(component folder, VAE state in diffusers names, file_name, config.json) of a diffusers folder."""
    if not (folder / "config.json").is_file():
        component = next((folder / c for c in PIPELINE_COMPONENTS if (folder / c / "config.json").is_file()), None)
        if component is None:
            raise CheckpointError(f"{folder}: no config.json, and no {' or '.join(PIPELINE_COMPONENTS)}/ component folder")
        folder = component
    config = read_config(folder)
    # A shard holds any slice of the VAE, so the VAE's keys are picked from all shards together.
    state = read_folder_state_dict(folder, variant=variant, device=device)
    selected = select_vae_keys(state, folder, kind)
    state = to_diffusers_names({name: state[key] for key, name in selected.items()}, folder)
    return folder, state, file_key_names(selected), config


def _read_single_file(path, device, kind):
    """(VAE state in diffusers names, file_name, the names of all the file's tensors) of a single weight file."""
    file_keys, selected = [], {}

    def vae_keys(names):
        file_keys.extend(names)
        selected.update(select_vae_keys(names, path, kind))
        return list(selected)

    raw = read_state_dict(path, device, select=vae_keys)
    state = to_diffusers_names({selected[key]: tensor for key, tensor in raw.items()}, path)
    return state, file_key_names(selected), file_keys


def build_model(cls, config, state, device, dtype, source, file_name=str, config_source=None):
    """cls built from its config dict and loaded strictly with `state`; any problem is a CheckpointError naming
    `source` (a config that cannot be built: `config_source` when the config has a file of its own) and the tensors
    as file_name(key) spells them."""
    try:
        with torch.device("meta"):  # no random initialisation, no memory until the real tensors are assigned
            model = cls.from_config(config)
    except (VQCoreError, TypeError) as e:  # channel counts no GroupNorm divides; a field missing from the config
        raise CheckpointError(f"{config_source or source}: {e}") from e
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, cls.__name__, source, file_name)
    converted = {k: v.to(dtype) for k, v in state.items()}
    check_finite(converted, source, file_name, original=state)
    model.load_state_dict(converted, strict=True, assign=True)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise CheckpointError(f"{source}: no weights for {', '.join(map(file_name, left_on_meta))}")
    return model.to(device).eval().requires_grad_(False)


def check_keys(expected, state, class_name, source, file_name=str):
    """CheckpointError naming `source` unless `state` has exactly the keys of `expected` ({name: shape}), with those
    shapes, all floating point; keys as file_name(key) spells them."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{file_name(k)} (file {tuple(state[k].shape)}, model {expected[k]})"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    not_float = [f"{file_name(k)} ({state[k].dtype})" for k in sorted(state) if not state[k].is_floating_point()]
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:12])}{', ...' if len(items) > 12 else ''}"
        for label, items in (("missing keys", [file_name(k) for k in missing]),
                             ("unexpected keys", [file_name(k) for k in unexpected]),
                             ("shape mismatches", mismatched), ("not floating point", not_float))
        if items
    ]
    if problems:
        raise CheckpointError(f"{source}: the weights do not fit the {class_name} architecture: {'; '.join(problems)}")


def check_finite(state, source, file_name=str, original=None):
    """No NaN or inf in any tensor (one pass on the tensors' device, one synchronisation): a NaN weight would
    otherwise give NaN images. `original`: the tensors before a dtype conversion, to tell overflow from damage."""
    names = list(state)
    if not names:
        return
    finite = torch.stack([torch.isfinite(state[n]).all() for n in names]).cpu()
    if bool(finite.all()):
        return
    bad = [n for n, ok in zip(names, finite.tolist()) if not ok]
    first = state[bad[0]]
    counts = f"{int(first.isnan().sum())} NaN and {int(first.isinf().sum())} infinite of {first.numel()} values"
    if original is not None and bool(torch.isfinite(original[bad[0]]).all()):
        raise CheckpointError(f"{source}: weight {file_name(bad[0])} overflows {first.dtype} ({counts} after the "
                              f"conversion); load it in float32 or bfloat16")
    more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
    raise CheckpointError(f"{source}: weight {file_name(bad[0])} holds {counts}{more}; the file is damaged or was "
                          f"saved from a diverged training run")
