"""Demo models written into ComfyUI's models-folder layout: trained ones that make real pictures, and seeded random
ones in every checkpoint layout vqcore loads.

Trained (shipped in vqcore/demo_weights/, made by tools/train_demo.py, checked against its SHA256SUMS when copied):
a KL autoencoder (Stable Diffusion's shape, f8) and a VQ autoencoder (f4) trained on photographs, a text-to-image
VQ-Diffusion model of coloured shapes ("a red circle in the top left on a white background"), and a photograph to
try them on, written into ComfyUI's input folder.

Random (same seed, same files): the shapes are shrunk but keep each family's structure: attention inside the last
level, spatial decoder norms (MoVQ), 16 latent channels without quant convs (Flux/SD3), vq_embed_dim !=
latent_channels (VQ-Diffusion), training-only keys beside the weights, and each family's wrapper and key names. They
exist so that the loaders, nodes and CLI can be exercised on a fresh machine without downloads; their pictures are
noise.
"""

import hashlib
import json
import shutil
import re
import string
from pathlib import Path

import torch
from safetensors.torch import save_file

from .autoencoder_kl import AutoencoderKL
from .errors import VQCoreError
from .text_encoder import MAX_LENGTH, PAD_TOKEN
from .transformer import VQDiffusionTransformer
from .vae_layouts import KL_FAMILIES, to_ldm_names
from .vq_diffusion import NULL_EMBEDDINGS
from .vq_model import VQModel

DOWN, ATTN_DOWN, UP, ATTN_UP = "DownEncoderBlock2D", "AttnDownEncoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"


def _blocks(levels, attention_in_last_level):
    down, up = [DOWN] * levels, [UP] * levels
    if attention_in_last_level:
        down[-1], up[0] = ATTN_DOWN, ATTN_UP  # diffusers runs the decoder deepest level first
    return {"down_block_types": down, "up_block_types": up}


def _kl(family, channels, **extra):
    return {"block_out_channels": channels, "layers_per_block": 1, **_blocks(len(channels), False), **KL_FAMILIES[family], **extra}


def _vq(channels, latent, embed_dim, codes, attention=True, **extra):
    return {"block_out_channels": channels, "layers_per_block": 1, "latent_channels": latent, "vq_embed_dim": embed_dim,
            "num_vq_embeddings": codes, **_blocks(len(channels), attention), **extra}


# name -> (class, config). Channels are multiples of 32: shape inference assumes 32 GroupNorm groups, as in every
# published checkpoint.
DEMO_CONFIGS = {
    "sd": (AutoencoderKL, _kl("sd1", [32, 64])),
    "sdxl": (AutoencoderKL, _kl("sdxl", [32, 64])),
    "flux": (AutoencoderKL, _kl("flux", [32, 64], use_quant_conv=False, use_post_quant_conv=False)),
    "sd3": (AutoencoderKL, _kl("sd3", [32, 64], use_quant_conv=False, use_post_quant_conv=False)),
    "vq-f4": (VQModel, _vq([32, 64, 64], 3, 3, 64, attention=False)),
    "vq-f8": (VQModel, _vq([32, 32, 64, 64], 4, 4, 64)),
    "vq-f16": (VQModel, _vq([32, 32, 64, 64, 64], 8, 8, 64)),
    "movq": (VQModel, _vq([32, 32, 64, 64], 4, 4, 64, norm_type="spatial")),
    "ithq": (VQModel, _vq([32, 32, 64, 64], 64, 32, 128)),
}

# Tiny stand-ins for what full checkpoints hold beside the VAE, with the key names loaders look at.
SD1_NEIGHBOURS = ("model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.final_layer_norm.weight")
SD3_NEIGHBOURS = ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight")


TRAINED_FOLDER = Path(__file__).resolve().parent / "demo_weights"
TRAINED_MANIFEST = TRAINED_FOLDER / "SHA256SUMS"
# Names of the trained models in the models folder, and of the photograph in the input folder.
TRAINED_KL = "diffusers/vqcore-photo-kl-f8"
TRAINED_VQ = "diffusers/vqcore-photo-vq-f4"
TRAINED_VQ_DIFFUSION = "diffusers/vqcore-shapes-vq-diffusion"
DEMO_PHOTO = "vqcore-demo-photo.jpg"


def write_demo_models(root, seed=0, input_dir=None) -> list:
    """Writes every demo file under `root` (vae/, vq_models/, checkpoints/, diffusers/) and the demo photograph into
    `input_dir` (default: the models folder's sibling input/, where ComfyUI looks), and returns their paths."""
    root = Path(root)
    input_dir = root.parent / "input" if input_dir is None else Path(input_dir)
    written = write_trained_models(root, input_dir)
    written += write_random_models(root, seed)
    return written


