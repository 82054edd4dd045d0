"""Building blocks of vqcore's autoencoders against their plain definitions."""

import pytest
import torch
import torch.nn.functional as F

from vqcore import autoencoder
from vqcore.autoencoder import GroupNorm, Upsample


@pytest.mark.parametrize("shape", [(1, 4, 5, 7), (3, 6, 8, 2), (2, 3, 1, 1)])
def test_upsample_equals_nearest_upsampling_then_its_convolution(shape):
    """Upsample's fast path computes the 3x3 convolution of the nearest-upsampled map as one transposed convolution of
    the input; in float64 it must agree with the plain definition to rounding (odd, tiny and non-square sizes)."""
    torch.manual_seed(0)
    upsample = Upsample(shape[1]).double()
    upsample.fast = True
    x = torch.randn(shape, dtype=torch.float64)
    plain = upsample.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    for layout in (torch.contiguous_format, torch.channels_last):
        out = upsample(x.contiguous(memory_format=layout))
        assert out.shape == plain.shape
        assert (out - plain).abs().max().item() <= 1e-12


@pytest.mark.parametrize("shape, groups", [((1, 32, 16, 16), 32), ((3, 64, 7, 5), 8), ((2, 96, 33, 1), 32)])
@pytest.mark.parametrize("in_place", [False, True])
def test_fast_group_norm_is_as_accurate_as_torchs_on_contiguous_maps(shape, groups, in_place):
    """The fast path's GroupNorm on channels-last CPU maps with a large mean and a small spread per channel (where
    torch's own channels-last kernel is off by 1e-3): within twice the error of torch's contiguous kernel from a
    float64 GroupNorm, itself at most 1e-5 here. Batches, odd sizes, a strided (not channels-last) input; in place it
    overwrites its input and returns a channels-last map."""
    torch.manual_seed(0)
    norm = GroupNorm(groups, shape[1], eps=1e-6)
    norm.fast = True
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3), norm.bias.normal_(0.0, 0.3)
    x = (torch.randn(shape) * 0.1 + 3 + torch.linspace(0, 0.2, shape[1]).view(1, -1, 1, 1)).contiguous(
        memory_format=torch.channels_last)
    exact = F.group_norm(x.double(), groups, norm.weight.double(), norm.bias.double(), norm.eps)
    torch_error = (F.group_norm(x.contiguous(), groups, norm.weight, norm.bias, norm.eps).double() - exact).abs().max()
    assert torch_error <= 1e-5
    for source in (x, x.transpose(2, 3).contiguous().transpose(2, 3)):
        given = source.clone()
        with torch.no_grad():
            out = norm(given, in_place=in_place)
        assert out.shape == shape and out.is_contiguous(memory_format=torch.channels_last)
        assert (out.double() - exact).abs().max() <= 2 * torch_error
        assert (out.data_ptr() == given.data_ptr()) == (in_place and source is x)


@pytest.mark.parametrize("mean, std, two_pass", [(0.0, 1.0, False), (1.0, 1.0, False), (3.0, 0.1, True),
                                                 (-20.0, 1.0, True), (0.5, 1e-4, True)])
def test_fast_group_norm_takes_torchs_kernel_only_where_it_does_not_cancel(monkeypatch, mean, std, two_pass):
    """torch's channels-last kernel (few parallel passes) serves ordinary maps; large-mean and nearly flat ones go to
    the two-pass computation. Either way the result is within the contiguous kernel's error from float64 plus float32
    rounding (16 ulps of the output's magnitude, the bound of tests/test_autoencoder_parity.py)."""
    torch.manual_seed(0)
    norm = GroupNorm(8, 32, eps=1e-6)
    norm.fast = True
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3), norm.bias.normal_(0.0, 0.3)
    x = (torch.randn(2, 32, 24, 16) * std + mean).contiguous(memory_format=torch.channels_last)
    exact = F.group_norm(x.double(), 8, norm.weight.double(), norm.bias.double(), norm.eps)
    torch_error = (F.group_norm(x.contiguous(), 8, norm.weight, norm.bias, norm.eps).double() - exact).abs().max()
    used = []
    two_pass_norm = autoencoder.group_norm_two_pass
    monkeypatch.setattr(autoencoder, "group_norm_two_pass", lambda *args: used.append(1) or two_pass_norm(*args))
    with torch.no_grad():
        out = norm(x.clone(memory_format=torch.channels_last))
    assert bool(used) == two_pass
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (out.double() - exact).abs().max() <= torch_error + 16 * torch.finfo(torch.float32).eps * exact.abs().max()


def test_fast_group_norm_of_half_precision_maps_is_computed_in_float32():
    torch.manual_seed(0)
    norm = GroupNorm(4, 16, eps=1e-6)
    norm.fast = True
    x = (torch.randn(2, 16, 9, 9) * 0.05 + 4).contiguous(memory_format=torch.channels_last)
    for dtype in (torch.float16, torch.bfloat16):
        with torch.no_grad():
            out = norm(x.to(dtype))
        expected = F.group_norm(x.to(dtype).double(), 4, norm.weight.double(), norm.bias.double(), norm.eps)
        assert out.dtype == dtype
        # one rounding to the half-precision format of an output of magnitude up to 4
        assert (out.double() - expected).abs().max() <= 4 * torch.finfo(dtype).eps
