"""Reading weight files safely: safetensors, or torch pickles through `torch.load(weights_only=True)` only.

Every failure becomes a CheckpointError that names the file, so a damaged download or a file of the wrong kind is
reported as such instead of as a stack trace from deep inside torch.
"""

import json
import pickle
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# Training checkpoints wrap the weights: LDM/SD ".ckpt" in "state_dict", taming/VQ-Diffusion ".pth" in "model".
WRAPPER_KEYS = ("state_dict", "model", "module")


def is_safetensors(path: Path) -> bool:
    """Sniffs the header (8-byte little-endian length, then a JSON object) instead of trusting the file name."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return path.suffix in SAFETENSORS_SUFFIXES
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 2 <= header_len <= path.stat().st_size - 8


def read_raw(path, device="cpu"):
    """Returns the object stored in a weight file (usually a dict of tensors, possibly nested)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a weight file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    device = str(device)
    if is_safetensors(path):
        try:
            return load_file(path, device=device)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds objects other than tensors and plain containers, and "
            f"unpickling them could run code. Convert the file to safetensors with the tool that made it. ({e})"
        ) from e
    except (RuntimeError, EOFError, ValueError, OSError, UnicodeDecodeError, SafetensorError) as e:
        # torch.load hands files it does not recognise to safetensors, hence SafetensorError here too
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


def read_state_dict(path, device="cpu") -> dict:
    """Reads a single weight file into a flat {name: tensor} dict on `device`."""
    return unwrap_state_dict(read_raw(path, device), path)


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
                    try:
                        weight_map = json.loads(index.read_text())["weight_map"]
                    except (ValueError, KeyError) as e:
                        raise CheckpointError(f"{index}: not a valid shard index: {e}") from e
                    return [folder / shard for shard in sorted(set(weight_map.values()))]
    wanted = ", ".join(f"{s}{'.' + variant if variant else ''}.safetensors|.bin" for s in stems)
    raise CheckpointError(f"{folder}: no weight file found (looked for {wanted})")


def read_folder_state_dict(folder, stems=("diffusion_pytorch_model",), variant=None, device="cpu") -> dict:
    state = {}
    for file in find_weights(folder, stems, variant):
        state.update(read_state_dict(file, device))
    return state


def read_config(folder) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder}: no config.json; not a diffusers model folder") from e
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
