"""vqcore's VQ-Diffusion against diffusers' VQDiffusionPipeline on the same tiny random weights, saved in the ithq
folder layout and loaded back through load_vq_diffusion."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from vqcore.scheduler import VQDiffusionScheduler
from vqcore.truncation import truncate
from vqcore.transformer import VQDiffusionTransformer
from vqcore.vq_diffusion import NULL_EMBEDDINGS, load_vq_diffusion

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (  # noqa: E402
    LearnedClassifierFreeSamplingEmbeddings,
    VQDiffusionPipeline,
)

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "clip_tokenizer"
PROMPTS = ["a red cube on a table", "two cats"]
STEPS = 10  # the tiny schedule has 10 timesteps, so diffusers' 10 steps are the full schedule
CLASSES = 33  # 32 codebook entries + [MASK]


def tiny_transformer(classes, sample_size, layers, heads, head_dim, context_dim, timesteps):
    model = diffusers.Transformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers, cross_attention_dim=context_dim,
        attention_bias=True, sample_size=sample_size, num_vector_embeds=classes, activation_fn="geglu-approximate",
        num_embeds_ada_norm=timesteps, norm_type="ada_norm",
    )
    for parameter in model.parameters():  # peaked predictions, so truncation and guidance matter
        torch.nn.init.normal_(parameter, std=0.3)
    return model.eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    if not (TOKENIZER / "vocab.json").is_file():
        pytest.skip(f"CLIP tokenizer fixture missing: {TOKENIZER}")
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer(str(TOKENIZER / "vocab.json"), str(TOKENIZER / "merges.txt"), model_max_length=77, pad_token="!")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=0, hidden_act="quick_gelu",
    )).eval()
    vqvae = diffusers.VQModel(
        block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=8, vq_embed_dim=4,
        num_vq_embeddings=CLASSES - 1, norm_num_groups=8, sample_size=16,
    ).eval()
    transformer = tiny_transformer(CLASSES, 4, 2, 2, 8, 32, STEPS)
    scheduler = diffusers.VQDiffusionScheduler(CLASSES, num_train_timesteps=STEPS)
    folder = tmp_path_factory.mktemp("vq-diffusion-tiny")
    vqvae.save_pretrained(folder / "vqvae")
    transformer.save_pretrained(folder / "transformer")
    config = json.loads((folder / "transformer/config.json").read_text())
    del config["norm_type"]  # as in the ithq checkpoint
    (folder / "transformer/config.json").write_text(json.dumps(config))
    text_encoder.save_pretrained(folder / "text_encoder")
    (folder / "tokenizer").mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER / name, folder / "tokenizer" / name)
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "VQDiffusionPipeline"}))
    return folder, dict(vqvae=vqvae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, scheduler=scheduler)


def with_null_embeddings(folder, learnable):
    null = LearnedClassifierFreeSamplingEmbeddings(learnable, hidden_size=32, length=77)
    if learnable:
        torch.nn.init.normal_(null.embeddings, std=0.2)
    shutil.rmtree(folder / NULL_EMBEDDINGS, ignore_errors=True)
    null.save_pretrained(folder / NULL_EMBEDDINGS)
    return null


def record_outputs(module, store):
    return module.register_forward_hook(lambda _m, _args, out: store.append((out.sample if hasattr(out, "sample") else out).clone()))


@pytest.mark.parametrize("learnable", [True, False], ids=["learned-null", "empty-prompt-null"])
def test_pipeline_matches_diffusers(reference, learnable):
    folder, components = reference
    null = with_null_embeddings(folder, learnable)
    pipe = VQDiffusionPipeline(**components, learned_classifier_free_sampling_embeddings=null)
    pipe.set_progress_bar_config(disable=True)
    theirs_steps, theirs_out = [], []
    hook = record_outputs(pipe.transformer, theirs_out)
    theirs = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=5.0, truncation_rate=0.9, num_images_per_prompt=2,
                  generator=torch.Generator().manual_seed(7), output_type="np",
                  callback=lambda i, t, s: theirs_steps.append(s.clone())).images
    hook.remove()

    model = load_vq_diffusion(folder, device="cpu")
    assert (model.null_embeddings is not None) == learnable
    ours_steps, ours_out = [], []
    hook = record_outputs(model.transformer, ours_out)
    tokens = model.generate(PROMPTS, num_images_per_prompt=2, guidance_scale=5.0, truncation_rate=0.9, steps=STEPS,
                            generator=torch.Generator().manual_seed(7),
                            callback=lambda i, n, s, x0: ours_steps.append(s.reshape(s.shape[0], -1).clone()))
    hook.remove()
    images = (model.decode(tokens) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    assert len(ours_out) == len(theirs_out) == STEPS
    log_prob_error = max((a - b).abs().max().item() for a, b in zip(ours_out, theirs_out))
    assert log_prob_error <= 1e-5, f"per-step log p(x0) differ by {log_prob_error}"
    for step, (a, b) in enumerate(zip(ours_steps, theirs_steps)):
        assert torch.equal(a, b), f"tokens differ after step {step}"
    assert tokens.shape == (4, 4, 4)
    assert abs(images - theirs).max() <= 1e-5


def test_one_step_at_ithq_shapes():
    """4097 classes, a 32x32 token grid, 77 text tokens, one image with guidance; a 1-layer narrow transformer."""
    torch.manual_seed(0)
    theirs_model = tiny_transformer(4097, 32, 1, 2, 8, 64, 100)
    ours_model = VQDiffusionTransformer.from_config(dict(theirs_model.config)).eval()
    ours_model.load_state_dict(theirs_model.state_dict(), strict=True)
    theirs_scheduler, ours_scheduler = diffusers.VQDiffusionScheduler(4097), VQDiffusionScheduler(4097)
    tokens = torch.randint(0, 4097, (1, 1024))
    tokens[:, ::3] = 4096
    context = torch.nn.functional.normalize(torch.randn(2, 77, 64), dim=-1)
    t = torch.tensor(60)
    with torch.no_grad():
        theirs = theirs_model(torch.cat([tokens, tokens]), encoder_hidden_states=context, timestep=t).sample
        ours = ours_model(tokens, context, t)
    assert (ours - theirs).abs().max().item() <= 1e-5
    uncond, text = theirs.chunk(2)
    log_p = uncond + 5.0 * (text - uncond)
    log_p -= torch.logsumexp(log_p, dim=1, keepdim=True)
    theirs_truncated = VQDiffusionPipeline.truncate(None, log_p, 0.9).clamp(-70)
    ours_truncated = truncate(log_p, 0.9, fill_value=-70.0).clamp_(min=-70)
    assert torch.equal(ours_truncated, theirs_truncated)
    theirs_posterior = theirs_scheduler.q_posterior(theirs_truncated, tokens, t)
    ours_posterior = ours_scheduler.q_posterior(theirs_truncated, tokens, int(t))
    assert (ours_posterior - theirs_posterior).abs().max().item() <= 1e-5
    theirs_next = theirs_scheduler.step(theirs_truncated, t, tokens, generator=torch.Generator().manual_seed(3)).prev_sample
    ours_next = ours_scheduler.step(theirs_truncated, int(t), tokens, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours_next, theirs_next)


@pytest.mark.parametrize("steps", [1, 4, 9])
def test_last_steps_mode_is_diffusers_num_inference_steps(reference, steps):
    """diffusers' num_inference_steps < T runs timesteps steps - 1 .. 0 of the T-step chain; mode "last_steps" runs
    the same and draws the same noise, so the tokens after every step are identical."""
    folder, components = reference
    null = with_null_embeddings(folder, learnable=True)
    pipe = VQDiffusionPipeline(**components, learned_classifier_free_sampling_embeddings=null)
    pipe.set_progress_bar_config(disable=True)
    theirs_steps = []
    pipe(PROMPTS, num_inference_steps=steps, guidance_scale=5.0, truncation_rate=0.9, num_images_per_prompt=2,
         generator=torch.Generator().manual_seed(11), output_type="np", callback=lambda i, t, s: theirs_steps.append(s.clone()))

    model = load_vq_diffusion(folder, device="cpu")
    ours_steps = []
    tokens = model.generate(PROMPTS, num_images_per_prompt=2, guidance_scale=5.0, truncation_rate=0.9, steps=steps,
                            mode="last_steps", generator=torch.Generator().manual_seed(11),
                            callback=lambda i, n, s, x0: ours_steps.append(s.reshape(s.shape[0], -1).clone()))
    assert len(ours_steps) == len(theirs_steps) == steps
    for step, (a, b) in enumerate(zip(ours_steps, theirs_steps)):
        assert torch.equal(a, b), f"tokens differ after step {step} of {steps}"
    assert torch.equal(tokens.reshape(4, -1), theirs_steps[-1])
    # Runs shorter than the schedule leave a different result from the full run (the test can tell them apart).
    assert steps == STEPS or not torch.equal(tokens, model.generate(
        PROMPTS, num_images_per_prompt=2, guidance_scale=5.0, truncation_rate=0.9, mode="standard",
        generator=torch.Generator().manual_seed(11)))


@pytest.mark.parametrize("steps", [1, 7, 50, 100])
def test_last_timesteps_are_diffusers_timesteps_of_the_ithq_schedule(steps):
    theirs = diffusers.VQDiffusionScheduler(4097, num_train_timesteps=100)
    theirs.set_timesteps(steps)
    assert VQDiffusionScheduler(4097, num_train_timesteps=100).last_timesteps(steps) == theirs.timesteps.tolist()
