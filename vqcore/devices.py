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


def supports_bf16(device: torch.device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return False  # bf16 on CPU/MPS runs, but slower than fp32 for convolutions


def resolve_dtype(dtype, device=None) -> torch.dtype:
    """Turns None/"auto"/"fp16"/"bf16"/"fp32" or a torch.dtype into a torch.dtype.

    "auto" means bf16 where the device computes it natively, fp32 otherwise.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if supports_bf16(device or default_device()) else torch.float32
    if dtype not in DTYPES:
        raise VQCoreError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]
