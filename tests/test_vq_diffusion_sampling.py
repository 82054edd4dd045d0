"""Truncation, respaced timesteps, the last-steps schedule, the purity prior, token inpainting, callbacks and cancellation."""

import pytest
import torch

from vqcore.errors import VQCoreError
from vqcore.sampler import SamplingCancelled, sample
from vqcore.scheduler import VQDiffusionScheduler
from vqcore.transformer import VQDiffusionTransformer
from vqcore.truncation import truncate

CLASSES = 17
GRID = 4


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    model = VQDiffusionTransformer(num_attention_heads=2, attention_head_dim=8, num_layers=1, cross_attention_dim=8,
                                   attention_bias=True, sample_size=GRID, num_vector_embeds=CLASSES,
                                   activation_fn="geglu-approximate", num_embeds_ada_norm=20)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.4)
    return model.eval()


@pytest.fixture(scope="module")
def scheduler():
    return VQDiffusionScheduler(CLASSES, num_train_timesteps=20)


@pytest.fixture(scope="module")
def prompts():
    torch.manual_seed(1)
    return torch.randn(2, 5, 8), torch.randn(5, 8)


def run(transformer, scheduler, prompts, **options):
    cond, null = prompts
    options = dict(dict(guidance_scale=3.0, truncation_rate=0.9, seed=5), **options)
    return sample(transformer, scheduler, cond, null, **options)


def reference_pipeline():
    """diffusers' VQDiffusionPipeline (its truncate is the reference), or a skip without diffusers."""
    return pytest.importorskip("diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion").VQDiffusionPipeline


@pytest.mark.parametrize("rate", [0.05, 0.5, 0.9, 0.999])
def test_truncation_keeps_diffusers_classes(rate):
    VQDiffusionPipeline = reference_pipeline()
    torch.manual_seed(2)
    log_p = torch.log_softmax(torch.randn(3, 300, 50) * 3, dim=1)
    log_p[0, :20, :5] = log_p[0, 20, 0]  # exact ties across the cut
    assert torch.equal(truncate(log_p, rate), VQDiffusionPipeline.truncate(None, log_p, rate))


@pytest.mark.parametrize("rate", [0.3, 0.86])
def test_truncation_keeps_diffusers_classes_at_ties_in_long_rows(rate):
    """With 4096 classes torch.sort orders equal values unstably; where the cut falls inside a run of equal values
    the kept ones must still be diffusers'. Half the values are rounded so that such runs are common."""
    VQDiffusionPipeline = reference_pipeline()
    torch.manual_seed(4)
    log_p = torch.log_softmax(torch.randn(2, 4096, 64) * 0.5, dim=1)
    log_p = torch.where(torch.rand_like(log_p) < 0.5, (log_p * 64).round() / 64, log_p)
    class_last = log_p.transpose(1, 2).contiguous().transpose(1, 2)  # the transformer's layout
    before = class_last.clone()
    expected = VQDiffusionPipeline.truncate(None, log_p, rate)
    assert torch.equal(truncate(class_last, rate), expected)
    assert torch.equal(truncate(log_p, rate), expected)
    assert torch.equal(class_last, before)  # the input is left as it was


def test_truncation_rate_one_keeps_every_class():
    torch.manual_seed(3)
    log_p = torch.log_softmax(torch.randn(2, 4096, 64) * 2, dim=1)
    kept = truncate(log_p, 1.0)
    assert torch.isfinite(kept).all() and torch.equal(kept, log_p)
    assert torch.isinf(truncate(log_p, 0.999)).any()


def test_respaced_timesteps_cover_the_whole_schedule(scheduler):
    assert scheduler.timesteps(20) == list(range(19, -1, -1))
    assert scheduler.timesteps(5) == [19, 14, 10, 5, 0]
    assert scheduler.timesteps(1) == [19]
    assert scheduler.timesteps(4, start=9) == [9, 6, 3, 0]
    # the jump 19 -> 14 is the product of the five single-step transitions (in probability space)
    a, b, c = (float(v.exp()) for v in scheduler.transition_logs(19, 14))
    single = torch.zeros(CLASSES, CLASSES, dtype=torch.float64)
    product = torch.eye(CLASSES, dtype=torch.float64)
    for t in range(15, 20):
        at, bt, ct = (float(v[t].exp()) for v in (scheduler.log_at, scheduler.log_bt, scheduler.log_ct))
        single[:-1, :-1] = bt
        single[:-1, :-1] += torch.eye(CLASSES - 1, dtype=torch.float64) * at
        single[:-1, -1], single[-1, :] = ct, 0
        single[-1, -1] = 1
        product = product @ single
    assert product[0, 0].item() == pytest.approx(a + b, rel=1e-5)
    assert product[0, 1].item() == pytest.approx(b, rel=1e-5)
    assert product[0, -1].item() == pytest.approx(c, rel=1e-5)


def test_fast_mode_with_every_step_is_standard(transformer, scheduler, prompts):
    standard = run(transformer, scheduler, prompts, mode="standard")
    fast = run(transformer, scheduler, prompts, mode="fast", steps=20)
    assert torch.equal(standard, fast)
    few = run(transformer, scheduler, prompts, mode="fast", steps=4)
    assert few.shape == (2, GRID, GRID) and (few < CLASSES - 1).all()


