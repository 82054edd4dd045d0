"""VQ-Diffusion nodes: checkpoint loader, text encoder, sampling settings patch and the sampler (text→image, token
inpainting, img2img on tokens)."""

from ..vqcore.errors import VQCoreError
from ..vqcore.sampler import MODES, SEED_MAX
from ..vqcore.truncation import check_rate
from ..vqcore.vq_diffusion import load_vq_diffusion
from . import compute, model_choices, sockets, ui_payloads
from .handles import (
    DTYPE_TOOLTIP,
    DTYPES,
    AutoencoderHandle,
    TextEncoderHandle,
    VQDiffusionHandle,
    checked,
    load_dtype,
)

SCHEDULE_LENGTH = 100  # timesteps of the VQ-Diffusion schedule (every released checkpoint); a model's own is checked


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
        with sockets.input_errors("checkpoint"):
            bundle = load_vq_diffusion(folder, device="cpu", dtype=load_dtype(dtype))
        vq = AutoencoderHandle(bundle.vqvae, f"{checkpoint}/vqvae")
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
        clip = checked(clip, TextEncoderHandle, "clip")
        if not isinstance(text, str):
            raise VQCoreError(f"text: expected a string; got {type(text).__name__}")
        with sockets.input_errors("text"):
            embeddings = compute.encode_text(clip, [text])
        return (sockets.make_conditioning(embeddings, [text]),)


class VQCoreTruncation:
    DESCRIPTION = ("Sets the sampler's truncation and purity prior, on a copy of the model (the input model is "
                   "unchanged, like ComfyUI's model-patch nodes). Truncation, in every sampling mode: each token keeps "
                   "the most likely codes whose probabilities add up to the rate. Purity prior, in the 'purity' mode "
                   "only: which masked positions are unmasked first and how much their distributions are sharpened.")
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
                                          "tooltip": "Every sampling mode: probability mass kept per token; 1 keeps "
                                                     "every code. 0.86 is the value the ithq model was published "
                                                     "with."}),
            "purity_prior": (["purity", "uniform"], {
                "default": "purity",
                "tooltip": "purity mode only: which masked positions are unmasked first, by purity (the model's "
                           "confidence) or uniformly at random."}),
            "purity_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.1,
                                        "tooltip": "purity mode only: how much confident positions' distributions "
                                                   "are sharpened (0: not at all)."}),
        }}

    def patch(self, model, truncation_rate, purity_prior="purity", purity_weight=1.0):
        model = checked(model, VQDiffusionHandle, "model")
        with sockets.input_errors("truncation_rate"):
            rate = check_rate(truncation_rate)
        return (model.patched(truncation_rate=rate, prior_rule=purity_prior, prior_weight=float(purity_weight)),)


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
            "model": ("VQ_DIFFUSION_MODEL", {"tooltip": "From Load VQ-Diffusion Checkpoint (or Truncation and Purity "
                                                       "Prior)."}),
            "positive": ("VQ_CONDITIONING", {"tooltip": "The prompt's embeddings."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                             "tooltip": "Seed of every random draw."}),
            "steps": ("INT", {"default": SCHEDULE_LENGTH, "min": 1, "max": SCHEDULE_LENGTH,
                              "tooltip": f"How many timesteps to run, at most the schedule's {SCHEDULE_LENGTH}. "
                                         "standard: ignored (every timestep runs). fast and purity: this many, "
                                         "spread over the schedule. last_steps: the last this many, one at a time "
                                         "(diffusers' schedule for num_inference_steps = steps; with tokens, also "
                                         "how much is re-noised)."}),
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
        model = checked(model, VQDiffusionHandle, "model")
        transformer, vq = model.transformer, model.vq
        width = transformer.config["cross_attention_dim"]
        prompt = sockets.conditioning_embeddings(positive, width, "positive")
        negative_embeddings = self.negative(model, negative, prompt.shape[0], guidance, width)
        batch = prompt.shape[0] * batch_size
        grid = (transformer.height, transformer.width)
        init, region = None, None
        if tokens is not None:
            init = sockets.token_indices(tokens, vq, "tokens")
            if mask is not None:
                region = sockets.token_mask(mask, grid, vq.model.downscale_factor, batch)
        elif mask is not None:
            raise VQCoreError("mask: a mask needs tokens to start from (connect VQ Encode's tokens)")
        indices, ran, seconds = compute.run_sampler(
            model, prompt, negative_embeddings, steps=None if sampling_mode == "standard" else steps,
            mode=sampling_mode, node_id=unique_id, num_images_per_prompt=batch_size, guidance_scale=float(guidance),
            seed=seed, init_tokens=init, mask=region, strength=float(denoise) if init is not None else 1.0)
        ui = {"vqcore_sampler": ui_payloads.sampler(ran, seconds, sampling_mode),
              "vqcore_tokens": ui_payloads.token_usage(indices, vq.model.num_embeddings)}
        return {"ui": ui, "result": (sockets.make_tokens(indices, vq),)}

    @staticmethod
    def negative(model, negative, prompts, guidance, width):
        if guidance <= 1:
            return None
        if negative is not None:
            return sockets.conditioning_embeddings(negative, width, "negative")
        if model.null_embeddings is not None:
            return model.null_embeddings
        return compute.encode_text(model.clip, [""] * prompts)


NODES = {
    "VQCoreLoadVQDiffusion": (VQCoreLoadVQDiffusion, "Load VQ-Diffusion Checkpoint"),
    "VQCoreCLIPTextEncode": (VQCoreCLIPTextEncode, "CLIP Text Encode (VQ-Diffusion)"),
    "VQCoreVQDiffusionSampler": (VQCoreVQDiffusionSampler, "VQ-Diffusion Sampler"),
    "VQCoreTruncation": (VQCoreTruncation, "Truncation and Purity Prior"),
}
