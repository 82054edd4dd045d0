"""Reading files: weights (safetensors, or torch pickles through `torch.load(weights_only=True)` only), JSON and YAML.

Every failure becomes a CheckpointError that names the file, so a damaged download or a file of the wrong kind is
reported as such instead of as a stack trace from deep inside torch. All of vqcore's file reading goes through here.
"""

import json
import pickle
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# Training checkpoints wrap the weights: LDM/SD ".ckpt" in "state_dict", taming/VQ-Diffusion ".pth" in "model".
WRAPPER_KEYS = ("state_dict", "model", "module")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
PICKLE_PROTOCOLS = range(2, 6)  # legacy torch.save: a bare pickle stream, b"\x80" then the protocol number


def weight_file(path) -> Path:
    """The path of an existing, non-empty weight file; the one place that checks."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a weight file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    return path


def file_format(path: Path) -> str:
    """"safetensors", "pickle" or "unknown", from the first bytes instead of the file name."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(ZIP_MAGIC) or (len(head) >= 2 and head[0] == 0x80 and head[1] in PICKLE_PROTOCOLS):
        return "pickle"
    if len(head) == 9:
        (header_len,) = struct.unpack("<Q", head[:8])  # safetensors: 8-byte little-endian length, then JSON
        if head[8:9] == b"{" and 2 <= header_len <= path.stat().st_size - 8:
            return "safetensors"
    return "unknown"


def read_state_dict(path, device="cpu", select=None) -> dict:
    """A weight file's tensors as a flat {name: tensor} dict on `device`.

    `select(names) -> names` picks which tensors to read from all the file's names (which it thereby also sees): a
    safetensors file is opened lazily and reads only those (the VAE of a full checkpoint, not its UNet); a pickle is
    parsed whole on the CPU and only the selected tensors are moved.
    """
    path = weight_file(path)
    kind = file_format(path)
    if kind == "safetensors":
        return _read_safetensors(path, device, select)
    if kind == "unknown":
        what = "safetensors file" if path.suffix.lower() in SAFETENSORS_SUFFIXES else "checkpoint"
        raise CheckpointError(f"{path}: not a readable {what} (truncated, corrupt or not a weight file): it starts "
                              f"neither like safetensors nor like a torch.save pickle")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        # A safetensors name promises a file that cannot run code; a pickle under that name is not opened.
        raise CheckpointError(f"{path}: this is a pickle file (torch.save), not safetensors. Convert it to "
                              f"safetensors, or give it a .ckpt/.pt name if you trust its source.")
    state = unwrap_state_dict(_read_pickle(path), path)
    names = list(state) if select is None else select(list(state))
    return {name: state[name].to(device) for name in names}


def _read_safetensors(path, device, select):
    try:
        with safe_open(str(path), framework="pt", device=_safetensors_device(device)) as f:
            names = list(f.keys())
            return {name: f.get_tensor(name) for name in (names if select is None else select(names))}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def _safetensors_device(device):
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _read_pickle(path):
    try:
        # An open file, not the path: torch.load hands paths with a safetensors-like name to safetensors.
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own text advises loading with weights_only=False, the one thing to avoid with this file.
        raise CheckpointError(
            f"{path}: refused to load: the file may run code when loaded (it is a pickle holding Python objects "
            f"other than tensors and plain containers). Use a safetensors version of the model, or convert the file "
            f"to safetensors with the tool that made it."
        ) from None
    except Exception as e:  # a damaged pickle fails in many ways (struct.error, EOFError, RuntimeError, ...)
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, corrupt or not a weight file): {e}") from e


def unwrap_state_dict(obj, path):
    """Finds the flat name→tensor dict inside the common checkpoint wrappers."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None and len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
            inner = next(iter(obj.values()))
        if inner is None:
            break
        obj = inner
    if isinstance(obj, torch.Tensor):
        raise CheckpointError(f"{path}: holds a single tensor {tuple(obj.shape)}, not named weights; not a model weight file")
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no tensors (found {type(obj).__name__}); not a model weight file")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def find_weights(folder, stems=("diffusion_pytorch_model",), variant=None) -> list:
    """The weight files of a diffusers-style component folder, as a list (several for sharded checkpoints).

    Without a variant, full-precision files are preferred and an fp16 variant is used when it is all there is
    (microsoft/vq-diffusion-ithq ships fp32 only as .bin and fp16 only as .safetensors).
    """
    folder = Path(folder)
    variants = [variant] if variant else [None, "fp16"]
    for var in variants:
        for stem in stems:
            name = f"{stem}.{var}" if var else stem
            for suffix in (".safetensors", ".bin"):
                single = folder / f"{name}{suffix}"
                if single.is_file():
                    return [single]
                # diffusers and transformers put the variant after ".index": x.safetensors.index.fp16.json
                index = folder / f"{stem}{suffix}.index{'.' + var if var else ''}.json"
                if index.is_file():
                    weight_map = read_json(index).get("weight_map")
                    if not isinstance(weight_map, dict):
                        raise CheckpointError(f"{index}: not a valid shard index: no weight_map")
                    return [folder / shard for shard in sorted(set(weight_map.values()))]
    wanted = ", ".join(f"{s}{'.' + variant if variant else ''}.safetensors|.bin" for s in stems)
    raise CheckpointError(f"{folder}: no weight file found (looked for {wanted})")


def read_folder_state_dict(folder, stems=("diffusion_pytorch_model",), variant=None, device="cpu") -> dict:
    state = {}
    for file in find_weights(folder, stems, variant):
        state.update(read_state_dict(file, device))
    return state


def read_json(path) -> dict:
    """A JSON file holding an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no such file") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}, not an object of fields")
    return data


def read_yaml(path) -> dict:
    """A YAML file holding a mapping (taming / LDM model configs). PyYAML comes with transformers, which requires
    it, so it is no extra dependency."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no such file") from e
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a YAML {type(data).__name__}, not a mapping of fields")
    return data


def read_config(folder) -> dict:
    """A diffusers component folder's config.json."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json; not a diffusers model folder")
    return read_json(path)
