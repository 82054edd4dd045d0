"""VAE checkpoint layouts: find the VAE inside any weight file, rename its keys to diffusers names, infer the
architecture from tensor shapes, and name the model family.

Layouts handled (see also the README's list of checkpoint formats):
* diffusers names (`encoder.down_blocks.0.resnets.0...`), including pre-2023 attention names `query/key/value/proj_attn`;
* LDM / taming / CompVis names (`encoder.down.0.block.0...`, decoder levels stored in reverse order, attention
  projections as 1x1 convs), Kandinsky MoVQ spatial norms, and VQ-Diffusion's PatchVQGAN raw codebook tensor;
* stand-alone VAE files, full SD-style checkpoints (`first_stage_model.`) and files with a `vae.` prefix.

Shapes cannot tell SD1/SD2/SDXL apart, nor SD3 from Flux; those differ only in latent scaling constants, which come
from the family table below (chosen by the caller, or guessed from the file name / surrounding checkpoint keys).
"""

import logging
import re
from collections import Counter

from .errors import CheckpointError

log = logging.getLogger("vqcore")

VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")
# Tried in this order when several prefixes hold a VAE (e.g. an EMA copy beside the real one).
KNOWN_PREFIXES = ("", "first_stage_model.", "vae.")
# Training-time state that inference does not need: the remap buffer and EMA codebook statistics of taming's and
# VQ-Diffusion's quantizers. Anything else that does not fit the model is reported, never dropped silently.
TRAINING_ONLY_KEYS = re.compile(
    r"quantize\.(used|initted|cluster_size|embed_avg|embedding_avg|embedding\.cluster_size|embedding\.embed_avg)"
)
SPATIAL_NORM_CHILDREN = ("norm_layer", "conv_y", "conv_b")
LDM_ATTENTION_NAMES = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
OLD_DIFFUSERS_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
KIND_NAMES = {"vq": "a VQ autoencoder", "kl": "a KL autoencoder"}


# ---------------------------------------------------------------------------------------------------------------
# 1. Finding the VAE keys


def select_vae_keys(keys, source, kind=None) -> dict:
    """Maps the file's key names that belong to the VAE to the names without their prefix.

    A file holding autoencoders under several prefixes: `kind` ("vq" or "kl", the loader's) picks one; without it,
    a VQ and a KL autoencoder side by side are an error that asks which (two of one kind: the first prefix of
    KNOWN_PREFIXES, e.g. the real VAE rather than a copy). Raises CheckpointError saying what the file looks like
    when it holds no VAE.
    """
    keys = list(keys)
    key_set = set(keys)
    prefixes = vae_prefixes(keys)
    if not prefixes:
        raise CheckpointError(f"{source}: no VAE weights found; the file looks like {describe_checkpoint(keys)}")
    kinds = {p: "vq" if {f"{p}quantize.embedding.weight", f"{p}quantize.embedding"} & key_set else "kl" for p in prefixes}
    if kind is not None and any(kinds[p] == kind for p in prefixes):
        prefixes = [p for p in prefixes if kinds[p] == kind]
    elif len(set(kinds.values())) > 1:
        found = " and ".join(f"{KIND_NAMES[k]} {_prefix_words(p)}" for k, p in
                             ((k, next(p for p in prefixes if kinds[p] == k)) for k in ("kl", "vq")))
        raise CheckpointError(f"{source}: holds two autoencoders, {found}; load it with the VQ loader "
                              f"(load_vqmodel) or the KL loader (load_autoencoder_kl) to say which")
    if len(prefixes) > 1:
        log.info("%s: autoencoder weights %s; using those %s", source,
                 ", ".join(_prefix_words(p) for p in prefixes), _prefix_words(prefixes[0]))
    prefix = prefixes[0]
    selected = {}
    for key in keys:
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name.startswith(VAE_ROOTS) and not TRAINING_ONLY_KEYS.fullmatch(name):
            selected[key] = name
    return selected


