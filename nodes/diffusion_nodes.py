"""VQ-Diffusion nodes: checkpoint loader, text encoder, truncation patch and the sampler (text→image, token
inpainting, img2img on tokens)."""

import copy
import time

import torch
import torch.nn.functional as F
from PIL import Image

from ..vqcore.errors import VQCoreError
from ..vqcore.sampler import MODES, SEED_MAX, sample
from ..vqcore.truncation import check_rate
from ..vqcore.vq_diffusion import load_vq_diffusion
from . import compute, host, model_choices, ui_payloads
from .autoencoder_nodes import DTYPE_TOOLTIP, DTYPES, load_dtype

PREVIEWS_PER_RUN = 8  # a JPEG preview of the current estimate about this many times per run
SCHEDULE_LENGTH = 100  # timesteps of the VQ-Diffusion schedule (every released checkpoint); a model's own is checked


class TextEncoderHandle:
    """What VQ_CLIP carries: the tokenizer + CLIP text model, the model under the host's memory manager."""

    def __init__(self, text_encoder, name):
        self.text_encoder = text_encoder
        self.patcher = host.wrap_model(text_encoder.text_model, "text")
        self.name = name

    def encode(self, prompts) -> torch.Tensor:
        host.load_models([self.patcher])
        with torch.inference_mode():
            return self.text_encoder.encode(list(prompts)).float().cpu()


class VQDiffusionHandle:
    """What VQ_DIFFUSION_MODEL carries: the transformer under the memory manager, the schedule, the null text
    embeddings, the pipeline's VQ-VAE and text encoder, and the sampling settings patch nodes change (on a copy)."""

    def __init__(self, bundle, name, vq: compute.AutoencoderHandle, clip: TextEncoderHandle):
        self.patcher = host.wrap_model(bundle.transformer, "diffusion")
        self.scheduler = bundle.scheduler
        self.null_embeddings = None if bundle.null_embeddings is None else bundle.null_embeddings.float().cpu()
        self.vq, self.clip, self.name = vq, clip, name
        self.truncation_rate, self.prior_rule, self.prior_weight = 1.0, "purity", 1.0

    @property
    def transformer(self):
        return host.unwrap(self.patcher)

    def patched(self, **settings):
        """A copy sharing the weights, with other sampling settings (as ComfyUI's ModelPatcher.clone())."""
        clone = copy.copy(self)
        clone.__dict__.update(settings)
        return clone


def sampler_bytes(transformer, batch: int) -> int:
    """Activations of one step: hidden states and feed-forward of the token batch (doubled by guidance) and the
    float64 log-softmax over all classes."""
    tokens = 2 * batch * transformer.num_latent_pixels
    width = transformer.config["num_attention_heads"] * transformer.config["attention_head_dim"]
    size = torch.empty((), dtype=transformer.dtype).element_size()
    return tokens * (12 * width * size + 3 * 8 * transformer.num_vector_embeds)


class VQCoreLoadVQDiffusion:
    DESCRIPTION = ("Loads a VQ-Diffusion checkpoint folder (the diffusers layout of microsoft/vq-diffusion-ithq) from "
                   "models/diffusers, and splits it like ComfyUI's checkpoint loader: the transformer, its CLIP text "
                   "encoder and its VQ-VAE.")
    CATEGORY = "vqcore/loaders"
    RETURN_TYPES = ("VQ_DIFFUSION_MODEL", "VQ_CLIP", "VQ_VAE")
    RETURN_NAMES = ("model", "clip", "vq_vae")
    OUTPUT_TOOLTIPS = ("The discrete diffusion transformer with its schedule and null text embeddings.",
                       "The CLIP text encoder for CLIP Text Encode (VQ-Diffusion).",
                       "The VQ-VAE that decodes the sampled tokens (VQ Decode).")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoint": (model_choices.vq_diffusion_choices(), {
                "tooltip": "A VQ-Diffusion folder in models/diffusers (model_index.json, transformer/, vqvae/, "
                           "text_encoder/, tokenizer/, scheduler/)."}),
            "dtype": (DTYPES, {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
        }}

    def load(self, checkpoint, dtype="auto"):
        folder = model_choices.diffusers_path(checkpoint, "checkpoint")
        with compute.input_errors("checkpoint"):
            bundle = load_vq_diffusion(folder, device="cpu", dtype=load_dtype(dtype))
        vq = compute.AutoencoderHandle(bundle.vqvae, f"{checkpoint}/vqvae")
        clip = TextEncoderHandle(bundle.text_encoder, f"{checkpoint}/text_encoder")
        return (VQDiffusionHandle(bundle, checkpoint, vq, clip), clip, vq)


