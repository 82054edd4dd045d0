"""The tests' own diffusers → original-layout key mapping (LDM / taming / MoVQ / PatchVQGAN / old diffusers names).

Written independently of vqcore.vae_layouts so that a shared mistake cannot make both directions agree: it walks the
key's path components and rebuilds the original name, following the original repositories' module trees
(taming `Encoder.down[i].block[j]`, `.attn[j]`, `.downsample`, `mid.block_1/attn_1/block_2`, `norm_out`; the decoder's
`up` list is indexed from the shallowest level, so diffusers' up_blocks.{k} is up.{n-1-k}).
"""

import torch

ATTENTION_CHILDREN = {"group_norm": "norm", "spatial_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v"}
OLD_DIFFUSERS_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value"}


def _attention_tail(parts):
    if parts[:2] == ["to_out", "0"]:
        return ["proj_out", *parts[2:]]
    return [ATTENTION_CHILDREN.get(parts[0], parts[0]), *parts[1:]]


def _resnet_tail(parts):
    return ["nin_shortcut" if parts[0] == "conv_shortcut" else parts[0], *parts[1:]]


def _original_key(key, decoder_levels):
    parts = key.split(".")
    net, block = parts[0], parts[1] if len(parts) > 1 else ""
    if net not in ("encoder", "decoder"):
        return key, False
    if block == "conv_norm_out":
        return ".".join([net, "norm_out", *parts[2:]]), False
    if block == "mid_block":
        kind, index, tail = parts[2], int(parts[3]), parts[4:]
        if kind == "resnets":
            return ".".join([net, "mid", f"block_{index + 1}", *_resnet_tail(tail)]), False
        return ".".join([net, "mid", "attn_1", *_attention_tail(tail)]), True
    if block in ("down_blocks", "up_blocks"):
        level = int(parts[2]) if block == "down_blocks" else decoder_levels - 1 - int(parts[2])
        head = [net, "down" if block == "down_blocks" else "up", str(level)]
        kind = parts[3]
        if kind == "resnets":
            return ".".join([*head, "block", parts[4], *_resnet_tail(parts[5:])]), False
        if kind == "attentions":
            return ".".join([*head, "attn", parts[4], *_attention_tail(parts[5:])]), True
        if kind in ("downsamplers", "upsamplers"):  # parts[4] == "0"; a single resampler per level
            return ".".join([*head, "downsample" if kind == "downsamplers" else "upsample", *parts[5:]]), False
    return key, False


def to_original_layout(state, conv_attention=True):
    """diffusers VAE state dict → LDM/taming/MoVQ names. Attention projections become 1x1 convs unless
    conv_attention=False (some LDM files store them 2-D)."""
    decoder_levels = len({k.split(".")[2] for k in state if k.startswith("decoder.up_blocks.")})
    out = {}
    for key, tensor in state.items():
        name, in_attention = _original_key(key, decoder_levels)
        projection = name.rsplit(".", 2)[-2] in ("q", "k", "v", "proj_out") and name.endswith(".weight")
        if in_attention and projection and conv_attention:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        out[name] = tensor.clone()
    return out


def to_patch_vqgan(state):
    """VQ-Diffusion's original PatchVQGAN checkpoint content: taming names, raw codebook tensor, EMA statistics."""
    out = to_original_layout(state)
    codebook = out.pop("quantize.embedding.weight")
    out.update({"quantize.embedding": codebook, "quantize.cluster_size": torch.ones(len(codebook)),
                "quantize.embedding_avg": codebook * 2})
    return out


def to_old_diffusers_names(state):
    """Pre-2023 diffusers attention names (query/key/value/proj_attn), diffusers names otherwise."""
    out = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if "attentions" in parts:
            at = parts.index("attentions") + 2
            if parts[at:at + 2] == ["to_out", "0"]:
                parts[at:at + 2] = ["proj_attn"]
            else:
                parts[at] = OLD_DIFFUSERS_ATTENTION.get(parts[at], parts[at])
        out[".".join(parts)] = tensor.clone()
    return out
