"""Picking the compute device and dtype at run time, so the same code runs on CUDA, Apple MPS or CPU."""

import torch

from .errors import VQCoreError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device) -> torch.device:
    """None -> default_device(); a name or torch.device -> that device, which must exist on this machine."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise VQCoreError(f"device {device!r} is not a device name (such as 'cpu', 'cuda:0' or 'mps'); available "
                          f"here: {', '.join(available_devices())}") from e
    if not exists(resolved):
        raise VQCoreError(f"device {device!r} is not available on this machine; available: "
                          f"{', '.join(available_devices())}")
    return resolved


def exists(device: torch.device) -> bool:
    if device.type == "cpu":
        return device.index in (None, 0)
    if device.type == "mps":
        return device.index in (None, 0) and "mps" in available_devices()
    backend = getattr(torch, device.type, None)
    if not hasattr(backend, "is_available") or not backend.is_available():
        return False
    return device.index is None or device.index < backend.device_count()


def available_devices() -> list:
    """Names of the devices torch can compute on here: cpu, every CUDA (or ROCm) and XPU device, mps."""
    names = ["cpu"]
    for kind in ("cuda", "xpu"):
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            names += [f"{kind}:{i}" for i in range(backend.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


def supports_bf16(device: torch.device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return False  # bf16 on CPU/MPS runs, but slower than fp32 for convolutions


def resolve_dtype(dtype, device=None) -> torch.dtype:
    """Turns None/"auto"/"fp16"/"bf16"/"fp32" or a torch.dtype into a torch.dtype.

    None (every loader's default) means fp32, as in diffusers; "auto", asked for by name, means bf16 where the device
    computes it natively, fp32 otherwise.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return torch.bfloat16 if supports_bf16(device or default_device()) else torch.float32
    if dtype not in DTYPES:
        raise VQCoreError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]