def vae_prefixes(keys) -> list:
    """The prefixes in front of a VAE's first conv, known ones first (in KNOWN_PREFIXES order), then by length."""
    found = {key[: -len(root)] for key in keys for root in ("encoder.conv_in.weight", "decoder.conv_in.weight")
             if key == root or key.endswith("." + root)}
    known = [p for p in KNOWN_PREFIXES if p in found]
    return known + sorted(found - set(known), key=lambda p: (len(p), p))


def _prefix_words(prefix):
    return f"under {prefix!r}" if prefix else "at the top level"


def describe_checkpoint(keys) -> str:
    """A short guess at what a weight file holds, for error messages."""
    keys = list(keys)

    def has(*parts):
        return any(all(p in k for p in parts) for k in keys)

    if has("token_embedding") or has("text_model.") or has("embed_tokens"):
        return "a text encoder (CLIP/T5-style token embeddings), not a VAE"
    if has("shared.weight") or has("encoder.block.", "layer."):
        return "a T5 text encoder, not a VAE"
    if has("lora_") or has(".lora."):
        return "a LoRA, not a VAE"
    if has("latent_image_embedding"):
        return "a VQ-Diffusion transformer, not a VAE"
    if has("model.diffusion_model.") or has("time_embed") or has("input_blocks.") or has("time_embedding"):
        return "a diffusion model (UNet/transformer) without VAE weights"
    sample = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
    return f"an unknown model ({len(keys)} tensors: {sample})"


# ---------------------------------------------------------------------------------------------------------------
# 2. Renaming to diffusers names


def _resnet_part(rest):
    return "conv_shortcut." + rest[len("nin_shortcut."):] if rest.startswith("nin_shortcut.") else rest


def _attention_part(rest):
    head, _, tail = rest.partition(".")
    if head == "norm":
        return ("spatial_norm." if tail.split(".")[0] in SPATIAL_NORM_CHILDREN else "group_norm.") + tail
    if head in LDM_ATTENTION_NAMES:
        return f"{LDM_ATTENTION_NAMES[head]}.{tail}"
    return rest  # unknown sub-key: left as is so the strict load reports it


def _ldm_key_to_diffusers(key, decoder_levels):
    m = re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", key)
    if m:
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_resnet_part(m[3])}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(.+)", key)
    if m:
        return f"{m[1]}.mid_block.attentions.0.{_attention_part(m[2])}"
    m = re.fullmatch(r"(encoder|decoder)\.norm_out\.(.+)", key)
    if m:
        return f"{m[1]}.conv_norm_out.{m[2]}"
    m = re.fullmatch(r"encoder\.down\.(\d+)\.(block|attn)\.(\d+)\.(.+)", key)
    if m:
        if m[2] == "block":
            return f"encoder.down_blocks.{m[1]}.resnets.{m[3]}.{_resnet_part(m[4])}"
        return f"encoder.down_blocks.{m[1]}.attentions.{m[3]}.{_attention_part(m[4])}"
    m = re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)", key)
    if m:
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    # The decoder stores its deepest (widest) level last; diffusers runs and names levels in execution order.
    m = re.fullmatch(r"decoder\.up\.(\d+)\.(block|attn)\.(\d+)\.(.+)", key)
    if m:
        level = decoder_levels - 1 - int(m[1])
        if m[2] == "block":
            return f"decoder.up_blocks.{level}.resnets.{m[3]}.{_resnet_part(m[4])}"
        return f"decoder.up_blocks.{level}.attentions.{m[3]}.{_attention_part(m[4])}"
    m = re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)", key)
    if m:
        return f"decoder.up_blocks.{decoder_levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    if key == "quantize.embedding":  # PatchVQGAN keeps the codebook as a raw tensor
        return "quantize.embedding.weight"
    m = re.fullmatch(r"(.+\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)", key)
    if m:
        return f"{m[1]}.{OLD_DIFFUSERS_ATTENTION_NAMES[m[2]]}.{m[3]}"
    return key


def _levels(keys, pattern):
    indices = [int(m[1]) for k in keys if (m := re.match(pattern, k))]
    return max(indices) + 1 if indices else 0