class VQCoreCLIPTextEncode:
    DESCRIPTION = ("Encodes a prompt with VQ-Diffusion's CLIP text encoder (77 tokens, longer prompts are cut with a "
                   "log line; every token vector L2-normalised).")
    CATEGORY = "vqcore/vq_diffusion"
    RETURN_TYPES = ("VQ_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Text embeddings for the VQ-Diffusion Sampler.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("VQ_CLIP", {"tooltip": "The text encoder from Load VQ-Diffusion Checkpoint."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                "tooltip": "The prompt."}),
        }}

    def encode(self, clip, text):
        if not isinstance(clip, TextEncoderHandle):
            raise VQCoreError(f"clip: expected VQ_CLIP from Load VQ-Diffusion Checkpoint; got {type(clip).__name__}")
        if not isinstance(text, str):
            raise VQCoreError(f"text: expected a string; got {type(text).__name__}")
        with compute.input_errors("text"):
            embeddings = clip.encode([text])
        return ({"embeddings": embeddings, "texts": [text]},)


class VQCoreTruncation:
    DESCRIPTION = ("Sets how the sampler trims each token's predicted distribution, on a copy of the model (the "
                   "input model is unchanged, like ComfyUI's model-patch nodes): truncation keeps the most likely "
                   "codes whose probabilities add up to the rate; the purity prior settings steer the 'purity' "
                   "sampling mode.")
    CATEGORY = "vqcore/vq_diffusion"
    RETURN_TYPES = ("VQ_DIFFUSION_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with these sampling settings.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("VQ_DIFFUSION_MODEL", {"tooltip": "The VQ-Diffusion model to patch."}),
            "truncation_rate": ("FLOAT", {"default": 0.86, "min": 0.01, "max": 1.0, "step": 0.01,
                                          "tooltip": "Probability mass kept per token; 1 keeps every code. 0.86 is "
                                                     "the value the ithq model was published with."}),
            "purity_prior": (["purity", "uniform"], {
                "default": "purity",
                "tooltip": "purity mode only: which masked positions are unmasked first, by purity (the model's "
                           "confidence) or uniformly at random."}),
            "purity_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.1,
                                        "tooltip": "purity mode only: how much confident positions' distributions "
                                                   "are sharpened (0: not at all)."}),
        }}

    def patch(self, model, truncation_rate, purity_prior="purity", purity_weight=1.0):
        diffusion_model(model, "model")
        with compute.input_errors("truncation_rate"):
            rate = check_rate(truncation_rate)
        return (model.patched(truncation_rate=rate, prior_rule=purity_prior, prior_weight=float(purity_weight)),)


def diffusion_model(model, input_name):
    if not isinstance(model, VQDiffusionHandle):
        raise VQCoreError(f"{input_name}: expected VQ_DIFFUSION_MODEL from Load VQ-Diffusion Checkpoint; got "
                          f"{type(model).__name__}")
    return model


def conditioning(cond, model, input_name):
    """The (P, 77, C) embeddings of a VQ_CONDITIONING, checked against the transformer's text width."""
    embeddings = cond.get("embeddings") if isinstance(cond, dict) else None
    width = model.transformer.config["cross_attention_dim"]
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 3 or embeddings.shape[-1] != width:
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(cond).__name__
        raise VQCoreError(f"{input_name}: expected VQ_CONDITIONING with [prompts, 77, {width}] embeddings for this "
                          f"model; got {shape}")
    return embeddings


