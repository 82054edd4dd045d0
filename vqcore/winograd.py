"""3x3 convolution by Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional
Neural Networks", 2016).

Every 4x4 block of output pixels is computed from the 6x6 input tile around it. Tile and kernel are taken into a
36-point transform domain, where the convolution becomes 36 independent products over channels (one batched matmul),
and the result is taken back. That is 36 multiplies per output block and channel pair instead of 16 x 9 = 144; the
transforms are small fixed matrices, applied as matmuls too. In float32 the error is a few times the direct
convolution's (the transforms have coefficients up to 8 and 1/24); tests/test_autoencoder_blocks.py bounds it.
"""

import functools

import torch
import torch.nn.functional as F

# The 1-D transforms for 4 outputs of a 3-tap filter, from interpolation at 0, 1, -1, 2, -2 and infinity.
INPUT_TRANSFORM = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
                   (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
KERNEL_TRANSFORM = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
                    (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
OUTPUT_TRANSFORM = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))


@functools.cache
def transforms_2d(dtype, device):
    """The 2-D transforms (Kronecker squares of the 1-D ones, made in float64): 36x36 for input tiles, 36x9 for
    kernels, 16x36 back to output blocks."""
    return tuple(torch.kron(m, m).to(dtype=dtype, device=device)
                 for m in (torch.tensor(t, dtype=torch.float64)
                           for t in (INPUT_TRANSFORM, KERNEL_TRANSFORM, OUTPUT_TRANSFORM)))


def winograd_conv3x3(x, weight, bias):
    """F.conv2d(x, weight, bias, padding=1) for (N, C, H, W) x, (K, C, 3, 3) weight and (K,) bias. The result is
    channels-last; so should x be, since channels are the innermost dimension of the tiles."""
    n, c, h, w = x.shape
    k = weight.shape[0]
    rows, cols = -(-h // 4), -(-w // 4)  # output blocks; the last ones may reach past the image and are cropped
    tile_to_domain, kernel_to_domain, domain_to_block = transforms_2d(x.dtype, x.device)
    padded = F.pad(x, (1, 4 * cols + 1 - w, 1, 4 * rows + 1 - h))
    s_n, s_c, s_h, s_w = padded.stride()
    # (tile row, tile column, batch, block row, block column, channel): overlapping 6x6 tiles at a stride of 4.
    tiles = padded.as_strided((6, 6, n, rows, cols, c), (s_h, s_w, s_n, 4 * s_h, 4 * s_w, s_c)).reshape(36, -1)
    tiles = (tile_to_domain @ tiles).view(36, n * rows * cols, c)
    kernels = (kernel_to_domain @ weight.reshape(k * c, 9).T).view(36, k, c).transpose(1, 2)
    blocks = (domain_to_block @ torch.bmm(tiles, kernels).view(36, -1)).view(4, 4, n, rows, cols, k)
    out = blocks.permute(2, 3, 0, 4, 1, 5).reshape(n, 4 * rows, 4 * cols, k)[:, :h, :w].permute(0, 3, 1, 2)
    out.add_(bias.view(1, k, 1, 1))
    return out.contiguous(memory_format=torch.channels_last)  # a copy only where the crop left a strided view
