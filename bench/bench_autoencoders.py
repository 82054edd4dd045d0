"""Wall time of vqcore's autoencoders against diffusers' at 512x512 (fp32), in one process, same random weights.

    python bench/bench_autoencoders.py [--repeats 5] [--size 512] [--threads N]

vqcore decodes twice: on its exact path (the default: diffusers' bits) and on its fast path (vqcore.use_fast_path:
channels-last maps, upsampling as a transposed convolution, torch's channels-last GroupNorm checked for cancellation;
what the ComfyUI nodes and the command line use). Encoding has one path (the fast path encodes on the exact one).
Prints the median wall time of each, the ratio vqcore / diffusers (below 1 means vqcore is faster), the ratio fast /
exact and the largest difference from diffusers' output; for the ithq decode also each side's difference from a
float64 decode. Every benchmark runs twice: on the machine as it is, and while a second process (started and stopped
here) keeps one core busy with a CPU-bound loop. All run under torch.inference_mode(), in turn, so that changing
machine load hits them alike.
"""

import argparse
import copy
import contextlib
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusers  # noqa: E402  (the reference; test/bench-only dependency)

from vqcore.autoencoder import use_fast_path  # noqa: E402
from vqcore.autoencoder_kl import AutoencoderKL  # noqa: E402
from vqcore.vq_model import VQModel  # noqa: E402

D, AD, U, AU = "DownEncoderBlock2D", "AttnDownEncoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"
SD_KL = dict(block_out_channels=[128, 256, 512, 512], down_block_types=[D] * 4, up_block_types=[U] * 4,
             layers_per_block=2, latent_channels=4, sample_size=512)
ITHQ_VQ = dict(block_out_channels=[64, 128, 256, 512], down_block_types=[D, D, D, AD], up_block_types=[AU, U, U, U],
               layers_per_block=2, latent_channels=256, vq_embed_dim=128, num_vq_embeddings=4096, sample_size=32)


def model_sides(reference_cls, our_cls, config, seed):
    """diffusers' model and vqcore's on its exact and on its fast path, with the same weights."""
    torch.manual_seed(seed)
    reference = reference_cls(**config).eval()
    with torch.no_grad():  # a codebook on the scale of the latents, so that quantization is not degenerate
        for name, param in reference.named_parameters():
            if "embedding" in name:
                param.normal_()
    exact = our_cls.from_config(dict(reference.config))
    exact.load_state_dict(reference.state_dict(), strict=True)
    return reference, exact.eval(), use_fast_path(copy.deepcopy(exact))


def timed(run):
    wall, cpu = time.perf_counter(), time.process_time()
    out = run()
    return out, time.perf_counter() - wall, time.process_time() - cpu


@contextlib.contextmanager
def one_core_busy(enabled):
    """While enabled, a second Python process spins on one core."""
    if not enabled:
        yield
        return
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it start spinning
        yield
    finally:
        spinner.kill()
        spinner.wait()


def compare(label, runs_by_side, repeats):
    """runs_by_side: {"exact": f, "diffusers": f} and, for decodes, "fast": f. Runs them in turn `repeats` times, on
    the machine as it is and then with one core busy; prints each vqcore side's median wall time, its ratio to diffusers', the ratio of
    process CPU times (steadier on a shared machine), the largest output difference, and fast / exact.
    Returns {(side, condition): ratio to diffusers}."""
    ratios = {}
    for busy in (False, True):
        condition = "one core busy" if busy else "as is"
        with one_core_busy(busy):
            ratios.update({(side, condition): r for side, r in
                           compare_once(f"{label} ({condition})", runs_by_side, repeats).items()})
    return ratios


def compare_once(label, runs_by_side, repeats):
    results = {side: [] for side in runs_by_side}
    for _ in range(repeats):
        for side, run in runs_by_side.items():
            results[side].append(timed(run))
    wall = {side: statistics.median(r[1] for r in runs) for side, runs in results.items()}
    cpu = {side: statistics.median(r[2] for r in runs) for side, runs in results.items()}
    reference = results["diffusers"][0][0]
    ratios = {}
    for side in [s for s in ("exact", "fast") if s in runs_by_side]:
        diff = (results[side][0][0] - reference).abs().max().item()
        ratios[side] = wall[side] / wall["diffusers"]
        print(f"{label:<36} {side:5s} vqcore {wall[side]:6.2f} s  diffusers {wall['diffusers']:6.2f} s  "
              f"ratio {ratios[side]:4.2f}  (CPU-time ratio {cpu[side] / cpu['diffusers']:4.2f})  max|diff| {diff:.1e}",
              flush=True)
    if "fast" in wall:
        print(f"{label:<36} fast / exact {wall['fast'] / wall['exact']:4.2f}"
              + ("  (fast path SLOWER)" if wall["fast"] > wall["exact"] else ""), flush=True)
    return ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {args.threads} threads, fp32 CPU, "
          f"{args.size}x{args.size}, median of {args.repeats}", flush=True)
    image = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ratios = {}
    with torch.inference_mode():
        reference, exact, fast = model_sides(diffusers.AutoencoderKL, AutoencoderKL, SD_KL, seed=0)
        latents = reference.encode(image).latent_dist.mode()
        ratios["SD KL encode"] = compare("SD KL VAE encode", {
            "exact": lambda: exact.encode(image).mean,
            "diffusers": lambda: reference.encode(image).latent_dist.mean}, args.repeats)
        ratios["SD KL decode"] = compare("SD KL VAE decode", {
            "exact": lambda: exact.decode(latents), "fast": lambda: fast.decode(latents),
            "diffusers": lambda: reference.decode(latents).sample}, args.repeats)
        del reference, exact, fast

        reference, exact, fast = model_sides(diffusers.VQModel, VQModel, ITHQ_VQ, seed=1)
        latents = reference.encode(image).latents
        ratios["ithq VQ encode"] = compare("ithq VQ-VAE encode", {
            "exact": lambda: exact.encode(image),
            "diffusers": lambda: reference.encode(image).latents}, args.repeats)
        ratios["ithq VQ decode"] = compare("ithq VQ-VAE decode", {
            "exact": lambda: exact.decode(latents), "fast": lambda: fast.decode(latents),
            "diffusers": lambda: reference.decode(latents).sample}, args.repeats)
        # For scale: how far diffusers' own decode moves when it runs on one thread instead of args.threads.
        torch.set_num_threads(1)
        one_thread = reference.decode(latents).sample
        torch.set_num_threads(args.threads)
        moved = (one_thread - reference.decode(latents).sample).abs().max().item()
        print(f"diffusers' own ithq VQ-VAE decode, 1 vs {args.threads} threads: max|diff| {moved:.1e}")
        # And how far each float32 decode is from the same decode in float64.
        truth = copy.deepcopy(reference).double().decode(latents.double()).sample
        for side, run in (("diffusers", lambda: reference.decode(latents).sample),
                          ("vqcore exact", lambda: exact.decode(latents)), ("vqcore fast", lambda: fast.decode(latents))):
            print(f"ithq VQ-VAE decode, {side} (fp32) vs diffusers in float64: max|diff| "
                  f"{(run().double() - truth).abs().max().item():.1e}")
    for side in ("exact", "fast"):
        for condition in ("as is", "one core busy"):
            print(f"ratios vqcore ({side} path) / diffusers, {condition}: "
                  + ", ".join(f"{k} {v[side, condition]:.2f}" for k, v in ratios.items() if (side, condition) in v))


if __name__ == "__main__":
    main()
