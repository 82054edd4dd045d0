"""Bad arguments and tensors given to vqcore's models, sampler and device helpers: each is a VQCoreError whose
message names the argument or tensor at fault (never a torch error from deep inside, never a NaN image)."""

import pytest
import torch

from vqcore import tiling
from vqcore.autoencoder_kl import AutoencoderKL
from vqcore.vq_model import VQModel

TWO_LEVELS = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2)


@pytest.fixture(scope="module")
def vq_model():
    torch.manual_seed(0)
    return VQModel(**TWO_LEVELS, latent_channels=4, num_vq_embeddings=16).eval()


@pytest.fixture(scope="module")
def kl_model():
    torch.manual_seed(1)
    return AutoencoderKL(**TWO_LEVELS).eval()


@pytest.mark.parametrize("name", ["vq_model", "kl_model"])
def test_tiled_empty_batch_matches_full(name, request):
    model = request.getfixturevalue(name)
    latents, images = torch.zeros(0, model.latent_channels, 8, 8), torch.zeros(0, 3, 16, 16)
    with torch.no_grad():
        assert tiling.tiled_decode(model, latents, tile_size=32).shape == model.decode(latents).shape == (0, 3, 16, 16)
        tiled, full = tiling.tiled_encode(model, images, tile_size=32), model.encode(images)
    moments = lambda encoded: getattr(encoded, "moments", encoded)
    assert moments(tiled).shape == moments(full).shape
    assert moments(full).shape[0] == 0 and moments(full).shape[2:] == (8, 8)
