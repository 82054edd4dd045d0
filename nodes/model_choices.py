"""The entries of the loaders' model combos and the paths they stand for.

A loader lists the files of its own model folder by their plain names (as ComfyUI's loaders do) and other sources
with a folder tag: "checkpoints:sd15.safetensors" (VAE inside a full checkpoint), "diffusers:vq-diffusion-ithq"
(a diffusers model or pipeline folder). ":" cannot occur in a file name on Windows, so tags never collide with one.
"""

from pathlib import Path

from ..vqcore.checkpoint import read_json
from ..vqcore.errors import VQCoreError
from . import host

# What a diffusers folder holds → which loader lists it.
VQ, KL, VQ_DIFFUSION = "VQModel", "AutoencoderKL", "VQDiffusionPipeline"


def folder_kinds(path) -> set:
    """The loadable things in a diffusers folder: a model (config.json _class_name) or a pipeline's components."""
    path = Path(path)
    try:
        if (path / "model_index.json").is_file():
            index = read_json(path / "model_index.json")
            kinds = {VQ if name == "vqvae" else KL for name in ("vqvae", "vae") if name in index or (path / name).is_dir()}
            if index.get("_class_name") == VQ_DIFFUSION or {"transformer", "vqvae"} <= set(index):
                kinds.add(VQ_DIFFUSION)
            return kinds
        return {read_json(path / "config.json").get("_class_name")}
    except VQCoreError:
        return set()  # unreadable folders are not offered; loading them by name reports the real problem


def diffusers_entries(kind) -> list:
    return [f"diffusers:{name}" for name, path in host.diffusers_folders().items() if kind in folder_kinds(path)]


def vq_model_choices() -> list:
    return host.model_files("vq_models") + diffusers_entries(VQ)


def kl_choices() -> list:
    return host.model_files("vae") + [f"checkpoints:{f}" for f in host.model_files("checkpoints")] + diffusers_entries(KL)


def vq_diffusion_choices() -> list:
    return [entry.split(":", 1)[1] for entry in diffusers_entries(VQ_DIFFUSION)]


def resolve(choice: str, own_folder: str, input_name: str) -> str:
    """The file or folder path a combo entry stands for; a clear error naming the input when it is gone."""
    if not isinstance(choice, str) or not choice:
        raise VQCoreError(f"{input_name}: no model selected (got {choice!r})")
    folder, name = choice.split(":", 1) if ":" in choice else (own_folder, choice)
    if folder == "diffusers":
        return diffusers_path(name, input_name)
    return host.model_file_path(folder, name, input_name)


def diffusers_path(name: str, input_name: str) -> str:
    folders = host.diffusers_folders()
    if name not in folders:
        raise VQCoreError(f"{input_name}: diffusers folder {name!r} not found in the 'diffusers' model folders "
                          f"(found: {', '.join(folders) or 'none'})")
    return folders[name]
