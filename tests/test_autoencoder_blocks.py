"""Building blocks of vqcore's autoencoders against their plain definitions."""

import pytest
import torch
import torch.nn.functional as F

from vqcore.autoencoder import Upsample


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
