"""What crosses the autoencoders' public encode/decode methods besides shapes (autoencoder.check_input): the input's
dtype, and results with NaN/inf, traced to their cause instead of coming back as a black image."""

import torch

from .errors import NonFiniteResult, VQCoreError


def as_model_input(x, model, what):
    """Images or latents on the model's device, in its dtype (an fp16 image into an fp32 model is cast, as a
    pipeline would)."""
    return check_floating(x, what).to(model.device, model.dtype)


def check_floating(x, what):
    """Integer or bool images or latents are refused: the models take floats, images in [-1, 1]."""
    if not x.is_floating_point():
        hint = " (uint8 pixels p become p / 127.5 - 1)" if x.dtype == torch.uint8 else ""
        raise VQCoreError(f"{what} must be a floating-point tensor with values in [-1, 1]{hint}; got {x.dtype}")
    return x


def check_result(result, what, input_name, inputs, modules):
    """Raises NonFiniteResult when `result` holds NaN/inf, saying why: the first non-finite weight of the modules
    that computed it (by its diffusers name, e.g. decoder.conv_in.weight), else overflow of the dtype.
    The inputs are known to be finite (check_input). modules: {prefix: module}."""
    if torch.isfinite(result).all():
        return result
    for prefix, module in modules.items():
        if module is None:
            continue
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise NonFiniteResult(f"{what} produced NaN/inf from finite {input_name}: the model weight "
                                      f"{prefix}.{name} contains NaN/inf (a damaged checkpoint)")
    dtype = str(result.dtype).replace("torch.", "")
    largest = float(inputs.detach().abs().max()) if inputs.numel() else 0.0
    advice = ("load the model in float32" if result.dtype != torch.float32 and result.dtype != torch.float64
              else f"are the {input_name} on the scale this model expects?")
    raise NonFiniteResult(f"{what} produced NaN/inf from finite {input_name} (largest |value| {largest:.3g}) and "
                          f"finite weights: the computation overflowed {dtype}; {advice}")
