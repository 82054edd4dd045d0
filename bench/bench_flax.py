"""Wall time of vqcore.flax's decode (jitted) against vqcore's torch decode on its fast and exact paths, SD-shaped KL
VAE to 512x512 (fp32, CPU), in one process, same random weights.

    python bench/bench_flax.py [--repeats 5] [--size 512] [--busy]

The Flax decode is compiled once before the timed runs (jax.jit(...).lower(...).compile(), reported on its own line);
the timed runs call the compiled function and wait for its result. The three sides run in turn `repeats` times, so
that changing machine load hits them alike; prints each side's median wall time, the ratios Flax / exact, Flax / fast
and fast / exact (below 1: the first is faster), each side's largest difference from the exact path, and the load
average before and after. --busy: the timed runs share the machine with a second process that keeps one core busy.
"""

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_autoencoders import SD_KL, one_core_busy, timed  # noqa: E402

from vqcore.autoencoder import use_fast_path  # noqa: E402
from vqcore.autoencoder_kl import AutoencoderKL  # noqa: E402
from vqcore.flax import FlaxAutoencoderKL, params_from_state_dict  # noqa: E402
from vqcore.flax.loading import model_fields  # noqa: E402


def load_average():
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--busy", action="store_true", help="keep one core busy with a second process meanwhile")
    args = parser.parse_args()
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__} "
          f"({jax.devices()[0].platform}), fp32, SD-shaped KL decode to {args.size}x{args.size}, median of "
          f"{args.repeats}{', one core busy' if args.busy else ''}; load average {load_average()}", flush=True)

    torch.manual_seed(0)
    exact = AutoencoderKL(**SD_KL).eval().requires_grad_(False)
    fast = use_fast_path(copy.deepcopy(exact))
    model = FlaxAutoencoderKL(**model_fields(SD_KL))
    params = params_from_state_dict(model, exact.state_dict(), "random weights")
    f = model.downscale_factor
    latents = torch.randn(1, SD_KL["latent_channels"], args.size // f, args.size // f,
                          generator=torch.Generator().manual_seed(1))
    flax_latents = jnp.asarray(latents.numpy())

    decode = jax.jit(lambda params, z: model.apply({"params": params}, z, method=FlaxAutoencoderKL.decode))
    start = time.perf_counter()
    compiled = decode.lower(params, flax_latents).compile()
    print(f"Flax decode: jit compile {time.perf_counter() - start:.2f} s (not in the timings below)", flush=True)

    sides = {
        "flax": lambda: compiled(params, flax_latents).block_until_ready(),
        "fast": lambda: fast.decode(latents),
        "exact": lambda: exact.decode(latents),
    }
    results = {side: [] for side in sides}
    with torch.inference_mode(), one_core_busy(args.busy):
        for _ in range(args.repeats):
            for side, run in sides.items():
                results[side].append(timed(run))
    wall = {side: statistics.median(r[1] for r in runs) for side, runs in results.items()}
    reference = results["exact"][0][0].numpy()
    for side in sides:
        diff = float(np.abs(np.asarray(results[side][0][0]) - reference).max())
        runs = ", ".join(f"{r[1]:.2f}" for r in results[side])
        print(f"{side:5s} decode median {wall[side]:6.2f} s  (runs {runs})  max|diff from exact| {diff:.1e}")
    print(f"ratios: flax / exact {wall['flax'] / wall['exact']:.2f}, flax / fast {wall['flax'] / wall['fast']:.2f}, "
          f"fast / exact {wall['fast'] / wall['exact']:.2f}; load average {load_average()}")


if __name__ == "__main__":
    main()