def test_last_steps_mode_runs_the_end_of_the_schedule(transformer, scheduler, prompts):
    assert scheduler.last_timesteps(5) == [4, 3, 2, 1, 0] and scheduler.last_timesteps(1) == [0]
    assert torch.equal(run(transformer, scheduler, prompts, mode="last_steps", steps=20),
                       run(transformer, scheduler, prompts, mode="standard"))
    seen = []
    few = run(transformer, scheduler, prompts, mode="last_steps", steps=5, callback=lambda i, n, s, x0: seen.append(n))
    assert seen == [5] * 5 and (few < CLASSES - 1).all()
    assert not torch.equal(few, run(transformer, scheduler, prompts, mode="fast", steps=5))
    init = torch.randint(0, CLASSES - 1, (2, GRID, GRID), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(GRID, GRID, dtype=torch.bool)
    mask[:2] = True
    inpainted = run(transformer, scheduler, prompts, init_tokens=init, mask=mask, mode="last_steps", steps=8)
    assert torch.equal(inpainted[:, ~mask], init[:, ~mask])


@pytest.mark.parametrize("options, culprit", [
    (dict(steps=0), "steps"), (dict(steps=21), "steps"), (dict(steps=2.5), "steps"),
    (dict(steps=4, strength=0.5, init_tokens=torch.zeros(1, GRID, GRID, dtype=torch.long)), "strength"),
])
def test_last_steps_mode_bad_options(transformer, scheduler, prompts, options, culprit):
    with pytest.raises(VQCoreError, match=culprit):
        run(transformer, scheduler, prompts, mode="last_steps", **options)


def test_purity_prior_unmasks_confident_positions_first(scheduler):
    """A stand-in transformer: half the positions get a sharp p(x0), the other half a flat one."""

    class Confident(torch.nn.Module):
        height = width = GRID
        num_vector_embeds, num_timesteps, dtype, device = CLASSES, 20, torch.float32, torch.device("cpu")

        def forward(self, tokens, context, t):
            logits = torch.zeros(context.shape[0], CLASSES - 1, GRID * GRID)
            logits[:, 3, ::2] = 12.0  # even positions: almost surely class 3
            return torch.log_softmax(logits, dim=1)

    order = []
    tokens = sample(Confident(), scheduler, torch.zeros(1, 5, 8), guidance_scale=1.0, mode="purity", steps=8, seed=0,
                    prior_weight=1.0, callback=lambda i, n, s, x0: order.append(s.flatten() != CLASSES - 1))
    first = order[0]
    assert 0 < first.sum() < GRID * GRID // 2
    assert first[0::2].sum() == first.sum()  # every position unmasked first is a confident one
    assert all((later >= earlier).all() for earlier, later in zip(order, order[1:]))  # unmasked tokens stay
    assert (tokens.flatten()[0::2] == 3).all()
    uniform = []
    sample(Confident(), scheduler, torch.zeros(1, 5, 8), guidance_scale=1.0, mode="purity", steps=8, seed=0,
           prior_rule="uniform", callback=lambda i, n, s, x0: uniform.append(s.flatten() != CLASSES - 1))
    assert uniform[0][1::2].any()


@pytest.mark.parametrize("mode", ["standard", "fast", "purity"])
def test_inpainting_keeps_tokens_outside_the_mask(transformer, scheduler, prompts, mode):
    init = torch.randint(0, CLASSES - 1, (4, GRID, GRID), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(GRID, GRID, dtype=torch.bool)
    mask[1:3, :2] = True
    steps = None if mode == "standard" else 6
    out = run(transformer, scheduler, prompts, num_images_per_prompt=2, init_tokens=init, mask=mask, mode=mode, steps=steps)
    assert torch.equal(out[:, ~mask], init[:, ~mask])
    assert not torch.equal(out[:, mask], init[:, mask])
    assert (out < CLASSES - 1).all()
    steps_run = []
    partial = run(transformer, scheduler, prompts, num_images_per_prompt=2, init_tokens=init, strength=0.3, mode=mode,
                  steps=None if mode == "standard" else 3, callback=lambda i, n, s, x0: steps_run.append(n))
    # strength 0.3 of 20 timesteps starts at timestep 5: six steps in the full schedule
    assert steps_run[0] == (6 if mode == "standard" else 3) and partial.shape == init.shape


def test_callback_and_cancel(transformer, scheduler, prompts):
    seen = []
    run(transformer, scheduler, prompts, mode="fast", steps=3,
        callback=lambda i, n, s, x0: seen.append((i, n, tuple(s.shape), tuple(x0.shape))))
    assert seen == [(i, 3, (2, GRID, GRID), (2, GRID, GRID)) for i in range(3)]
    calls = []
    with pytest.raises(SamplingCancelled):
        run(transformer, scheduler, prompts, should_cancel=lambda: calls.append(1) or len(calls) > 2)
    assert len(calls) == 3


def test_per_sample_timesteps_match_a_shared_timestep(transformer):
    tokens = torch.randint(0, CLASSES, (2, GRID * GRID), generator=torch.Generator().manual_seed(4))
    context = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        shared = transformer(tokens, context, torch.tensor(7))
        per_sample = transformer(tokens, context, torch.tensor([7, 7]))
        mixed = transformer(tokens, context, torch.tensor([7, 12]))
    assert (shared - per_sample).abs().max() <= 1e-5
    assert (mixed[0] - shared[0]).abs().max() <= 1e-5 and not torch.allclose(mixed[1], shared[1])
