"""Building blocks of vqcore's autoencoders against their plain definitions."""

import pytest
import torch
import torch.nn.functional as F

from vqcore.autoencoder import Upsample
from vqcore.winograd import winograd_conv3x3


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


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 8, 4, 4), (1, 4, 1, 1), (3, 5, 9, 12)])
def test_winograd_convolution_equals_the_direct_one(shape):
    """Winograd's F(4x4, 3x3) is the 3x3 convolution up to rounding in float64: odd, tiny and non-square maps (whose
    last blocks are cropped), batches, both memory layouts; the result is channels-last."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    weight, bias = torch.randn(6, shape[1], 3, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    direct = F.conv2d(x, weight, bias, padding=1)
    for layout in (torch.contiguous_format, torch.channels_last):
        out = winograd_conv3x3(x.contiguous(memory_format=layout), weight, bias)
        assert out.shape == direct.shape and out.is_contiguous(memory_format=torch.channels_last)
        assert (out - direct).abs().max().item() <= 1e-10


def test_winograd_float32_error_stays_near_the_direct_convolutions():
    """Where the fast path uses it (512 channels), Winograd's float32 error against a float64 convolution is at most
    2e-5 of the output's scale (measured: 7.4e-6, 4.5 times the direct float32 convolution's)."""
    torch.manual_seed(0)
    x = torch.randn(1, 512, 16, 20).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(512, 512, 3, 3) / (3 * 512**0.5), torch.randn(512)
    exact = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    error = (winograd_conv3x3(x, weight, bias).double() - exact).abs().max().item()
    assert error <= 2e-5 * exact.abs().max().item()
