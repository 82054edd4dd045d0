"""Wall time of vqcore's autoencoders against diffusers' at 512x512 (fp32), in one process, same random weights.

    python bench/bench_autoencoders.py [--repeats 3] [--size 512] [--threads N]

Prints the median wall time of each side and the ratio vqcore / diffusers (below 1 means vqcore is faster), and the
largest difference between the two outputs. Both sides run under torch.inference_mode(), alternately.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusers  # noqa: E402  (the reference; test/bench-only dependency)

from vqcore.autoencoder_kl import AutoencoderKL  # noqa: E402
from vqcore.vq_model import VQModel  # noqa: E402

D, AD, U, AU = "DownEncoderBlock2D", "AttnDownEncoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"
SD_KL = dict(block_out_channels=[128, 256, 512, 512], down_block_types=[D] * 4, up_block_types=[U] * 4,
             layers_per_block=2, latent_channels=4, sample_size=512)
ITHQ_VQ = dict(block_out_channels=[64, 128, 256, 512], down_block_types=[D, D, D, AD], up_block_types=[AU, U, U, U],
               layers_per_block=2, latent_channels=256, vq_embed_dim=128, num_vq_embeddings=4096, sample_size=32)


def twin_models(reference_cls, our_cls, config, seed):
    torch.manual_seed(seed)
    reference = reference_cls(**config).eval()
    with torch.no_grad():  # a codebook on the scale of the latents, so that quantization is not degenerate
        for name, param in reference.named_parameters():
            if "embedding" in name:
                param.normal_()
    ours = our_cls.from_config(dict(reference.config))
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours.eval()


def timed(run):
    wall, cpu = time.perf_counter(), time.process_time()
    out = run()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def compare(label, ours, reference, repeats):
    """Runs two callables alternately (so changing machine load hits both alike); prints median wall times, their
    ratio, the ratio of process CPU times (steadier on a shared machine) and the largest output difference."""
    runs = {"ours": [], "reference": []}
    for _ in range(repeats):
        for side, run in (("ours", ours), ("reference", reference)):
            runs[side].append(timed(run))
    diff = (runs["ours"][0][0] - runs["reference"][0][0]).abs().max().item()
    wall = {side: statistics.median(r[1] for r in results) for side, results in runs.items()}
    cpu = {side: statistics.median(r[2] for r in results) for side, results in runs.items()}
    ratio = wall["ours"] / wall["reference"]
    print(f"{label:<20} vqcore {wall['ours']:6.2f} s  diffusers {wall['reference']:6.2f} s  ratio {ratio:4.2f}  "
          f"(CPU-time ratio {cpu['ours'] / cpu['reference']:4.2f})  max|diff| {diff:.1e}", flush=True)
    return ratio


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {args.threads} threads, fp32 CPU, "
          f"{args.size}x{args.size}, median of {args.repeats}", flush=True)
    image = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ratios = {}
    with torch.inference_mode():
        reference, ours = twin_models(diffusers.AutoencoderKL, AutoencoderKL, SD_KL, seed=0)
        latents = reference.encode(image).latent_dist.mode()
        ratios["SD KL encode"] = compare("SD KL VAE encode", lambda: ours.encode(image).mean,
                                         lambda: reference.encode(image).latent_dist.mean, args.repeats)
        ratios["SD KL decode"] = compare("SD KL VAE decode", lambda: ours.decode(latents),
                                         lambda: reference.decode(latents).sample, args.repeats)
        del reference, ours

        reference, ours = twin_models(diffusers.VQModel, VQModel, ITHQ_VQ, seed=1)
        latents = reference.encode(image).latents
        ratios["ithq VQ encode"] = compare("ithq VQ-VAE encode", lambda: ours.encode(image),
                                           lambda: reference.encode(image).latents, args.repeats)
        ratios["ithq VQ decode"] = compare("ithq VQ-VAE decode", lambda: ours.decode(latents),
                                           lambda: reference.decode(latents).sample, args.repeats)
    print("ratios vqcore/diffusers: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
