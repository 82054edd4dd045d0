"""Loading a VQ-Diffusion checkpoint in the diffusers folder layout of microsoft/vq-diffusion-ithq, a tiny seeded demo
folder in that layout, and the `generate` command.

Layout: model_index.json, vqvae/ (VQModel), transformer/ (config without norm_type), text_encoder/ (CLIPTextModel),
tokenizer/ (vocab.json + merges.txt, or tokenizer.json), scheduler/ (scheduler_config.json) and
learned_classifier_free_sampling_embeddings/ (null text embeddings; optional). Every component is loaded directly:
diffusers' own from_pretrained fails on this layout. Weight files: safetensors or `.bin` (read with weights_only),
with `variant="fp16"` for the fp16 files.
"""

import json
import string
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import read_config, read_folder_state_dict
from .devices import default_device, resolve_dtype
from .errors import CheckpointError, VQCoreError
from .loading import load_vqmodel
from .sampler import MODES, sample
from .scheduler import VQDiffusionScheduler
from .text_encoder import MAX_LENGTH, PAD_TOKEN, VQTextEncoder
from .transformer import VQDiffusionTransformer
from .vq_model import VQModel

COMPONENTS = ("vqvae", "transformer", "text_encoder", "tokenizer", "scheduler")
NULL_EMBEDDINGS = "learned_classifier_free_sampling_embeddings"
DEMO_FOLDER = Path(tempfile.gettempdir()) / "vqcore-vq-diffusion-demo"


@dataclass
class VQDiffusionModel:
    vqvae: VQModel
    transformer: VQDiffusionTransformer
    scheduler: VQDiffusionScheduler
    text_encoder: VQTextEncoder
    null_embeddings: torch.Tensor | None  # (77, C) learned negative text embeddings, or None
    source: str = ""

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


def load_vq_diffusion(folder, device=None, dtype=None, variant=None) -> VQDiffusionModel:
    folder = Path(folder)
    check_layout(folder)
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device) if dtype is not None else torch.float32
    transformer = load_transformer(folder / "transformer", device, dtype, variant)
    vqvae = load_vqmodel(folder / "vqvae", device=device, dtype=dtype, variant=variant)
    if vqvae.num_embeddings != transformer.num_vector_embeds - 1:
        raise CheckpointError(f"{folder}: the VQ-VAE has {vqvae.num_embeddings} codes but the transformer predicts "
                              f"{transformer.num_vector_embeds - 1} classes")
    scheduler = VQDiffusionScheduler.from_config(read_json(folder / "scheduler" / "scheduler_config.json"))
    if scheduler.num_embed != transformer.num_vector_embeds:
        raise CheckpointError(f"{folder}: scheduler has {scheduler.num_embed} classes, transformer {transformer.num_vector_embeds}")
    text_encoder = VQTextEncoder.from_folders(folder / "tokenizer", folder / "text_encoder", device, dtype, variant)
    null = load_null_embeddings(folder / NULL_EMBEDDINGS, device, variant)
    return VQDiffusionModel(vqvae, transformer, scheduler, text_encoder, null, str(folder))


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


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: missing or not valid JSON: {e}") from e


def read_component(folder, variant):
    """State dict of a component folder; falls back to the default weights when the variant is absent (the
    ithq null-embedding folder has no fp16 file)."""
    try:
        return read_folder_state_dict(folder, variant=variant)
    except CheckpointError:
        if variant is None:
            raise
        return read_folder_state_dict(folder)


def load_transformer(folder, device, dtype, variant):
    config = read_config(folder)
    if "num_vector_embeds" not in config:
        raise CheckpointError(f"{folder}/config.json: not a discrete (VQ-Diffusion) transformer: no num_vector_embeds")
    model = VQDiffusionTransformer.from_config(config)
    state = read_component(folder, variant)
    missing, unexpected = sorted(model.state_dict().keys() - state.keys()), sorted(state.keys() - model.state_dict().keys())
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not fit config.json: missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{folder}: weight shapes do not fit config.json: {e}") from e
    return model.to(device=device, dtype=dtype).eval()


