"""Loading a VQ-Diffusion checkpoint in the diffusers folder layout of microsoft/vq-diffusion-ithq.

Layout: model_index.json, vqvae/ (VQModel), transformer/ (config without norm_type), text_encoder/ (CLIPTextModel),
tokenizer/ (vocab.json + merges.txt, or tokenizer.json), scheduler/ (scheduler_config.json) and
learned_classifier_free_sampling_embeddings/ (null text embeddings; optional). Every component is loaded directly:
diffusers' own from_pretrained fails on this layout. Weight files: safetensors or `.bin` (read with weights_only),
with `variant="fp16"` for the fp16 files.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import find_weights, read_config, read_folder_state_dict, read_json
from .devices import resolve_device, resolve_dtype
from .errors import CheckpointError, VQCoreError
from .loading import build_model, check_finite, load_vqmodel
from .sampler import sample
from .scheduler import VQDiffusionScheduler
from .text_encoder import WEIGHT_STEMS, VQTextEncoder
from .transformer import VQDiffusionTransformer
from .vq_model import VQModel

COMPONENTS = ("vqvae", "transformer", "text_encoder", "tokenizer", "scheduler")
NULL_EMBEDDINGS = "learned_classifier_free_sampling_embeddings"


@dataclass
class VQDiffusionModel:
    vqvae: VQModel
    transformer: VQDiffusionTransformer
    scheduler: VQDiffusionScheduler
    text_encoder: VQTextEncoder
    null_embeddings: torch.Tensor | None  # (77, C) learned negative text embeddings, or None

    def negative_embeddings(self, num_prompts):
        """The learned null embeddings when the checkpoint has them, else the empty prompt's embeddings."""
        if self.null_embeddings is not None:
            return self.null_embeddings
        return self.text_encoder.encode([""] * num_prompts)

    def generate(self, prompts, num_images_per_prompt=1, guidance_scale=5.0, **options):
        """Prompts -> tokens (B, h, w); options are those of sampler.sample()."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        cond = self.text_encoder.encode(prompts)
        negative = self.negative_embeddings(len(prompts)) if guidance_scale > 1 else None
        return sample(self.transformer, self.scheduler, cond, negative, num_images_per_prompt=num_images_per_prompt,
                      guidance_scale=guidance_scale, **options)

    @torch.no_grad()
    def decode(self, tokens):
        """Tokens (B, h, w) -> images (B, 3, H, W) in [-1, 1]."""
        return self.vqvae.decode_indices(tokens.to(self.vqvae.device))


def load_vq_diffusion(folder, device=None, dtype=None, variant=None, config=None) -> VQDiffusionModel:
    """The pipeline of a VQ-Diffusion folder. `config`: overrides for the VQ-VAE's config.json, as load_vqmodel's
    config= (a dict of diffusers fields, a config.json or a taming/LDM YAML), checked against its weights. Every
    component's weights are checked (load_vqmodel, build_model, load_text_model): a NaN/inf tensor is a
    CheckpointError naming the component folder and the tensor."""
    folder = Path(folder)
    check_layout(folder)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device) if dtype is not None else torch.float32
    transformer = load_transformer(folder / "transformer", device, dtype, variant)
    vqvae = load_vqmodel(folder / "vqvae", device=device, dtype=dtype, variant=available_variant(folder / "vqvae", variant),
                         config=config)
    if vqvae.num_embeddings != transformer.num_vector_embeds - 1:
        raise CheckpointError(f"{folder}: the VQ-VAE has {vqvae.num_embeddings} codes but the transformer predicts "
                              f"{transformer.num_vector_embeds - 1} classes")
    scheduler_config = folder / "scheduler" / "scheduler_config.json"
    scheduler = from_config_file(VQDiffusionScheduler, read_json(scheduler_config), scheduler_config)
    if scheduler.num_embed != transformer.num_vector_embeds:
        raise CheckpointError(f"{folder}: scheduler has {scheduler.num_embed} classes, transformer {transformer.num_vector_embeds}")
    text_variant = available_variant(folder / "text_encoder", variant, WEIGHT_STEMS)
    text_encoder = VQTextEncoder.from_folders(folder / "tokenizer", folder / "text_encoder", device, dtype, text_variant)
    null = load_null_embeddings(folder / NULL_EMBEDDINGS, device, variant)
    return VQDiffusionModel(vqvae, transformer, scheduler, text_encoder, null)


def check_layout(folder):
    index = folder / "model_index.json"
    missing = [name for name in COMPONENTS if not (folder / name).is_dir()]
    if not index.is_file() or missing:
        raise CheckpointError(
            f"{folder}: not a VQ-Diffusion checkpoint folder (needs model_index.json and the folders "
            f"{', '.join(COMPONENTS)}; missing: {', '.join(['model_index.json'] * (not index.is_file()) + missing)})"
        )
    class_name = read_json(index).get("_class_name")
    if class_name not in ("VQDiffusionPipeline", None):
        raise CheckpointError(f"{index}: a {class_name} checkpoint, not VQDiffusionPipeline")


def from_config_file(cls, config, path):
    """cls.from_config(config); a config it cannot use (a field missing or of the wrong type) is a CheckpointError
    naming the file."""
    try:
        return cls.from_config(config)
    except (VQCoreError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def available_variant(folder, variant, stems=("diffusion_pytorch_model",)):
    """The variant when the component folder has its files, else None (the default weights), as diffusers does:
    the ithq null-embedding folder has no fp16 file, and other checkpoints ship a variant for some components only."""
    if variant is None:
        return None
    try:
        find_weights(folder, stems, variant)
    except CheckpointError:
        return None
    return variant


def load_transformer(folder, device, dtype, variant):
    config = read_config(folder)
    if "num_vector_embeds" not in config:
        raise CheckpointError(f"{folder}/config.json: not a discrete (VQ-Diffusion) transformer: no num_vector_embeds")
    state = read_folder_state_dict(folder, variant=available_variant(folder, variant))
    return build_model(VQDiffusionTransformer, config, state, device, dtype, folder, config_source=folder / "config.json")


def load_null_embeddings(folder, device, variant):
    if not folder.is_dir():
        return None
    config = read_config(folder)
    if not config.get("learnable"):
        return None
    state = read_folder_state_dict(folder, variant=available_variant(folder, variant))
    if "embeddings" not in state or state["embeddings"].ndim != 2 or not state["embeddings"].is_floating_point():
        raise CheckpointError(f"{folder}: no (length, hidden) floating-point 'embeddings' tensor; found "
                              f"{ {k: tuple(v.shape) for k, v in list(state.items())[:5]} }")
    embeddings = state["embeddings"].float().to(device)
    check_finite({"embeddings": embeddings}, folder)
    return embeddings
