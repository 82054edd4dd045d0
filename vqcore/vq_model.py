"""VQ-VAE (taming VQGAN, VQ-Diffusion ithq, Kandinsky MoVQ, aMUSEd) with diffusers' VQModel config and weight names."""

import torch
from torch import nn

from .autoencoder import Autoencoder, check_input
from .errors import NonFiniteResult, VQCoreError
from .model_io import as_model_input, check_result


class VectorQuantizer(nn.Module):
    """Nearest-codebook-vector quantization (taming's VectorQuantizer2 in its legacy loss form)."""

    def __init__(self, num_embeddings, embed_dim, beta=0.25):
        super().__init__()
        self.num_embeddings, self.embed_dim, self.beta = num_embeddings, embed_dim, beta
        self.embedding = nn.Embedding(num_embeddings, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)

    def forward(self, z):
        """(B, E, h, w) latents -> (z_q (B, E, h, w), commit loss (0-dim), indices (B, h, w) long)."""
        b, _, h, w = z.shape
        z = z.permute(0, 2, 3, 1).contiguous()
        flat = z.view(-1, self.embed_dim)
        # cdist + argmin (not the expanded z^2 + e^2 - 2ze) picks the same code as diffusers on near-ties.
        indices = torch.argmin(torch.cdist(flat, self.embedding.weight), dim=1)
        z_q = self.embedding(indices).view(z.shape)
        # Legacy form: beta weighs the codebook term instead of the commitment term (taming's original bug).
        loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        # Straight-through estimator; as arithmetic it also rounds z_q the way diffusers does.
        z_q = z + (z_q - z).detach()
        if not torch.isfinite(z_q).all():
            raise non_finite_codes(z, self.embedding.weight, indices)
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, indices.view(b, h, w)

    def get_codebook_entry(self, indices, shape):
        """Codebook vectors for indices, as NCHW; shape is (B, h, w, E) with tokens in row-major order."""
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.is_complex():
            kind = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise VQCoreError(f"get_codebook_entry indices must be an integer tensor; got {kind}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_embeddings):
            raise VQCoreError(f"get_codebook_entry indices must lie in [0, {self.num_embeddings - 1}] (the codebook has "
                              f"{self.num_embeddings} entries); got values from {int(indices.min())} to {int(indices.max())}")
        shape = tuple(shape)
        if len(shape) != 4 or shape[-1] != self.embed_dim or shape[0] * shape[1] * shape[2] != indices.numel():
            raise VQCoreError(f"get_codebook_entry shape must be (batch, height, width, {self.embed_dim}) with "
                              f"batch * height * width = {indices.numel()} indices; got {shape}")
        return self.embedding(indices.long()).view(shape).permute(0, 3, 1, 2).contiguous()


class VQModel(Autoencoder):
    """encode -> continuous latents (B, E, h, w); quantize -> codebook vectors and indices; decode -> image.

    E, the codebook dimension, is `vq_embed_dim` when set, else `latent_channels`. Images are NCHW in [-1, 1].
    """

    def __init__(
        self,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(64,),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=3,
        sample_size=32,
        num_vq_embeddings=256,
        norm_num_groups=32,
        vq_embed_dim=None,
        scaling_factor=0.18215,
        norm_type="group",
        mid_block_add_attention=True,
        lookup_from_codebook=False,
        force_upcast=False,
    ):
        super().__init__()
        self.keep_config(locals())
        if norm_type not in ("group", "spatial"):
            raise VQCoreError(f"norm_type must be 'group' or 'spatial'; got {norm_type!r}")
        spatial = norm_type == "spatial"
        self.encoder = self.make_encoder(latent_channels, spatial)
        embed_dim = vq_embed_dim or latent_channels
        if spatial and embed_dim != latent_channels:
            raise VQCoreError(
                f"norm_type='spatial' conditions the decoder on the codebook vectors, so vq_embed_dim ({vq_embed_dim}) "
                f"must equal latent_channels ({latent_channels})"
            )
        self.quant_conv = nn.Conv2d(latent_channels, embed_dim, 1)
        self.quantize = VectorQuantizer(num_vq_embeddings, embed_dim)
        self.post_quant_conv = nn.Conv2d(embed_dim, latent_channels, 1)
        self.decoder = self.make_decoder(zq_channels=latent_channels if spatial else None)

    @property
    def num_embeddings(self):
        return self.quantize.num_embeddings

    @property
    def latent_channels(self):
        """Channels of the latents encode() returns and decode() takes: the codebook dimension E."""
        return self.quantize.embed_dim

    def encode(self, x):
        """Images (B, in_channels, H, W) in [-1, 1] -> continuous (not quantized) latents (B, E, H/f, W/f)."""
        check_input(x, self.config["in_channels"], self.downscale_factor, "VQModel.encode images")
        x = as_model_input(x, self, "VQModel.encode images")
        latents = self.quant_conv(self.encoder(x))
        return check_result(latents, "VQModel.encode", "images", x, self.encoder_modules())

    def decode(self, latents, force_not_quantize=False):
        """Latents -> images. Latents are quantized first unless force_not_quantize, in which case they are used as
        they are (codebook vectors), or, for a `lookup_from_codebook` model, taken to be indices (B, h, w)."""
        if force_not_quantize and self.config["lookup_from_codebook"]:
            return self.decode_indices(latents)
        check_input(latents, self.latent_channels, 1, "VQModel.decode latents")
        latents = as_model_input(latents, self, "VQModel.decode latents")
        quant = latents if force_not_quantize else self.quantize(latents)[0]
        return self.decode_embeddings(quant, "latents")

    def decode_indices(self, indices):
        """Codebook indices (B, h, w) -> images."""
        return self.decode_embeddings(self.indices_to_embeddings(indices), "codebook indices")

    def decode_embeddings(self, quant, input_name="codebook vectors"):
        spatial = self.config["norm_type"] == "spatial"
        images = self.decoder(self.post_quant_conv(quant), quant if spatial else None)
        return check_result(images, "VQModel.decode", input_name, quant, self.decoder_modules())

    def decoder_modules(self):
        """The modules a decode runs, by checkpoint name: where a NaN/inf weight is looked for."""
        return {"quantize": self.quantize, "post_quant_conv": self.post_quant_conv, "decoder": self.decoder}

    def decode_tile_program(self, program):
        """decode_embeddings, for vqcore.tiling: from the codebook vectors, map program.input, which a spatial-norm
        decoder also takes as zq."""
        program.conv(self.post_quant_conv)
        self.decoder.tile_program(program, program.input if self.config["norm_type"] == "spatial" else None)

    def indices_to_embeddings(self, indices):
        """Codebook indices (B, h, w) -> codebook vectors (B, E, h, w)."""
        if not isinstance(indices, torch.Tensor) or indices.ndim != 3 or indices.is_floating_point():
            shape = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise VQCoreError(f"codebook indices must be an integer (batch, height, width) tensor; got {shape}")
        return self.quantize.get_codebook_entry(indices.to(self.device), (*indices.shape, self.latent_channels))


def non_finite_codes(z, codebook, indices):
    """Quantising finite latents picked NaN/inf codebook vectors (argmin prefers NaN distances): name them."""
    if not torch.isfinite(z).all():
        return VQCoreError(f"quantize latents of shape {tuple(z.shape)} contain NaN or infinite values")
    bad = torch.nonzero(~torch.isfinite(codebook).all(dim=1)).flatten().tolist()
    picked = int((~torch.isfinite(codebook[indices]).all(dim=1)).sum())
    return NonFiniteResult(f"quantize: codebook entries {bad[:8]}{' ...' if len(bad) > 8 else ''} of "
                           f"quantize.embedding.weight ({len(bad)} of {codebook.shape[0]}) contain NaN/inf, and "
                           f"{picked} latent pixels picked them")
