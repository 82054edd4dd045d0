"""VQ-Diffusion's discrete-input transformer: codebook tokens + text embeddings + timestep -> log p(x0).

Module and parameter names are those of diffusers' `Transformer2DModel` (discrete path, `norm_type="ada_norm"`), so its
state dicts load with strict=True. Differences: AdaLayerNorm also takes one timestep per sample, the output
log-softmax runs in float64 a slice of tokens at a time (no full-size float64 copy) and returns a class-last tensor,
and a batch of tokens half the size of the text batch (classifier-free guidance: the same tokens under [negative;
prompt]) runs the first block up to the text (norm1, self-attention, norm2 and the cross-attention query) once
instead of twice. Activations and residual sums are computed in place (same bits, fewer full-size temporaries).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .errors import VQCoreError
from .model_config import Configured

ACTIVATIONS = ("geglu-approximate", "geglu", "gelu", "gelu-approximate")
# Tokens per slice of the output projection and float64 log-softmax: bounds the logits and their float64 copy to
# 256 x classes.
LOG_SOFTMAX_SLICE = 256
# Rows per pass through the feed-forward's 4x wider hidden layer, the largest temporary of a block (at ithq shapes a
# 4 x 1024-token batch makes it 92 MB per pass without this). Same results as one pass at ithq shapes on CPU.
FEED_FORWARD_ROWS = 1024
# Rows per block of the GELU2 activation's temporary (at ithq width 128 x 5632 floats, 2.9 MB: cache-sized).
ACTIVATION_ROWS = 128


class ImagePositionalEmbeddings(nn.Module):
    """Token embedding plus a learned row and column embedding; token index = row * width + column."""

    def __init__(self, num_embed, height, width, embed_dim):
        super().__init__()
        self.height, self.width = height, width
        self.emb = nn.Embedding(num_embed, embed_dim)
        self.height_emb = nn.Embedding(height, embed_dim)
        self.width_emb = nn.Embedding(width, embed_dim)

    def forward(self, tokens):
        positions = (self.height_emb.weight[:, None, :] + self.width_emb.weight[None, :, :]).view(1, self.height * self.width, -1)
        return self.emb(tokens) + positions[:, : tokens.shape[1]]


class AdaLayerNorm(nn.Module):
    """LayerNorm (no affine) scaled and shifted by a learned embedding of the timestep: x̂ * (1 + scale) + shift."""

    def __init__(self, dim, num_timesteps):
        super().__init__()
        self.emb = nn.Embedding(num_timesteps, dim)
        self.linear = nn.Linear(dim, dim * 2)
        self.norm = nn.LayerNorm(dim, eps=1e-5, elementwise_affine=False)

    def forward(self, x, timestep):
        """timestep: 0-dim (one step for the batch, as diffusers) or (B,) (one per sample, as the original)."""
        modulation = self.linear(F.silu(self.emb(timestep)))
        if timestep.ndim == 0:
            scale, shift = modulation.chunk(2, dim=0)
        else:
            scale, shift = modulation[:, None, :].chunk(2, dim=-1)
        return self.norm(x).mul_(1 + scale).add_(shift)


class Attention(nn.Module):
    """Multi-head attention through SDPA (scale 1/sqrt(head_dim)); self-attention when no context is given."""

    def __init__(self, query_dim, heads, dim_head, context_dim=None, bias=False, dropout=0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    def forward(self, x, context=None):
        return self.attend(self.to_q(x), x if context is None else context)

    def attend(self, q, context):
        """Attention of the projected queries q (B, N, heads * head_dim) to the context (B, L, C)."""
        batch = q.shape[0]
        k, v = self.to_k(context), self.to_v(context)
        head_dim = k.shape[-1] // self.heads
        q, k, v = (y.view(batch, -1, self.heads, head_dim).transpose(1, 2) for y in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, -1, self.heads * head_dim)
        return self.to_out[1](self.to_out[0](out))


class Projection(nn.Module):
    """First feed-forward layer with its activation; `proj` is the parameter name every variant shares."""

    def __init__(self, dim, inner, kind):
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(dim, inner * 2 if kind == "geglu" else inner)

    def forward(self, x):
        x = self.proj(x)
        if self.kind == "geglu-approximate":  # the original's "GELU2", x * sigmoid(1.702 x): not gated despite the name
            for block in x.split(ACTIVATION_ROWS):  # in place, with a cache-sized temporary
                block.mul_(torch.mul(block, 1.702).sigmoid_())
            return x
        if self.kind == "geglu":
            x, gate = x.chunk(2, dim=-1)
            return x * F.gelu(gate)
        return F.gelu(x, approximate="tanh" if self.kind == "gelu-approximate" else "none")


class FeedForward(nn.Module):
    def __init__(self, dim, activation_fn, dropout=0.0, mult=4):
        super().__init__()
        self.net = nn.ModuleList([Projection(dim, dim * mult, activation_fn), nn.Dropout(dropout), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= FEED_FORWARD_ROWS:
            return self.rows_forward(x)
        out = torch.empty(rows.shape[0], self.net[2].out_features, dtype=x.dtype, device=x.device)
        for start in range(0, rows.shape[0], FEED_FORWARD_ROWS):
            out[start : start + FEED_FORWARD_ROWS] = self.rows_forward(rows[start : start + FEED_FORWARD_ROWS])
        return out.view(*x.shape[:-1], -1)

    def rows_forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock with ada_norm: self-attention, cross-attention to the text, feed-forward."""

    def __init__(self, *, dim, heads, head_dim, context_dim, num_timesteps, activation_fn, bias, dropout, norm_eps,
                 affine):
        super().__init__()
        self.norm1 = AdaLayerNorm(dim, num_timesteps)
        self.attn1 = Attention(dim, heads, head_dim, bias=bias, dropout=dropout)
        self.norm2 = AdaLayerNorm(dim, num_timesteps)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, bias=bias, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=affine)
        self.ff = FeedForward(dim, activation_fn, dropout)

    def forward(self, x, context, timestep):
        x = self.attn1(self.norm1(x, timestep)).add_(x)
        x = self.attn2(self.norm2(x, timestep), context).add_(x)
        return self.ff(self.norm3(x)).add_(x)

    def forward_shared_tokens(self, x, context, timestep):
        """x (B, N, D) under a text batch of 2B ([negative; prompt]): both halves see the same x until the text enters,
        so norm1, self-attention, norm2 and the cross-attention query run on B rows; timestep is that of those B rows."""
        x = self.attn1(self.norm1(x, timestep)).add_(x)
        query = self.attn2.to_q(self.norm2(x, timestep)).repeat(2, 1, 1)
        attended = self.attn2.attend(query, context)
        x = attended.view(2, *x.shape).add_(x).view(attended.shape)  # the residual added to both halves
        return self.ff(self.norm3(x)).add_(x)


