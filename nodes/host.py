"""The one module that talks to ComfyUI: memory manager, progress bar, interrupt flag, model folders, comfy.sd.VAE.

Everything else in the pack calls the functions below. When ComfyUI is importable they forward to it; otherwise a
plain-torch stand-in does the same job (device chosen at run time, models read from a models folder), so the node
classes also run in scripts and tests. `bind()` swaps the modules in use, which is how tests put a recording fake
of the host in place.
"""

import logging
import os
from pathlib import Path

import torch

from ..vqcore import default_device
from ..vqcore.errors import VQCoreError

log = logging.getLogger("vqcore")

PT_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".sft"}
MODEL_FOLDERS = ("vq_models", "vae", "checkpoints", "diffusers")

mm = model_patcher = utils = folders = comfy_sd = cli_args = None  # bound by bind(); None = plain torch


def import_comfy() -> dict:
    """The ComfyUI modules this pack uses, or an empty dict outside ComfyUI."""
    try:
        import comfy.cli_args
        import comfy.model_management
        import comfy.model_patcher
        import comfy.utils
        import folder_paths
    except ImportError:
        return {}
    try:
        from comfy import sd
    except ImportError:  # comfy.sd pulls in torchvision; without it core VAE nodes are missing anyway
        sd = None
    return {"model_management": comfy.model_management, "model_patcher": comfy.model_patcher, "utils": comfy.utils,
            "folder_paths": folder_paths, "sd": sd, "cli_args": comfy.cli_args}


def bind(model_management=None, model_patcher=None, utils=None, folder_paths=None, sd=None, cli_args=None):
    """Selects the host modules; all None means plain torch. Registers our model folders with the new host."""
    g = globals()
    g.update(mm=model_management, model_patcher=model_patcher, utils=utils, comfy_sd=sd, cli_args=cli_args,
             folders=folder_paths if folder_paths is not None else PlainFolders())
    diffusers_folders_cache.clear()
    register_model_folders()


# ---- devices and memory ---------------------------------------------------------------------------------------------

def compute_device(role: str) -> torch.device:
    """role: "vae", "diffusion" or "text"; ComfyUI may place each on a different device (--cpu-vae, --gpu-only...)."""
    if mm is None:
        return default_device()
    return {"vae": mm.vae_device, "text": mm.text_encoder_device}.get(role, mm.get_torch_device)()


def offload_device(role: str) -> torch.device:
    if mm is None:
        return torch.device("cpu")
    return {"vae": mm.vae_offload_device, "text": mm.text_encoder_offload_device}.get(role, mm.unet_offload_device)()


def intermediate_device() -> torch.device:
    return torch.device("cpu") if mm is None else mm.intermediate_device()


def vae_auto_dtype(device):
    """ComfyUI's choice honours --fp16-vae/--bf16-vae/--fp32-vae; None lets vqcore decide."""
    return None if mm is None else mm.vae_dtype(device, [torch.bfloat16, torch.float32])


def free_memory_bytes(device) -> int:
    if mm is not None:
        return int(mm.get_free_memory(device))
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def is_oom(error: BaseException) -> bool:
    """Whether an exception means the device ran out of memory. ComfyUI 0.33+ decides with is_oom (device OOM also
    arrives as torch.AcceleratorError); older hosts raise OOM_EXCEPTION."""
    if mm is None:
        return isinstance(error, torch.OutOfMemoryError)
    if hasattr(mm, "is_oom"):
        return mm.is_oom(error)
    return isinstance(error, mm.OOM_EXCEPTION)


class HostedModel(torch.nn.Module):
    """The module handed to the memory manager: ComfyUI's ModelPatcher writes bookkeeping attributes onto the module
    it manages (`device`, `model_lowvram`, ...), and our models (and transformers') expose `device` as a read-only
    property, so the patcher manages this holder and the model sits inside it."""

    def __init__(self, wrapped: torch.nn.Module):
        super().__init__()
        self.wrapped = wrapped


