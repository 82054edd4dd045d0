"""The VQ-Diffusion reverse process: from [MASK] tokens (or given tokens, partly re-masked) to codebook tokens.

Modes:
* "standard": every timestep of the schedule, as diffusers' VQDiffusionPipeline (same seed -> same tokens).
* "fast": `steps` timesteps spread over the whole schedule; each step jumps to the next timestep with the exact
  multi-step posterior. steps = T is "standard".
* "last_steps": only the last `steps` timesteps of the schedule, steps - 1 down to 0, one timestep at a time, from
  all [MASK]: what diffusers' VQDiffusionPipeline runs for num_inference_steps = steps (same seed -> same tokens).
  steps = T is "standard".
* "purity": the purity prior of Improved VQ-Diffusion (Tang et al. 2022). Each step unmasks as many positions as the
  schedule expects to be unmasked between the two timesteps (masked count times 1 - ctt_prev / ctt_t); which masked
  positions is drawn without replacement with probability proportional to their purity, the largest p(x0) of the
  position (prior_rule "purity"; "uniform" draws them uniformly). Their tokens come from p(x0) sharpened by the
  normalised purity s in [0, 1]: softmax((1 + prior_weight * s) * log p(x0)). Unmasked tokens are never changed, and
  the last step fills every position still masked from p(x0). Works with any `steps`.

Guidance runs both branches in one transformer call with the text batch [negative; prompt] (diffusers' layout), and
combines log p = u + w (c - u), renormalised. Truncation keeps the classes of `truncate` (-70 for the dropped ones).

Token inpainting / img2img: `init_tokens` (B, h, w) are noised to timestep ceil(strength * T) - 1 (steps - 1 in mode
"last_steps", which takes no strength) where `mask` is True (everywhere without a mask) and the reverse process runs
from there; positions outside the mask are put back after
every step, so they come back exactly as given and the model sees them as context throughout.
"""

import math

import numpy as np
import torch

from .errors import Cancelled, VQCoreError
from .scheduler import gumbel_argmax
from .truncation import check_rate, truncate

MODES = ("standard", "fast", "last_steps", "purity")
PRIOR_RULES = ("purity", "uniform")
SEED_MAX = 2**64 - 1
LOG_FLOOR = -70.0  # diffusers and the original clamp log-probabilities here instead of log(0)


class SamplingCancelled(Cancelled):
    """Raised by sample() when should_cancel() returns True."""


