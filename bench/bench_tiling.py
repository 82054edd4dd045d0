"""Tiled vs full VAE decode: peak memory above baseline and wall time, ours against diffusers.

SD-shaped KL decoder (block_out_channels [128, 256, 512, 512], 2 layers per level, 4 latent channels, random
weights), 128x128 latents -> 1024x1024 image, tile 256 px. Every variant runs in its own subprocess, so its peak
resident memory is its own. Run: python bench/bench_tiling.py [--size 128] [--tile 256] [--threads 2]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["ours-full", "ours-tiled", "diffusers-full", "diffusers-tiled"]
CONFIG = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def memory_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak():
    """Resets VmHWM to the current resident size (Linux >= 4.0); without it the peak so far is the baseline."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def run_variant(variant, size, tile, threads, output_path):
    import torch

    sys.path.insert(0, str(ROOT))
    from vqcore.autoencoder_kl import AutoencoderKL
    from vqcore.tiling import tiled_decode

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = AutoencoderKL(**CONFIG).eval()
    if variant.startswith("diffusers"):
        import diffusers

        reference = diffusers.AutoencoderKL(**CONFIG).eval()
        reference.load_state_dict(model.state_dict(), strict=True)
        model = reference
        reference.tile_sample_min_size, reference.tile_latent_min_size = tile, tile // 8
    latents = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(1))
    decode = {
        "ours-full": lambda: model.decode(latents),
        "ours-tiled": lambda: tiled_decode(model, latents, tile_size=tile),
        "diffusers-full": lambda: model.decode(latents).sample,
        "diffusers-tiled": lambda: model.tiled_decode(latents).sample,
    }[variant]
    reset_peak()
    baseline = memory_kib("VmRSS")
    start = time.perf_counter()
    with torch.inference_mode():
        image = decode()
    seconds = time.perf_counter() - start
    peak = memory_kib("VmHWM") - baseline
    torch.save(image, output_path)
    return {"variant": variant, "seconds": seconds, "peak_mib": peak / 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="latent size (image = 8x)")
    parser.add_argument("--tile", type=int, default=256, help="tile size in pixels")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.size, args.tile, args.threads, args.output)))
        return

    import torch

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for variant in VARIANTS:
            output = os.path.join(folder, variant + ".pt")
            child = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--output", output, "--size", str(args.size),
                 "--tile", str(args.tile), "--threads", str(args.threads)],
                capture_output=True, text=True, check=False,
            )
            if child.returncode:
                sys.exit(f"{variant} failed:\n{child.stderr}")
            results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
            results[variant]["image"] = torch.load(output, weights_only=True)
            print(f"{variant:16s} {results[variant]['seconds']:8.1f} s {results[variant]['peak_mib']:9.0f} MiB",
                  flush=True)

    full = results["ours-full"]["image"]
    print(f"\n{args.size * 8}x{args.size * 8} image, tile {args.tile} px, {args.threads} threads")
    print(f"{'':10s} {'RSS tiled/full':>15s} {'time tiled/full':>16s} {'max |tiled - full| (0..1)':>27s}")
    for name in ("ours", "diffusers"):
        tiled, own_full = results[f"{name}-tiled"], results[f"{name}-full"]
        error = ((tiled["image"] - own_full["image"]) / 2).abs().max().item()
        print(f"{name:10s} {tiled['peak_mib'] / own_full['peak_mib']:15.2f} "
              f"{tiled['seconds'] / own_full['seconds']:16.2f} {error:27.2e}")
    print(f"ours vs diffusers full decode: max |difference| (0..1) "
          f"{((full - results['diffusers-full']['image']) / 2).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