def load_null_embeddings(folder, device, variant):
    if not folder.is_dir():
        return None
    config = read_json(folder / "config.json")
    if not config.get("learnable"):
        return None
    state = read_component(folder, variant)
    if "embeddings" not in state or state["embeddings"].ndim != 2:
        raise CheckpointError(f"{folder}: no (length, hidden) 'embeddings' tensor; found {sorted(state)[:5]}")
    return state["embeddings"].float().to(device)


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
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

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

    def write_json(path, data):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")

    def weights(path, state):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))

    write_json(folder / "model_index.json", {
        "_class_name": "VQDiffusionPipeline", "_diffusers_version": "0.8.0.dev0",
        NULL_EMBEDDINGS: ["vq_diffusion", "LearnedClassifierFreeSamplingEmbeddings"],
        "scheduler": ["diffusers", "VQDiffusionScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "transformer": ["diffusers", "Transformer2DModel"],
        "vqvae": ["diffusers", "VQModel"]})
    write_json(folder / "tokenizer" / "vocab.json", vocab)
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    write_json(folder / "tokenizer" / "tokenizer_config.json", {"model_max_length": MAX_LENGTH, "pad_token": PAD_TOKEN})
    write_json(folder / "text_encoder" / "config.json", dict(text_config, architectures=["CLIPTextModel"], model_type="clip_text_model"))
    weights(folder / "text_encoder" / "model.safetensors", text_model.state_dict())
    write_json(folder / "transformer" / "config.json", dict(DEMO_TRANSFORMER, _class_name="Transformer2DModel"))
    weights(folder / "transformer" / "diffusion_pytorch_model.safetensors", transformer.state_dict())
    write_json(folder / "vqvae" / "config.json", dict(DEMO_VQVAE, _class_name="VQModel"))
    weights(folder / "vqvae" / "diffusion_pytorch_model.safetensors", vqvae.state_dict())
    write_json(folder / "scheduler" / "scheduler_config.json",
               {"_class_name": "VQDiffusionScheduler", "num_vec_classes": DEMO_TRANSFORMER["num_vector_embeds"], "num_train_timesteps": 100})
    write_json(folder / NULL_EMBEDDINGS / "config.json",
               {"_class_name": "LearnedClassifierFreeSamplingEmbeddings", "learnable": True,
                "hidden_size": DEMO_TEXT["hidden_size"], "length": MAX_LENGTH})
    weights(folder / NULL_EMBEDDINGS / "diffusion_pytorch_model.safetensors", {"embeddings": null})
    return folder


# ---------------------------------------------------------------------------------------------------------------
# `python -m vqcore generate`

def add_generate_command(subparsers):
    parser = subparsers.add_parser("generate", help="text-to-image with a VQ-Diffusion checkpoint folder (default: the demo model)")
    parser.add_argument("prompt")
    parser.add_argument("output", type=Path, help="PNG to write (several images are tiled side by side)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help=f"VQ-Diffusion folder in the diffusers layout (default: the tiny demo model, written to {DEMO_FOLDER})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="default: every timestep of the schedule")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--truncation", type=float, default=0.86)
    parser.add_argument("--mode", default="standard", choices=MODES)
    parser.add_argument("--images", type=int, default=1, help="images for the prompt")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--variant", default=None, help="weight variant, e.g. fp16")
    parser.set_defaults(run=run_generate)


def run_generate(args):
    from PIL import Image

    folder = args.checkpoint
    if folder is None:
        folder = DEMO_FOLDER
        if not (folder / "model_index.json").is_file():
            print(f"writing the demo VQ-Diffusion model to {folder}")
            write_demo_vq_diffusion(folder)
    model = load_vq_diffusion(folder, device=args.device, dtype=args.dtype, variant=args.variant)
    started = time.perf_counter()

    def progress(step, total, tokens, x0_estimate):
        masked = (tokens == model.transformer.num_vector_embeds - 1).float().mean().item()
        print(f"step {step + 1}/{total}  masked {masked:6.1%}  {time.perf_counter() - started:6.1f} s", flush=True)

    tokens = model.generate([args.prompt], num_images_per_prompt=args.images, steps=args.steps, guidance_scale=args.guidance,
                            truncation_rate=args.truncation, mode=args.mode, seed=args.seed, callback=progress)
    images = model.decode(tokens)
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    pixels = torch.cat(list(pixels), dim=1).numpy()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(args.output, format="PNG")
    print(f"{folder}: {tuple(tokens.shape)} tokens -> {args.output}")