def sample(transformer, scheduler, prompt_embeds, negative_embeds=None, *, num_images_per_prompt=1, steps=None,
           guidance_scale=5.0, truncation_rate=1.0, mode="standard", generator=None, seed=None, init_tokens=None,
           mask=None, strength=1.0, prior_rule="purity", prior_weight=1.0, callback=None, should_cancel=None):
    """Samples tokens (P * num_images_per_prompt, h, w) int64 for prompt embeddings (P, L, C).

    negative_embeds: learned null embeddings (L, C) or empty-prompt embeddings (1 or P, L, C); needed when
    guidance_scale > 1 (guidance is off at <= 1, as in diffusers). generator (or seed) drives every random draw.
    callback(step, total, tokens (B, h, w), x0_estimate (B, h, w)) runs after each step; should_cancel() before each
    step (True -> SamplingCancelled).
    """
    device = transformer.device
    height, width = transformer.height, transformer.width
    mask_class = transformer.num_vector_embeds - 1
    T = scheduler.num_train_timesteps
    check_options(mode, prior_rule, prior_weight, guidance_scale, strength, num_images_per_prompt)
    truncation_rate = check_rate(truncation_rate)
    if scheduler.num_embed != transformer.num_vector_embeds or transformer.num_timesteps < T:
        raise VQCoreError(f"scheduler ({scheduler.num_embed} classes, {T} steps) does not match the transformer "
                          f"({transformer.num_vector_embeds} classes, {transformer.num_timesteps} timestep embeddings)")
    if mode == "last_steps":
        timesteps = scheduler.last_timesteps(T if steps is None else steps)
        start = timesteps[0]
    else:
        start = math.ceil(strength * T) - 1
        timesteps = scheduler.timesteps(start + 1 if steps is None else steps, start)
    if mode == "standard" and len(timesteps) != start + 1:
        raise VQCoreError(f"mode 'standard' runs every timestep ({start + 1}); use mode 'fast' (spread over the "
                          f"schedule) or 'last_steps' (diffusers' num_inference_steps) for {steps} steps")
    if generator is None and seed is not None:
        generator = torch.Generator(device).manual_seed(check_seed(seed))

    context = conditioning(prompt_embeds, negative_embeds, num_images_per_prompt, guidance_scale > 1, device, transformer.dtype)
    batch = context.shape[0] // (2 if guidance_scale > 1 else 1)
    if init_tokens is None:
        if mask is not None or strength != 1:
            raise VQCoreError("mask and strength need init_tokens (the tokens to start from)")
        region, known = None, None
        tokens = torch.full((batch, height * width), mask_class, dtype=torch.long, device=device)
    else:
        known, region = start_tokens(init_tokens, mask, batch, height, width, mask_class, device)
        tokens = torch.where(region, scheduler.add_noise(known, start, generator), known)

    with torch.no_grad():
        for index, t in enumerate(timesteps):
            if should_cancel is not None and should_cancel():
                raise SamplingCancelled(f"sampling cancelled before step {index + 1} of {len(timesteps)}")
            prev_t = timesteps[index + 1] if index + 1 < len(timesteps) else -1
            log_p_x0 = predict_x0(transformer, tokens, context, t, guidance_scale, truncation_rate)
            if mode != "purity":
                new_tokens = scheduler.step(log_p_x0, t, tokens, generator, prev_t)
            elif prev_t >= 0:
                new_tokens = purity_step(scheduler, log_p_x0, tokens, t, prev_t, prior_rule, prior_weight, generator)
            else:
                new_tokens = torch.where(tokens == mask_class, gumbel_argmax(log_p_x0, generator), tokens)
            tokens = new_tokens if region is None else torch.where(region, new_tokens, known)
            if callback is not None:
                callback(index, len(timesteps), tokens.view(batch, height, width), log_p_x0.argmax(1).view(batch, height, width))
    return tokens.view(batch, height, width)