class PlainPatcher:
    """Stand-in for ComfyUI's ModelPatcher: the same attributes, and loading is a plain `.to(device)`."""

    def __init__(self, model, load_device, offload_device):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device


def wrap_model(model: torch.nn.Module, role: str):
    """Hands a module to the host's memory manager (ModelPatcher in ComfyUI); it starts on the offload device.
    `unwrap(patcher)` gives the module back."""
    model.eval().requires_grad_(False)
    load, offload = compute_device(role), offload_device(role)
    if model_patcher is None:
        return PlainPatcher(HostedModel(model.to(load)), load, offload)
    return model_patcher.ModelPatcher(HostedModel(model.to(offload)), load_device=load, offload_device=offload)


def unwrap(patcher) -> torch.nn.Module:
    return patcher.model.wrapped


def load_models(patchers, memory_required: int = 0):
    """Makes room for and moves the models to their compute device before any compute.

    Full load: our layers are plain torch modules, which ComfyUI's partial (lowvram) loading would leave on the
    offload device and then fail with a device mismatch.
    """
    if mm is None:
        for p in patchers:
            p.model.to(p.load_device)
        return
    mm.load_models_gpu(list(patchers), memory_required=int(memory_required), force_full_load=True)


# ---- progress and interrupt -----------------------------------------------------------------------------------------

class PlainProgress:
    """Stand-in for comfy.utils.ProgressBar."""

    def __init__(self, total, node_id=None):
        self.total, self.current, self.node_id = total, 0, node_id

    def update_absolute(self, value, total=None, preview=None):
        self.total = total if total is not None else self.total
        self.current = min(value, self.total)

    def update(self, value):
        self.update_absolute(self.current + value)


def progress_bar(total: int, node_id=None):
    return PlainProgress(total, node_id) if utils is None else utils.ProgressBar(total, node_id=node_id)


def preview_max_size():
    """Largest edge of the sampler's previews, or None when there are to be none: the user's preview method is
    "none" (ComfyUI's default; core's samplers honour it too, and 0.33 sets it per prompt from the front end's
    setting), or there is no host to show them."""
    if cli_args is None:
        return None
    args = cli_args.args
    if args.preview_method == cli_args.LatentPreviewMethod.NoPreviews:
        return None
    return int(args.preview_size)


def interrupt_requested() -> bool:
    """Whether the user pressed Cancel (the should_cancel hook of vqcore's loops); False outside ComfyUI."""
    return mm is not None and bool(mm.processing_interrupted())


def throw_if_interrupted():
    """Raises the host's interrupt exception once the user pressed Cancel; a no-op outside ComfyUI."""
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


# ---- model folders --------------------------------------------------------------------------------------------------

class PlainFolders:
    """Stand-in for ComfyUI's folder_paths: <models dir>/<folder>/..., models dir from $VQCORE_MODELS_DIR or ./models."""

    supported_pt_extensions = PT_EXTENSIONS

    def __init__(self, models_dir=None):
        self.models_dir = str(models_dir or os.environ.get("VQCORE_MODELS_DIR") or Path.cwd() / "models")
        self.folder_names_and_paths = {}

    def add_model_folder_path(self, name, path, is_default=False):
        dirs = self.folder_names_and_paths.setdefault(name, ([], set()))[0]
        if path not in dirs:
            dirs.insert(0, path) if is_default else dirs.append(path)

    def get_folder_paths(self, name):
        return list(self.folder_names_and_paths.get(name, ([], set()))[0])

    def get_filename_list(self, name):
        dirs, exts = self.folder_names_and_paths.get(name, ([], set()))
        found = set()
        for d in dirs:
            for path in Path(d).rglob("*") if Path(d).is_dir() else ():
                if path.is_file() and (not exts or path.suffix.lower() in exts):
                    found.add(path.relative_to(d).as_posix())
        return sorted(found)

    def get_full_path(self, name, filename):
        for d in self.get_folder_paths(name):
            path = Path(d) / filename
            if path.is_file():
                return str(path)
        return None


