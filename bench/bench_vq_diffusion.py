"""One VQ-Diffusion denoising step at ithq shapes, vqcore vs diffusers on the same weights.

Shapes: hidden 1408 (16 heads x 88), 4097 classes, 32x32 = 1024 tokens, text 77 x 512, 2 images with guidance
(transformer batch 4), 2 transformer layers instead of 36. A step is: transformer, guidance, truncation 0.86 (the ithq
default), clamp, q_posterior and Gumbel sampling. Prints the median time of each side, the ratio vqcore / diffusers,
and the peak memory of the step above the resident memory before it (RSS sampled every millisecond, each side in a
fresh process so neither inherits the other's allocator state).

    python bench/bench_vq_diffusion.py [--runs 5] [--threads 2]
"""

import argparse
import multiprocessing
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def step_ours(parts, tokens, context):
    from vqcore.sampler import predict_x0

    transformer, scheduler = parts
    with torch.no_grad():
        log_p = predict_x0(transformer, tokens, context, TIMESTEP, GUIDANCE, TRUNCATION)
        return scheduler.step(log_p, TIMESTEP, tokens, torch.Generator().manual_seed(0))


def step_diffusers(parts, tokens, context):
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import VQDiffusionPipeline

    transformer, scheduler = parts
    t = torch.tensor(TIMESTEP)
    with torch.no_grad():  # the body of VQDiffusionPipeline.__call__'s loop
        out = transformer(torch.cat([tokens] * 2), encoder_hidden_states=context, timestep=t).sample
        uncond, text = out.chunk(2)
        out = uncond + GUIDANCE * (text - uncond)
        out -= torch.logsumexp(out, dim=1, keepdim=True)
        out = VQDiffusionPipeline.truncate(None, out, TRUNCATION).clamp(-70)
        return scheduler.step(out, timestep=t, sample=tokens, generator=torch.Generator().manual_seed(0)).prev_sample


STEPS = dict(ours=step_ours, diffusers=step_diffusers)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_memory(side, threads, queue):
    """Child process: one warm-up step, then the peak RSS above the level before the measured step."""
    models, tokens, context = build(threads)
    parts = models[side]
    del models
    STEPS[side](parts, tokens, context)
    baseline = peak = rss_bytes()
    done = threading.Event()

    def watch():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    STEPS[side](parts, tokens, context)
    done.set()
    watcher.join()
    queue.put(peak - baseline)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    models, tokens, context = build(args.threads)
    assert torch.equal(STEPS["ours"](models["ours"], tokens, context), STEPS["diffusers"](models["diffusers"], tokens, context)), \
        "the two steps sample different tokens"
    times = {side: [] for side in STEPS}
    for _ in range(args.runs):  # alternate the sides so that machine load affects both alike
        for side, step in STEPS.items():
            started = time.perf_counter()
            step(models[side], tokens, context)
            times[side].append(time.perf_counter() - started)
    del models

    context_ = multiprocessing.get_context("spawn")
    memory = {}
    for side in STEPS:
        queue = context_.Queue()
        child = context_.Process(target=peak_memory, args=(side, args.threads, queue))
        child.start()
        memory[side] = queue.get()
        child.join()

    median = {side: statistics.median(values) for side, values in times.items()}
    print(f"one step at ithq shapes, 2 layers, {IMAGES} images with guidance, {args.threads} threads, {args.runs} runs each")
    for side in STEPS:
        runs = ", ".join(f"{v:.2f}" for v in times[side])
        print(f"  {side:9s} median {median[side]:6.2f} s  (runs: {runs})  peak step memory {memory[side] / 2**20:7.0f} MiB")
    print(f"  time ratio vqcore / diffusers:   {median['ours'] / median['diffusers']:.2f}")
    print(f"  memory ratio vqcore / diffusers: {memory['ours'] / memory['diffusers']:.2f}")


if __name__ == "__main__":
    main()