class VQDiffusionTransformer(Configured, nn.Module):
    """Takes config fields of diffusers' Transformer2DModel (discrete input); unknown fields are ignored."""

    def __init__(
        self,
        num_attention_heads=16,
        attention_head_dim=88,
        num_layers=1,
        dropout=0.0,
        cross_attention_dim=None,
        attention_bias=False,
        sample_size=None,
        num_vector_embeds=None,
        activation_fn="geglu",
        num_embeds_ada_norm=None,
        norm_type="ada_norm",
        norm_elementwise_affine=True,
        norm_eps=1e-5,
        only_cross_attention=False,
        double_self_attention=False,
    ):
        super().__init__()
        self.keep_config(locals())
        if not num_vector_embeds or not sample_size or not num_embeds_ada_norm or num_layers < 1:
            raise VQCoreError(
                "VQ-Diffusion transformer config needs num_vector_embeds, sample_size, num_embeds_ada_norm and at least "
                f"one layer; got {num_vector_embeds}, {sample_size}, {num_embeds_ada_norm}, {num_layers} layers"
            )
        # Configs without norm_type (ithq) mean ada_norm; diffusers switches "layer_norm" to it as well.
        if norm_type not in ("ada_norm", "layer_norm", None) or only_cross_attention or double_self_attention:
            raise VQCoreError(
                f"unsupported transformer config: norm_type={norm_type!r}, only_cross_attention={only_cross_attention}, "
                f"double_self_attention={double_self_attention} (VQ-Diffusion uses ada_norm with self- and cross-attention)"
            )
        if activation_fn not in ACTIVATIONS:
            raise VQCoreError(f"activation_fn must be one of {', '.join(ACTIVATIONS)}; got {activation_fn!r}")
        self.config["norm_type"] = "ada_norm"
        dim = num_attention_heads * attention_head_dim
        size = sample_size if isinstance(sample_size, (list, tuple)) else (sample_size, sample_size)
        self.height, self.width = size
        self.latent_image_embedding = ImagePositionalEmbeddings(num_vector_embeds, self.height, self.width, dim)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(dim=dim, heads=num_attention_heads, head_dim=attention_head_dim,
                             context_dim=cross_attention_dim, num_timesteps=num_embeds_ada_norm,
                             activation_fn=activation_fn, bias=attention_bias, dropout=dropout, norm_eps=norm_eps,
                             affine=norm_elementwise_affine)
            for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, num_vector_embeds - 1)

    @property
    def num_vector_embeds(self):
        """Codebook classes plus the [MASK] class (the last index)."""
        return self.config["num_vector_embeds"]

    @property
    def num_latent_pixels(self):
        return self.height * self.width

    @property
    def num_timesteps(self):
        return self.config["num_embeds_ada_norm"]

    @property
    def dtype(self):
        return self.out.weight.dtype

    @property
    def device(self):
        return self.out.weight.device

    def forward(self, tokens, encoder_hidden_states, timestep):
        """tokens (B, N) or (B, h, w) int64; encoder_hidden_states (B or 2B, L, C); timestep int, 0-dim or (B,).

        Returns log p(x0) over the non-mask classes, float32 (B or 2B, K - 1, N). With a text batch twice the token
        batch, each token row is paired with text rows i and B + i (the [negative; prompt] layout of guidance).
        """
        tokens = tokens.reshape(tokens.shape[0], -1)
        self.check_tokens(tokens)
        timestep = torch.as_tensor(timestep, device=tokens.device)
        repeats = encoder_hidden_states.shape[0] // tokens.shape[0]
        if repeats not in (1, 2) or repeats * tokens.shape[0] != encoder_hidden_states.shape[0]:
            raise VQCoreError(
                f"text batch {encoder_hidden_states.shape[0]} must equal the token batch {tokens.shape[0]} or twice it"
            )
        if timestep.ndim == 1 and repeats == 2:
            timestep = timestep.repeat(2)
        hidden = self.latent_image_embedding(tokens).to(self.dtype)
        encoder_hidden_states = encoder_hidden_states.to(self.dtype)
        for index, block in enumerate(self.transformer_blocks):
            if index == 0 and repeats == 2:
                first_timestep = timestep[: tokens.shape[0]] if timestep.ndim == 1 else timestep
                hidden = block.forward_shared_tokens(hidden, encoder_hidden_states, first_timestep)
            else:
                hidden = block(hidden, encoder_hidden_states, timestep)
        return self.class_log_probs(hidden)

    def class_log_probs(self, hidden):
        """Final hidden states (B, N, D) -> float32 log p(x0) (B, K-1, N), computed in float64 as diffusers does.

        diffusers projects all tokens to logits, permutes them to (B, K-1, N) and runs log_softmax over the classes on
        a float64 copy (two float64 tensors of the full size). Here a slice of LOG_SOFTMAX_SLICE tokens at a time is
        projected, widened into a reused float64 buffer, normalised along contiguous memory (faster than along the
        strided class dimension; the same float32 results) and narrowed into the output, so neither the full
        logits nor a full float64 copy exist. The result is the class-last (B, N, K-1) tensor viewed as (B, K-1, N):
        guidance and truncation reduce over the classes, which then lie in contiguous memory.
        """
        batch, tokens, _ = hidden.shape
        classes = self.out.out_features
        out = torch.empty(batch, tokens, classes, dtype=torch.float32, device=hidden.device)
        rows, out_rows = hidden.reshape(batch * tokens, -1), out.view(batch * tokens, classes)
        buffer = torch.empty(min(LOG_SOFTMAX_SLICE, len(rows)), classes, dtype=torch.float64, device=hidden.device)
        for start in range(0, len(rows), LOG_SOFTMAX_SLICE):
            logits = self.out(self.norm_out(rows[start : start + LOG_SOFTMAX_SLICE]))
            piece = buffer[: len(logits)].copy_(logits)
            out_rows[start : start + LOG_SOFTMAX_SLICE] = torch.log_softmax(piece, dim=1, out=piece)
        return out.transpose(1, 2)

    def check_tokens(self, tokens):
        if tokens.is_floating_point() or tokens.shape[1] != self.num_latent_pixels:
            raise VQCoreError(
                f"tokens must be integer ids for a {self.height}x{self.width} grid ({self.num_latent_pixels} per image); "
                f"got {tuple(tokens.shape)} {tokens.dtype}"
            )
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.num_vector_embeds:
            raise VQCoreError(f"token ids must lie in [0, {self.num_vector_embeds - 1}] (the last is [MASK]); got {low}..{high}")