def check_options(mode, prior_rule, prior_weight, guidance_scale, strength, num_images_per_prompt):
    if mode not in MODES:
        raise VQCoreError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if prior_rule not in PRIOR_RULES:
        raise VQCoreError(f"prior_rule must be one of {', '.join(PRIOR_RULES)}; got {prior_rule!r}")
    if not prior_weight >= 0:
        raise VQCoreError(f"prior_weight must be >= 0; got {prior_weight!r}")
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
        raise VQCoreError(f"guidance_scale must be a finite number; got {guidance_scale!r}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise VQCoreError(f"strength must be a number in (0, 1]; got {strength!r}")
    if mode == "last_steps" and strength != 1:
        raise VQCoreError(f"strength must be 1 in mode 'last_steps', which starts at timestep steps - 1, so steps alone "
                          f"sets how much of init_tokens is noised again; got {strength!r}")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise VQCoreError(f"num_images_per_prompt must be a positive integer; got {num_images_per_prompt!r}")


def check_seed(seed):
    """Any integer in [0, 2**64 - 1] (ComfyUI's seed widget range; what torch.Generator.manual_seed takes)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= SEED_MAX:
        raise VQCoreError(f"seed must be an integer in [0, 2**64 - 1] (0..{SEED_MAX}); got {seed!r}")
    return int(seed)


def conditioning(prompt_embeds, negative_embeds, num_images, guidance, device, dtype):
    """Text batch for the transformer: prompts repeated per image, preceded by the negatives when guiding."""
    if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3:
        raise VQCoreError(f"prompt embeddings must be a (prompts, tokens, channels) tensor; got "
                          f"{tuple(prompt_embeds.shape) if isinstance(prompt_embeds, torch.Tensor) else type(prompt_embeds).__name__}")
    cond = prompt_embeds.to(device, dtype).repeat_interleave(num_images, dim=0)
    if not guidance:
        return cond
    if negative_embeds is None:
        raise VQCoreError("guidance_scale > 1 needs negative embeddings (learned null embeddings or the empty prompt's)")
    negative = negative_embeds.to(device, dtype)
    negative = negative[None] if negative.ndim == 2 else negative
    if negative.ndim != 3 or negative.shape[1:] != prompt_embeds.shape[1:] or negative.shape[0] not in (1, prompt_embeds.shape[0]):
        raise VQCoreError(f"negative embeddings {tuple(negative_embeds.shape)} do not fit prompt embeddings {tuple(prompt_embeds.shape)}")
    negative = negative.expand(prompt_embeds.shape[0], -1, -1).repeat_interleave(num_images, dim=0)
    return torch.cat([negative, cond])


def start_tokens(init_tokens, mask, batch, height, width, mask_class, device):
    """The given tokens (B, N) and the region to regenerate (B, N) bool, checked against the model's grid."""
    if not isinstance(init_tokens, torch.Tensor) or init_tokens.is_floating_point() or init_tokens.ndim != 3:
        raise VQCoreError(f"init_tokens must be integer tokens (batch, height, width); got "
                          f"{tuple(init_tokens.shape) if isinstance(init_tokens, torch.Tensor) else type(init_tokens).__name__}")
    if init_tokens.shape[1:] != (height, width) or init_tokens.shape[0] not in (1, batch):
        raise VQCoreError(f"init_tokens {tuple(init_tokens.shape)} do not match the model's {height}x{width} token grid "
                          f"for a batch of {batch}")
    low, high = int(init_tokens.min()), int(init_tokens.max())
    if low < 0 or high > mask_class:
        raise VQCoreError(f"init_tokens ids must lie in [0, {mask_class}]; got {low}..{high}")
    known = init_tokens.to(device).expand(batch, -1, -1).reshape(batch, -1)
    if mask is None:
        return known, torch.ones_like(known, dtype=torch.bool)
    mask = torch.as_tensor(mask, device=device)
    mask = mask[None] if mask.ndim == 2 else mask
    if mask.ndim != 3 or mask.shape[1:] != (height, width) or mask.shape[0] not in (1, batch):
        raise VQCoreError(f"mask {tuple(mask.shape)} does not match the {height}x{width} token grid for a batch of {batch}")
    return known, (mask > 0.5 if mask.is_floating_point() else mask.bool()).expand(batch, -1, -1).reshape(batch, -1)


def predict_x0(transformer, tokens, context, t, guidance_scale, truncation_rate):
    """log p(x0 | x_t) (B, K - 1, N) after guidance and truncation, clamped at -70 like diffusers."""
    log_p = transformer(tokens, context, torch.tensor(t, device=tokens.device))
    if guidance_scale > 1:
        log_p = combine_guidance(log_p, guidance_scale)  # frees the transformer output before truncation
    return truncate(log_p, truncation_rate, fill_value=LOG_FLOOR).clamp_(min=LOG_FLOOR)


def combine_guidance(log_p, guidance_scale):
    """[negative; prompt] log-probabilities (2B, K - 1, N) -> u + w (c - u), renormalised, (B, K - 1, N), in place
    in the prompt half. Reductions over the classes run along contiguous memory for the transformer's class-last output."""
    uncond, text = log_p.chunk(2)
    guided = text.sub_(uncond).mul_(guidance_scale).add_(uncond)
    return guided.sub_(torch.logsumexp(guided, dim=1, keepdim=True))


def purity_step(scheduler, log_p_x0, tokens, t, prev_t, prior_rule, prior_weight, generator):
    """Unmasks the schedule's share of the masked positions, chosen by purity; see the module docstring."""
    is_masked = tokens == scheduler.mask_class
    purity = log_p_x0.max(dim=1).values.exp()
    score = purity / (purity.max(dim=1, keepdim=True).values + 1e-10)
    still_masked = float((scheduler.log_cumprod_ct[prev_t] - scheduler.log_cumprod_ct[t]).exp())
    weights = (score if prior_rule == "purity" else torch.ones_like(score)) * is_masked
    sharpened = torch.log_softmax((1 + prior_weight * score[:, None, :]) * log_p_x0, dim=1)
    proposals = gumbel_argmax(sharpened, generator)
    new_tokens = tokens.clone()
    for b, masked in enumerate(is_masked.sum(dim=1).tolist()):
        count = masked - round(masked * still_masked)
        if count > 0:
            chosen = torch.multinomial(weights[b], count, generator=generator)
            new_tokens[b, chosen] = proposals[b, chosen]
    return new_tokens