def trained_files() -> list:
    """(path relative to demo_weights/, SHA-256 hex digest) of every shipped trained file, from SHA256SUMS."""
    try:
        lines = TRAINED_MANIFEST.read_text().splitlines()
    except OSError as e:
        raise VQCoreError(f"{TRAINED_MANIFEST}: the trained demo models' manifest is missing ({e}); reinstall the pack") from e
    entries = [line.split(maxsplit=1) for line in lines if line.strip()]
    return [(name.strip(), digest) for digest, name in entries]


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_trained_models(models_dir, input_dir) -> list:
    """Copies the shipped trained models into models_dir and the photograph into input_dir, each file checked against
    its SHA-256 in the manifest (a damaged or changed copy of the pack is an error, not a silently different demo)."""
    written = []
    for name, digest in trained_files():
        source = TRAINED_FOLDER / name
        top, _, relative = name.partition("/")
        target = (Path(models_dir) if top == "models" else Path(input_dir)) / relative
        if not source.is_file() or sha256(source) != digest:
            raise VQCoreError(f"{source}: missing or not the file the pack shipped (SHA-256 differs from "
                              f"{TRAINED_MANIFEST.name}); reinstall the pack")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        written.append(target)
    return written


def write_random_models(root, seed=0) -> list:
    """Writes the random demo models under `root` and returns their paths."""
    root = Path(root)
    with torch.random.fork_rng(devices=[]):
        models = {}
        for offset, (name, (cls, config)) in enumerate(DEMO_CONFIGS.items()):
            torch.manual_seed(seed + offset)
            models[name] = cls(**config)
        written = [
            _safetensors(root / "vae/demo-sd-vae.safetensors", to_ldm_names(_weights(models["sd"]))),
            _safetensors(root / "vae/demo-sdxl-vae.safetensors", to_ldm_names(_weights(models["sdxl"], torch.float16))),
            _safetensors(root / "vae/demo-flux-ae.safetensors", to_ldm_names(_weights(models["flux"]))),
            _safetensors(root / "vae/demo-sd-vae-diffusers-keys.safetensors", _weights(models["sd"])),
            _torch(root / "checkpoints/demo-sd15-checkpoint.ckpt", {"state_dict": _full_checkpoint(models["sd"], SD1_NEIGHBOURS)}),
            _safetensors(root / "checkpoints/demo-sd3-checkpoint.safetensors", _full_checkpoint(models["sd3"], SD3_NEIGHBOURS)),
            _torch(root / "vq_models/demo-vq-f4.ckpt", {"state_dict": _taming_training_checkpoint(models["vq-f4"])}),
            _safetensors(root / "vq_models/demo-vq-f8.safetensors", to_ldm_names(_weights(models["vq-f8"]))),
            _safetensors(root / "vq_models/demo-vq-f16.safetensors", to_ldm_names(_weights(models["vq-f16"]))),
            _safetensors(root / "vq_models/demo-movq.safetensors", to_ldm_names(_weights(models["movq"]))),
            _safetensors(root / "vq_models/demo-movq-diffusers-keys.safetensors", _prefixed("vae.", _weights(models["movq"]))),
            _torch(root / "vq_models/demo-ithq-vqvae.pth", {"model": _patch_vqgan(models["ithq"])}),
            *_diffusers_folder(root / "diffusers/demo-sd-vae", models["sd"], fp16_variant=True),
            *_diffusers_folder(root / "diffusers/demo-ithq-vqvae", models["ithq"], fp16_variant=True, old_attention_names=True),
        ]
    written.append(write_demo_vq_diffusion(root / "diffusers/vq-diffusion-demo", seed))
    return written


def _weights(model, dtype=torch.float32):
    return {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}


def _prefixed(prefix, state):
    return {prefix + k: v for k, v in state.items()}


def _full_checkpoint(model, neighbour_keys):
    """An SD-style checkpoint: the VAE under first_stage_model. beside (tiny) UNet and text-encoder tensors."""
    neighbours = {key: torch.randn(8, 8) for key in neighbour_keys}
    return {**neighbours, **_prefixed("first_stage_model.", to_ldm_names(_weights(model)))}