def to_diffusers_names(state: dict, source) -> dict:
    """Renames a VAE state dict (prefix already removed) from any known layout to diffusers names.

    Attention projections stored as 1x1 convs are squeezed to the Linear weights diffusers uses.
    """
    decoder_levels = _levels(state, r"decoder\.up\.(\d+)\.")
    renamed = {}
    for key, tensor in state.items():
        name = _ldm_key_to_diffusers(key, decoder_levels)
        if re.search(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", name) and tensor.ndim == 4:
            if tensor.shape[2:] != (1, 1):
                raise CheckpointError(f"{source}: attention weight {key} has shape {tuple(tensor.shape)}; expected a 1x1 conv")
            tensor = tensor[:, :, 0, 0]
        if name in renamed:
            raise CheckpointError(f"{source}: two keys map to {name} (mixed layouts?), one of them is {key}")
        renamed[name] = tensor
    return renamed


def _ldm_resnet_part(rest):
    return "nin_shortcut." + rest[len("conv_shortcut."):] if rest.startswith("conv_shortcut.") else rest


def _ldm_attention_part(rest):
    for diffusers_name, ldm_name in (("group_norm.", "norm."), ("spatial_norm.", "norm.")):
        if rest.startswith(diffusers_name):
            return ldm_name + rest[len(diffusers_name):]
    for ldm_name, diffusers_name in LDM_ATTENTION_NAMES.items():
        if rest.startswith(diffusers_name + "."):
            return f"{ldm_name}.{rest[len(diffusers_name) + 1:]}"
    return rest


def to_ldm_names(state: dict) -> dict:
    """The reverse of `to_diffusers_names`: diffusers names → LDM/taming names, attention weights as 1x1 convs.

    Used to write checkpoints in the original layout (demo models); the codebook stays `quantize.embedding.weight`.
    """
    levels = _levels(state, r"decoder\.up_blocks\.(\d+)\.")
    out = {}
    for key, tensor in state.items():
        name = ldm_key(key, levels)
        if re.search(r"\.attn(_1|\.\d+)\.(q|k|v|proj_out)\.weight$", name) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[name] = tensor
    return out


def ldm_key(key, decoder_levels) -> str:
    """One diffusers key's LDM/taming name (decoder_levels: the number of decoder up blocks)."""
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_ldm_resnet_part(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_ldm_attention_part(m[2])}"
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_ldm_resnet_part(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.attn.{m[2]}.{_ldm_attention_part(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{decoder_levels - 1 - int(m[1])}.block.{m[2]}.{_ldm_resnet_part(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"decoder.up.{decoder_levels - 1 - int(m[1])}.attn.{m[2]}.{_ldm_attention_part(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{decoder_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    return key


def file_key_names(selected: dict):
    """name(diffusers key) -> the key as the user's file spells it, for messages: `selected` is select_vae_keys'
    {file key: name without prefix}. Keys the file lacks are spelt in the file's layout (LDM or diffusers) with its
    prefix."""
    stripped = list(selected.values())
    decoder_levels = _levels(stripped, r"decoder\.up\.(\d+)\.")
    back = {_ldm_key_to_diffusers(name, decoder_levels): key for key, name in selected.items()}
    prefix = next((key[: -len(name)] for key, name in selected.items()), "")
    ldm_layout = any(re.match(r"(encoder\.(down|mid)|decoder\.(up|mid))\.", name) for name in stripped)
    levels = decoder_levels or _levels(back, r"decoder\.up_blocks\.(\d+)\.")

    def name(key):
        if key in back:
            return back[key]
        return prefix + (ldm_key(key, levels) if ldm_layout else key)

    return name


# ---------------------------------------------------------------------------------------------------------------
# 3. Architecture from shapes


def model_kind(state: dict) -> str:
    """"vq" or "kl" for a VAE state dict in diffusers names."""
    return "vq" if "quantize.embedding.weight" in state else "kl"


def infer_config(state: dict, source) -> dict:
    """A diffusers-style config (VQModel or AutoencoderKL field names) read off the tensor shapes, with the
    conventions every published checkpoint follows for what shapes cannot tell: SiLU, and 32 GroupNorm groups (a
    file whose widths 32 does not divide is an error asking for its config instead of a guess). Sample size and
    latent scaling constants come from the family table."""
    return with_norm_defaults(shape_config(state, source), source)


# Fields the tensor shapes determine: a config that sets one of them is checked against the weights.
SHAPE_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
                "up_block_types", "mid_block_add_attention", "latent_channels", "num_vq_embeddings", "vq_embed_dim",
                "norm_type", "use_quant_conv", "use_post_quant_conv")
CONVENTIONAL_GROUPS = 32


def shape_config(state: dict, source, file_name=str) -> dict:
    """The architecture fields (SHAPE_FIELDS and `_class_name`) that a VAE state dict in diffusers names shows;
    file_name(diffusers key) spells a key as the user's file does, for messages."""

    def shape(key, ndim=4):
        if key not in state:
            raise CheckpointError(f"{source}: cannot infer the VAE architecture: tensor {file_name(key)} is missing")
        if state[key].ndim != ndim:
            raise CheckpointError(f"{source}: tensor {file_name(key)} has shape {tuple(state[key].shape)}; expected "
                                  f"{ndim} dimensions")
        return tuple(state[key].shape)

    levels = _levels(state, r"encoder\.down_blocks\.(\d+)\.")
    if levels == 0:
        raise CheckpointError(f"{source}: cannot infer the VAE architecture: no encoder levels "
                              f"({file_name('encoder.down_blocks.0.resnets.0.conv1.weight')} and the like)")

    def has_attention(block):
        return f"{block}.attentions.0.to_q.weight" in state

    vq = model_kind(state) == "vq"
    widths = [shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight")[0] for i in range(levels)]
    config = {
        "_class_name": "VQModel" if vq else "AutoencoderKL",
        "in_channels": shape("encoder.conv_in.weight")[1],
        "out_channels": shape("decoder.conv_out.weight")[0],
        "block_out_channels": widths,
        "layers_per_block": _levels(state, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        "down_block_types": [
            "AttnDownEncoderBlock2D" if has_attention(f"encoder.down_blocks.{i}") else "DownEncoderBlock2D" for i in range(levels)
        ],
        "up_block_types": [
            "AttnUpDecoderBlock2D" if has_attention(f"decoder.up_blocks.{i}") else "UpDecoderBlock2D" for i in range(levels)
        ],
        "mid_block_add_attention": has_attention("encoder.mid_block"),
    }
    encoder_out = shape("encoder.conv_out.weight")[0]
    if vq:
        num_embeddings, embed_dim = shape("quantize.embedding.weight", ndim=2)
        latent = _latent_channels(state, widths[-1], embed_dim)
        config.update(
            latent_channels=latent,
            num_vq_embeddings=num_embeddings,
            vq_embed_dim=embed_dim,
            norm_type="spatial" if "decoder.conv_norm_out.conv_y.weight" in state else "group",
        )
        return config
    latent = _latent_channels(state, widths[-1], None)
    decoder_in = shape("decoder.conv_in.weight")
    if decoder_in[0] == widths[-1] and encoder_out == decoder_in[1]:  # encoder and decoder agree: no posterior
        latent = encoder_out
        raise CheckpointError(
            f"{source}: {file_name('encoder.conv_out.weight')} has {encoder_out} output channels; a KL autoencoder "
            f"with {latent} latent channels needs {2 * latent} (mean and log-variance), and no "
            f"{file_name('quantize.embedding.weight')} (VQ codebook) was found"
        )
    config.update(latent_channels=latent, use_quant_conv="quant_conv.weight" in state,
                  use_post_quant_conv="post_quant_conv.weight" in state)
    return config


def _latent_channels(state, widest, embed_dim):
    """The latent channel count most of the tensors around the latent space agree on (a VQ model when embed_dim is
    given, else KL), counting only tensors whose other side fits the network, so that a damaged one is named by the
    strict load instead of blaming its neighbours."""
    vq = embed_dim is not None
    votes = []
    encoder_out = state["encoder.conv_out.weight"].shape
    if encoder_out[1] == widest and (vq or encoder_out[0] % 2 == 0):
        votes.append(encoder_out[0] if vq else encoder_out[0] // 2)
    for key, side, other in (("quant_conv.weight", 1, 0), ("post_quant_conv.weight", 0, 1)):
        conv = state.get(key)
        if conv is None or conv.ndim != 4:
            continue
        if vq and conv.shape[other] == embed_dim:
            votes.append(conv.shape[side])
        elif not vq and conv.shape[0] == conv.shape[1]:
            votes.append(conv.shape[0] // 2 if key == "quant_conv.weight" else conv.shape[0])
    decoder_in = state["decoder.conv_in.weight"].shape if "decoder.conv_in.weight" in state else None
    if decoder_in is not None and len(decoder_in) == 4 and decoder_in[0] == widest:
        votes.append(decoder_in[1])
    if votes:
        return Counter(votes).most_common(1)[0][0]
    return decoder_in[1] if decoder_in is not None and len(decoder_in) == 4 else encoder_out[0]


def with_norm_defaults(config: dict, source) -> dict:
    """The config with SiLU and 32 GroupNorm groups where it does not say otherwise. GroupNorm's group count is not
    stored in the weights; 32 is assumed only where it divides every width (a spatial-norm decoder needs it anyway)."""
    config = {"act_fn": "silu", **config}
    if "norm_num_groups" not in config:
        widths = list(config["block_out_channels"])
        if any(width % CONVENTIONAL_GROUPS for width in widths):
            raise CheckpointError(
                f"{source}: the widths {widths} are not multiples of {CONVENTIONAL_GROUPS}, the GroupNorm group count "
                f"of every published checkpoint, and the weights do not store the group count: pass "
                f"config={{'norm_num_groups': N}}, or put a config file with norm_num_groups beside the weight file "
                f"(same name, .yaml or .json)"
            )
        config["norm_num_groups"] = CONVENTIONAL_GROUPS
    return config


# ---------------------------------------------------------------------------------------------------------------
# 4. Families: latent constants that shapes cannot tell


_NO_STATS = {"shift_factor": None, "latents_mean": None, "latents_std": None}
# KL families: the values of each model's published diffusers vae/config.json.
KL_FAMILIES = {
    "sd1": {"latent_channels": 4, "scaling_factor": 0.18215, **_NO_STATS, "force_upcast": True, "sample_size": 512},
    "sd2": {"latent_channels": 4, "scaling_factor": 0.18215, **_NO_STATS, "force_upcast": True, "sample_size": 768},
    "sdxl": {"latent_channels": 4, "scaling_factor": 0.13025, **_NO_STATS, "force_upcast": True, "sample_size": 1024},
    "sdxl-fp16-fix": {"latent_channels": 4, "scaling_factor": 0.13025, **_NO_STATS, "force_upcast": False, "sample_size": 1024},
    "playground-v2.5": {
        "latent_channels": 4,
        "scaling_factor": 0.5,
        "shift_factor": None,
        "latents_mean": [-1.6574, 1.886, -1.383, 2.5155],
        "latents_std": [8.4927, 5.9022, 6.5498, 5.2299],
        "force_upcast": True,
        "sample_size": 1024,
    },
    "sd3": {"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609, "latents_mean": None,
            "latents_std": None, "force_upcast": True, "sample_size": 1024},
    "flux": {"latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159, "latents_mean": None,
             "latents_std": None, "force_upcast": True, "sample_size": 1024},
}
# VQ families are told apart by shapes alone (MoVQ and vq-f8 only by the spatial decoder norms); no pipeline reads
# latent constants of a VQ model, so the table holds the signature only.
VQ_FAMILIES = {
    "vq-f4": {"block_out_channels": [128, 256, 512], "latent_channels": 3, "vq_embed_dim": 3, "num_vq_embeddings": 8192, "norm_type": "group"},
    "vq-f8": {"block_out_channels": [128, 256, 256, 512], "latent_channels": 4, "vq_embed_dim": 4, "num_vq_embeddings": 16384, "norm_type": "group"},
    "vq-f16": {"block_out_channels": [128, 128, 256, 256, 512], "latent_channels": 8, "vq_embed_dim": 8, "num_vq_embeddings": 16384, "norm_type": "group"},
    "movq": {"block_out_channels": [128, 256, 256, 512], "latent_channels": 4, "vq_embed_dim": 4, "num_vq_embeddings": 16384, "norm_type": "spatial"},
    "ithq": {"block_out_channels": [64, 128, 256, 512], "latent_channels": 256, "vq_embed_dim": 128, "num_vq_embeddings": 4096, "norm_type": "group"},
}
FAMILY_NAMES = ("auto", *KL_FAMILIES, *VQ_FAMILIES)
# "auto" for a KL file whose name and surroundings say nothing: SD1 constants for 4 channels; Flux for 16 channels,
# because stand-alone 16-channel VAE files are mostly Flux's `ae.safetensors` while SD3 usually ships as a full
# checkpoint, which is recognised by its transformer keys.
DEFAULT_KL_FAMILY = {4: "sd1", 16: "flux"}
# Lower-case file-name fragments, most specific first.
NAME_HINTS = (("playground", "playground-v2.5"), ("fp16-fix", "sdxl-fp16-fix"), ("fp16_fix", "sdxl-fp16-fix"),
              ("sdxl", "sdxl"), ("sd3", "sd3"), ("flux", "flux"))
# Keys beside the VAE in full checkpoints, most specific first.
KEY_HINTS = (("edm_mean", "playground-v2.5"), ("model.diffusion_model.joint_blocks.", "sd3"),
             ("model.diffusion_model.double_blocks.", "flux"), ("conditioner.embedders.", "sdxl"),
             ("cond_stage_model.model.", "sd2"), ("cond_stage_model.transformer.", "sd1"))


def identify_vq_family(config: dict):
    """The VQ family whose published shapes the config matches, or None."""
    shapes = {
        **config,
        "block_out_channels": list(config.get("block_out_channels") or []),
        "vq_embed_dim": config.get("vq_embed_dim") or config.get("latent_channels"),
        "norm_type": config.get("norm_type", "group"),
    }
    return next((name for name, signature in VQ_FAMILIES.items() if signature.items() <= shapes.items()), None)


def guess_kl_family(config: dict, file_name: str = "", keys=()):
    """The most likely KL family for a file without config.json: surrounding checkpoint keys, then the file name,
    then the default for its latent channel count; None when nothing fits (the model's own defaults then apply)."""

    def fits(family):
        return KL_FAMILIES[family]["latent_channels"] == config["latent_channels"]

    for fragment, family in KEY_HINTS:
        if fits(family) and any(k.startswith(fragment) for k in keys):
            return family
    name = file_name.lower()
    if name in ("ae.safetensors", "ae.sft") and fits("flux"):
        return "flux"
    for fragment, family in NAME_HINTS:
        if fragment in name and fits(family):
            return family
    return DEFAULT_KL_FAMILY.get(config["latent_channels"])


def apply_family(config: dict, family: str, source) -> dict:
    """The config with the family's constants; CheckpointError when the file cannot be of that family."""
    if family in KL_FAMILIES:
        constants = dict(KL_FAMILIES[family])
        latent = constants.pop("latent_channels")
        if config.get("_class_name") != "AutoencoderKL" or config.get("latent_channels") != latent:
            raise CheckpointError(
                f"{source}: family {family!r} is a KL autoencoder with {latent} latent channels; the file holds "
                f"{config.get('_class_name')} weights with {config.get('latent_channels')} latent channels"
            )
        return {**config, **constants}
    if family in VQ_FAMILIES:
        if identify_vq_family(config) != family:
            raise CheckpointError(f"{source}: the file's shapes do not match the {family!r} VQ family")
        return config
    raise CheckpointError(f"{source}: unknown family {family!r}; choose one of {', '.join(FAMILY_NAMES)}")
