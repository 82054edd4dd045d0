"""One VQ-Diffusion denoising step at ithq shapes, vqcore vs diffusers on the same weights.

Shapes: hidden 1408 (16 heads x 88), 4097 classes, 32x32 = 1024 tokens, text 77 x 512, 2 images with guidance
(transformer batch 4), 2 transformer layers instead of 36. A step is: transformer, guidance, truncation 0.86 (the ithq
default), clamp, q_posterior and Gumbel sampling, timed phase by phase. Prints each side's median step time and the
median of each phase, the ratio vqcore / diffusers, the load average while timing, and the peak memory of the step
above the resident memory before it (RSS sampled every millisecond, each side in a fresh process so neither inherits
the other's allocator state; freed memory is handed back to the system first, so reusing it counts too).

    python bench/bench_vq_diffusion.py [--runs 5] [--threads 2]
"""

import argparse
import multiprocessing
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqcore.tiling import MALLOC_TRIM  # noqa: E402  (glibc's malloc_trim, None elsewhere)

CONFIG = dict(num_attention_heads=16, attention_head_dim=88, num_layers=2, cross_attention_dim=512, attention_bias=True,
              sample_size=32, num_vector_embeds=4097, activation_fn="geglu-approximate", num_embeds_ada_norm=100,
              norm_type="ada_norm")
IMAGES, GUIDANCE, TRUNCATION, TIMESTEP = 2, 5.0, 0.86, 60


def build(threads):
    """Both sides with the same weights and inputs."""
    from diffusers import Transformer2DModel
    from diffusers import VQDiffusionScheduler as TheirScheduler

    from vqcore.scheduler import VQDiffusionScheduler
    from vqcore.transformer import VQDiffusionTransformer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    theirs = Transformer2DModel(**CONFIG).eval()
    ours = VQDiffusionTransformer.from_config(CONFIG).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    tokens = torch.randint(0, 4097, (IMAGES, 1024))
    tokens[:, ::2] = 4096  # half masked, as mid-way through sampling
    context = torch.nn.functional.normalize(torch.randn(2 * IMAGES, 77, 512), dim=-1)
    return dict(ours=(ours, VQDiffusionScheduler(4097)), diffusers=(theirs, TheirScheduler(4097))), tokens, context


def phases_ours(parts, tokens, context):
    """(name, function of the previous phase's result) pairs; the last one returns the sampled tokens.
    The same calls as vqcore.sampler's step (predict_x0, then scheduler.step)."""
    from vqcore.sampler import LOG_FLOOR, combine_guidance
    from vqcore.scheduler import gumbel_argmax
    from vqcore.truncation import truncate

    transformer, scheduler = parts
    return [
        ("transformer", lambda _: transformer(tokens, context, torch.tensor(TIMESTEP))),
        ("guidance", lambda log_p: combine_guidance(log_p, GUIDANCE)),
        ("truncation", lambda log_p: truncate(log_p, TRUNCATION, fill_value=LOG_FLOOR).clamp_(min=LOG_FLOOR)),
        ("q_posterior", lambda log_p: scheduler.q_posterior(log_p, tokens, TIMESTEP)),
        ("gumbel sample", lambda log_p: gumbel_argmax(log_p, torch.Generator().manual_seed(0))),
    ]


def phases_diffusers(parts, tokens, context):
    """The body of VQDiffusionPipeline.__call__'s loop, with scheduler.step split into its two parts."""
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import VQDiffusionPipeline
    from diffusers.schedulers.scheduling_vq_diffusion import gumbel_noised

    transformer, scheduler = parts
    t = torch.tensor(TIMESTEP)

    def guidance(out):
        uncond, text = out.chunk(2)
        out = uncond + GUIDANCE * (text - uncond)
        out -= torch.logsumexp(out, dim=1, keepdim=True)
        return out

    return [
        ("transformer", lambda _: transformer(torch.cat([tokens] * 2), encoder_hidden_states=context, timestep=t).sample),
        ("guidance", guidance),
        ("truncation", lambda out: VQDiffusionPipeline.truncate(None, out, TRUNCATION).clamp(-70)),
        ("q_posterior", lambda out: scheduler.q_posterior(out, tokens, t)),
        ("gumbel sample", lambda log_p: gumbel_noised(log_p, torch.Generator().manual_seed(0)).argmax(dim=1)),
    ]


PHASES = dict(ours=phases_ours, diffusers=phases_diffusers)


def run_step(side, parts, tokens, context, timings=None):
    """One step; appends each phase's seconds to timings[name] when given. Returns the sampled tokens."""
    result = None
    with torch.no_grad():
        for name, phase in PHASES[side](parts, tokens, context):
            started = time.perf_counter()
            result = phase(result)
            if timings is not None:
                timings.setdefault(name, []).append(time.perf_counter() - started)
    return result


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_memory(side, threads, queue):
    """Child process: one warm-up step, then the peak RSS above the level before the measured step."""
    models, tokens, context = build(threads)
    parts = models[side]
    del models
    run_step(side, parts, tokens, context)
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)
    baseline = peak = rss_bytes()
    done = threading.Event()

    def watch():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    run_step(side, parts, tokens, context)
    done.set()
    watcher.join()
    queue.put(peak - baseline)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    models, tokens, context = build(args.threads)
    assert torch.equal(*(run_step(side, models[side], tokens, context) for side in PHASES)), \
        "the two steps sample different tokens"
    times, phase_times, loads = {side: [] for side in PHASES}, {side: {} for side in PHASES}, []
    for _ in range(args.runs):  # alternate the sides so that machine load affects both alike
        loads.append(os.getloadavg()[0])
        for side in PHASES:
            started = time.perf_counter()
            run_step(side, models[side], tokens, context, phase_times[side])
            times[side].append(time.perf_counter() - started)
    del models

    spawn = multiprocessing.get_context("spawn")
    memory = {}
    for side in PHASES:
        queue = spawn.Queue()
        child = spawn.Process(target=peak_memory, args=(side, args.threads, queue))
        child.start()
        memory[side] = queue.get()
        child.join()

    median = {side: statistics.median(values) for side, values in times.items()}
    print(f"one step at ithq shapes, 2 layers, {IMAGES} images with guidance, {args.threads} threads, {args.runs} runs "
          f"each; 1-minute load average {min(loads):.1f}..{max(loads):.1f} on {os.cpu_count()} CPUs while timing")
    for side in PHASES:
        runs = ", ".join(f"{v:.2f}" for v in times[side])
        print(f"  {side:9s} median {median[side]:6.2f} s  (runs: {runs})  peak step memory {memory[side] / 2**20:7.0f} MiB")
    print(f"  median per phase, s {'ours':>10s} {'diffusers':>10s} {'ratio':>7s}")
    for name in phase_times["ours"]:
        ours, theirs = (statistics.median(phase_times[side][name]) for side in PHASES)
        print(f"    {name:17s} {ours:10.3f} {theirs:10.3f} {ours / theirs:7.2f}")
    print(f"  time ratio vqcore / diffusers:   {median['ours'] / median['diffusers']:.2f}")
    print(f"  memory ratio vqcore / diffusers: {memory['ours'] / memory['diffusers']:.2f}")


if __name__ == "__main__":
    main()