def _taming_training_checkpoint(model):
    """taming-transformers' training state: discriminator/LPIPS weights under loss.* and the remap index buffer."""
    state = to_ldm_names(_weights(model))
    state["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 8, 1, 1)
    state["quantize.used"] = torch.arange(model.num_embeddings)
    return state


def _patch_vqgan(model):
    """VQ-Diffusion's PatchVQGAN: taming names, the codebook as a raw tensor, EMA codebook statistics."""
    state = to_ldm_names(_weights(model))
    codebook = state.pop("quantize.embedding.weight")
    state["quantize.embedding"] = codebook
    state["quantize.cluster_size"] = torch.ones(codebook.shape[0])
    state["quantize.embedding_avg"] = codebook.clone()
    return state


def _old_attention_names(state):
    """diffusers < 0.14 attention names, as in the fp32 .bin of microsoft/vq-diffusion-ithq."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    pattern = re.compile(r"(\.attentions\.\d+\.)(to_q|to_k|to_v|to_out\.0)\.")
    return {pattern.sub(lambda m: f"{m[1]}{old[m[2]]}.", key): tensor for key, tensor in state.items()}


def _diffusers_folder(folder, model, fp16_variant=False, old_attention_names=False):
    _json(folder / "config.json", {"_class_name": type(model).__name__, **model.config})
    state = _weights(model)
    if old_attention_names:  # the ithq layout: fp32 only as a pickled .bin with old names, fp16 as safetensors
        files = [_torch(folder / "diffusion_pytorch_model.bin", _old_attention_names(state))]
    else:
        files = [_safetensors(folder / "diffusion_pytorch_model.safetensors", state)]
    if fp16_variant:
        files.append(_safetensors(folder / "diffusion_pytorch_model.fp16.safetensors", _weights(model, torch.float16)))
    return [folder / "config.json", *files]


def _safetensors(path, state):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return path


def _json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _torch(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Tiny seeded demo checkpoint (no downloads): random weights, so it produces noise-like images, but every component,
# file and config field is in the ithq layout.

DEMO_CHARACTERS = string.ascii_lowercase + string.digits + ".,'-"
DEMO_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32,
                 max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu")
DEMO_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, cross_attention_dim=32, attention_bias=True,
                        sample_size=16, num_vector_embeds=65, activation_fn="geglu-approximate", num_embeds_ada_norm=100,
                        dropout=0.0, in_channels=None, norm_num_groups=32)
DEMO_VQVAE = dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, latent_channels=16, vq_embed_dim=8,
                  num_vq_embeddings=64, norm_num_groups=32, sample_size=128,
                  down_block_types=["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
                  up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3)


def demo_vocabulary():
    """A character-level CLIP vocabulary: specials, the pad token, and each character alone and word-final."""
    tokens = ["<|startoftext|>", "<|endoftext|>", PAD_TOKEN]
    tokens += [c for c in DEMO_CHARACTERS] + [c + "</w>" for c in DEMO_CHARACTERS]
    return {token: index for index, token in enumerate(tokens)}


def write_demo_vq_diffusion(folder, seed=0) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModel  # imported here: slow, and only this writer needs it

    folder = Path(folder)
    vocab = demo_vocabulary()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_config = dict(DEMO_TEXT, vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                           eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab[PAD_TOKEN])
        text_model = CLIPTextModel(CLIPTextConfig(**text_config))
        transformer = VQDiffusionTransformer.from_config(DEMO_TRANSFORMER)
        for parameter in transformer.parameters():  # default init gives near-uniform predictions; make them peaked
            torch.nn.init.normal_(parameter, std=0.2)
        vqvae = VQModel(**DEMO_VQVAE)
        null = torch.randn(MAX_LENGTH, DEMO_TEXT["hidden_size"]) * 0.2

    _json(folder / "model_index.json", {
        "_class_name": "VQDiffusionPipeline", "_diffusers_version": "0.8.0.dev0",
        NULL_EMBEDDINGS: ["vq_diffusion", "LearnedClassifierFreeSamplingEmbeddings"],
        "scheduler": ["diffusers", "VQDiffusionScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "transformer": ["diffusers", "Transformer2DModel"],
        "vqvae": ["diffusers", "VQModel"]})
    _json(folder / "tokenizer" / "vocab.json", vocab)
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    _json(folder / "tokenizer" / "tokenizer_config.json", {"model_max_length": MAX_LENGTH, "pad_token": PAD_TOKEN})
    _json(folder / "text_encoder" / "config.json", dict(text_config, architectures=["CLIPTextModel"], model_type="clip_text_model"))
    _safetensors(folder / "text_encoder" / "model.safetensors", text_model.state_dict())
    _json(folder / "transformer" / "config.json", dict(DEMO_TRANSFORMER, _class_name="Transformer2DModel"))
    _safetensors(folder / "transformer" / "diffusion_pytorch_model.safetensors", transformer.state_dict())
    _json(folder / "vqvae" / "config.json", dict(DEMO_VQVAE, _class_name="VQModel"))
    _safetensors(folder / "vqvae" / "diffusion_pytorch_model.safetensors", vqvae.state_dict())
    _json(folder / "scheduler" / "scheduler_config.json",
               {"_class_name": "VQDiffusionScheduler", "num_vec_classes": DEMO_TRANSFORMER["num_vector_embeds"], "num_train_timesteps": 100})
    _json(folder / NULL_EMBEDDINGS / "config.json",
               {"_class_name": "LearnedClassifierFreeSamplingEmbeddings", "learnable": True,
                "hidden_size": DEMO_TEXT["hidden_size"], "length": MAX_LENGTH})
    _safetensors(folder / NULL_EMBEDDINGS / "diffusion_pytorch_model.safetensors", {"embeddings": null})
    return folder