def register_model_folders():
    """Makes sure every folder we read exists in the host's table; `vq_models` is ours and merges with user paths.

    A user's extra_model_paths.yaml may have created `vq_models` already (with no extensions): keep its folders,
    add the default one and the weight-file extensions.
    """
    table = folders.folder_names_and_paths
    for name in MODEL_FOLDERS:
        default = os.path.join(folders.models_dir, name)
        if name in table:
            folders.add_model_folder_path(name, default)
            dirs, exts = table[name]
            if name != "diffusers":
                table[name] = (dirs, set(exts) | set(folders.supported_pt_extensions))
        else:
            table[name] = ([default], set() if name == "diffusers" else set(folders.supported_pt_extensions))


def model_files(folder: str) -> list:
    return list(folders.get_filename_list(folder))


def model_file_path(folder: str, name: str, input_name: str) -> str:
    path = folders.get_full_path(folder, name)  # None unless it is a file (folder_paths and PlainFolders check)
    if path is None:
        raise VQCoreError(f"{input_name}: model file {name!r} not found in the {folder!r} model folders "
                          f"({', '.join(folders.get_folder_paths(folder)) or 'none registered'})")
    return path


def diffusers_folders() -> dict:
    """{relative name: absolute path} of every diffusers model folder (one holding model_index.json or config.json).

    Every loader's INPUT_TYPES asks, each time the front end refreshes its node list; the walk is done again only
    when a folder it went through changed (its mtime: an entry added, removed or renamed), as folder_paths caches
    its file lists."""
    roots = tuple(folders.get_folder_paths("diffusers"))
    cached = diffusers_folders_cache.get(roots)
    if cached is not None and all(mtime(d) == seen for d, seen in cached[1].items()):
        return dict(cached[0])
    found, walked = {}, {}
    for root in roots:
        walked[root] = mtime(root)
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            walked[dirpath] = mtime(dirpath)
            if "model_index.json" in filenames or "config.json" in filenames:
                found.setdefault(Path(os.path.relpath(dirpath, root)).as_posix(), dirpath)
                dirnames.clear()  # a pipeline's components are reached through the pipeline folder
    found = dict(sorted(found.items()))
    diffusers_folders_cache.clear()
    diffusers_folders_cache[roots] = (found, walked)
    return dict(found)


diffusers_folders_cache = {}  # {diffusers roots: (folders found, {folder walked: its mtime})}


def mtime(path):
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


# ---- ComfyUI's own VAE ----------------------------------------------------------------------------------------------

def comfy_vae(ldm_state_dict: dict, config: dict, dtype, scale: int, latent_channels: int, tiled_decode):
    """A real comfy.sd.VAE for an LDM-layout AutoencoderKL whose tiled decodes go to `tiled_decode`, or None outside
    ComfyUI."""
    if comfy_sd is None:
        return None
    vae = comfy_sd.VAE(sd=ldm_state_dict, config=config, dtype=dtype)
    vae.downscale_ratio = vae.upscale_ratio = scale
    vae.latent_channels = latent_channels
    route_tiled_decode(vae, tiled_decode)
    return vae


def route_tiled_decode(vae, tiled_decode):
    """Hands a comfy.sd.VAE's tiled decode to `tiled_decode`: ComfyUI 0.33+ sends VAE Decode (Tiled) and the retry
    after a full decode ran out of memory to `first_stage_model.decode_tiled(latents, tile_x=, tile_y=, overlap=, ...)`
    (latents on the VAE's device and dtype, tile sizes in latent cells; it expects the model's -1..1 output) when
    the VAE declares `handles_tiling`. Older hosts ignore both attributes and blend tiles themselves."""
    vae.handles_tiling = True
    vae.first_stage_model.decode_tiled = tiled_decode


bind(**import_comfy())