def token_mask(mask, grid, factor, batch):
    """MASK [B,H,W] at image size (token grid × downscale factor) or at token-grid size → bool (B, h, w): a token is
    regenerated when any pixel of its patch is masked (> 0.5). An image-size mask may be up to factor - 1 pixels
    larger: it then comes from the image that VQ Encode centre-cropped, and is cropped the same way."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        raise VQCoreError(f"mask: expected a MASK tensor [batch, height, width]; got "
                          f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    mask = (mask[None] if mask.ndim == 2 else mask).float()
    (h, w), (height, width) = grid, mask.shape[1:]
    if (height // factor, width // factor) == (h, w):
        top, left = (height - h * factor) // 2, (width - w * factor) // 2
        mask = F.max_pool2d(mask[:, None, top:top + h * factor, left:left + w * factor], factor)[:, 0]
    elif (height, width) != (h, w):
        raise VQCoreError(f"mask: size {width}x{height} fits neither the image ({w * factor}x{h * factor}) nor the "
                          f"token grid ({w}x{h})")
    if mask.shape[0] not in (1, batch):
        raise VQCoreError(f"mask: batch of {mask.shape[0]} masks for {batch} images")
    return mask > 0.5


class VQCoreVQDiffusionSampler:
    DESCRIPTION = ("Samples VQ tokens with VQ-Diffusion. Without tokens: text→image. With tokens and a mask: the "
                   "masked region is regenerated and the rest kept exactly (token inpainting). With tokens and "
                   "denoise < 1: the tokens are partly re-noised and refined (img2img). Sends a preview every few "
                   "steps and stops within one step when the queue is cancelled.")
    CATEGORY = "vqcore/vq_diffusion"
    RETURN_TYPES = ("VQ_TOKENS",)
    RETURN_NAMES = ("tokens",)
    OUTPUT_TOOLTIPS = ("Sampled codebook indices; decode them with VQ Decode and the checkpoint's VQ-VAE.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("VQ_DIFFUSION_MODEL", {"tooltip": "From Load VQ-Diffusion Checkpoint (or Truncation)."}),
            "positive": ("VQ_CONDITIONING", {"tooltip": "The prompt's embeddings."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                             "tooltip": "Seed of every random draw."}),
            "steps": ("INT", {"default": SCHEDULE_LENGTH, "min": 1, "max": SCHEDULE_LENGTH,
                              "tooltip": f"How many timesteps to run, at most the schedule's {SCHEDULE_LENGTH}. "
                                         "standard: ignored (every timestep runs). fast and purity: this many, "
                                         "spread over the schedule. last_steps: the last this many (with tokens, "
                                         "also how much is re-noised)."}),
            "guidance": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                   "tooltip": "Classifier-free guidance scale; 1 or less turns guidance off."}),
            "sampling_mode": (list(MODES), {
                "default": "standard",
                "tooltip": "standard: every timestep (as diffusers). fast: `steps` timesteps spread over the "
                           "schedule. last_steps: only the last `steps` timesteps, one at a time (what diffusers "
                           "runs for num_inference_steps = steps; with tokens, steps sets how much is re-noised and "
                           "denoise stays 1). purity: unmask the most confident positions first (Improved "
                           "VQ-Diffusion)."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per prompt."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                  "tooltip": "With tokens: how much of the schedule to run again (1: all; lower "
                                             "keeps more of the given tokens). Ignored without tokens."}),
        }, "optional": {
            "negative": ("VQ_CONDITIONING", {"tooltip": "Negative prompt; without it the model's learned null "
                                                        "embeddings (or the empty prompt) are used."}),
            "tokens": ("VQ_TOKENS", {"tooltip": "Tokens to start from (VQ Encode with the checkpoint's VQ-VAE): "
                                                "inpainting with a mask, img2img with denoise < 1."}),
            "mask": ("MASK", {"tooltip": "Region to regenerate (needs tokens), at image size or token-grid size."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def sample(self, model, positive, seed, steps, guidance, sampling_mode, batch_size, denoise=1.0,
               negative=None, tokens=None, mask=None, unique_id=None):
        model = diffusion_model(model, "model")
        transformer, vq = model.transformer, model.vq
        prompt = conditioning(positive, model, "positive")
        negative_embeddings = self.negative(model, negative, prompt.shape[0], guidance)
        batch = prompt.shape[0] * batch_size
        grid = (transformer.height, transformer.width)
        init, region = None, None
        if tokens is not None:
            init = compute.check_tokens(tokens, vq, "tokens")
            if tuple(init.shape[1:]) != grid or init.shape[0] not in (1, batch):
                raise VQCoreError(f"tokens: a {init.shape[2]}x{init.shape[1]} grid (batch {init.shape[0]}) does not fit "
                                  f"the model's {grid[1]}x{grid[0]} token grid for {batch} images")
            if mask is not None:
                region = token_mask(mask, grid, vq.model.downscale_factor, batch)
        elif mask is not None:
            raise VQCoreError("mask: a mask needs tokens to start from (connect VQ Encode's tokens)")
        if sampling_mode == "last_steps" and init is not None and denoise != 1:
            raise VQCoreError(f"denoise: sampling_mode last_steps re-noises the tokens to timestep steps - 1, so steps "
                              f"sets how much is regenerated; leave denoise at 1 (got {denoise})")
        total_steps = model.scheduler.num_train_timesteps
        if sampling_mode != "standard" and steps > total_steps:
            raise VQCoreError(f"steps: at most {total_steps} (the schedule's length) for this model; got {steps}")

        host.load_models([model.patcher, vq.patcher], sampler_bytes(transformer, batch))
        pbar = host.progress_bar(total_steps if sampling_mode == "standard" else steps, unique_id)
        preview_size = host.preview_max_size()  # None: the user turned previews off
        preview = Previewer(vq, preview_size) if preview_size else None

        def callback(step, total, current, x0_estimate):
            every = max(1, total // PREVIEWS_PER_RUN)
            due = preview is not None and ((step + 1) % every == 0 or step + 1 == total)
            pbar.update_absolute(step + 1, total, preview(x0_estimate) if due else None)

        start = time.perf_counter()
        with torch.inference_mode(), compute.input_errors("model"):
            indices = sample(
                transformer, model.scheduler, prompt, negative_embeddings, num_images_per_prompt=batch_size,
                steps=None if sampling_mode == "standard" else steps, guidance_scale=float(guidance),
                truncation_rate=model.truncation_rate, mode=sampling_mode, seed=seed,
                init_tokens=init, mask=region, strength=float(denoise) if init is not None else 1.0,
                prior_rule=model.prior_rule, prior_weight=model.prior_weight, callback=callback,
                should_cancel=compute.interrupted).cpu()
        ran = pbar.total
        ui = {"vqcore_sampler": ui_payloads.sampler(ran, time.perf_counter() - start, sampling_mode),
              "vqcore_tokens": ui_payloads.token_usage(indices, vq.model.num_embeddings)}
        return {"ui": ui, "result": (compute.make_tokens(indices, vq),)}

    @staticmethod
    def negative(model, negative, prompts, guidance):
        if guidance <= 1:
            return None
        if negative is not None:
            return conditioning(negative, model, "negative")
        if model.null_embeddings is not None:
            return model.null_embeddings
        return model.clip.encode([""] * prompts)


class Previewer:
    """JPEG previews of the sampler's current x0 estimate: the first image decoded with the pipeline's VQ-VAE."""

    def __init__(self, vq, max_size):
        self.vq, self.max_size = vq, max_size

    def __call__(self, x0_estimate):
        model = self.vq.model
        with torch.inference_mode():
            image = model.decode_indices(x0_estimate[:1].to(model.device))[0].float()
        pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return ("JPEG", Image.fromarray(pixels), self.max_size)


NODES = {
    "VQCoreLoadVQDiffusion": (VQCoreLoadVQDiffusion, "Load VQ-Diffusion Checkpoint"),
    "VQCoreCLIPTextEncode": (VQCoreCLIPTextEncode, "CLIP Text Encode (VQ-Diffusion)"),
    "VQCoreVQDiffusionSampler": (VQCoreVQDiffusionSampler, "VQ-Diffusion Sampler"),
    "VQCoreTruncation": (VQCoreTruncation, "Truncation"),
}
