"""Command line: `python -m vqcore <command> ...`.

    python -m vqcore demo-models DIR                  trained demo models, a photo, tiny random models in every format
    python -m vqcore roundtrip MODEL [IMAGE] OUT.png  encode (VQ: and quantize) an image, decode it, save the PNG
    python -m vqcore generate PROMPT OUT.png          text-to-image with VQ-Diffusion (default: the demo model)

Each command is an `add_<name>_command(subparsers)` function that registers its arguments and sets `run`.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import VQCoreError
from .sampler import MODES

DEMO_FOLDER = Path(tempfile.gettempdir()) / "vqcore-vq-diffusion-demo"


def add_demo_models_command(subparsers):
    parser = subparsers.add_parser("demo-models", help="write the trained demo models, a photo to try them on, and "
                                   "seeded tiny random models in every format (ComfyUI models-folder layout)")
    parser.add_argument("directory", type=Path, help="models folder to write into (vae/, vq_models/, checkpoints/, diffusers/)")
    parser.add_argument("--input-dir", type=Path, default=None,
                        help="where the demo photo goes (default: the models folder's sibling input/, as in ComfyUI)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random models")
    parser.set_defaults(run=run_demo_models)


def run_demo_models(args):
    from .demo import write_demo_models

    for path in write_demo_models(args.directory, args.seed, args.input_dir):
        print(path)


def add_roundtrip_command(subparsers):
    from .vae_layouts import FAMILY_NAMES

    parser = subparsers.add_parser(
        "roundtrip",
        help="encode and decode an image through a VAE / VQ model file or diffusers folder, save the result as PNG",
        description="Images whose sides are not multiples of the model's downscale factor are cropped at the right "
        "and bottom edges to the nearest smaller multiple.",
    )
    parser.add_argument("model", type=Path, help="single weight file or diffusers folder")
    parser.add_argument("images", type=Path, nargs="+", metavar="[INPUT_IMAGE] OUTPUT_PNG",
                        help="input image (optional: a generated test pattern otherwise) and the PNG to write")
    parser.add_argument("--family", default="auto", choices=FAMILY_NAMES, help="latent constants for KL VAEs (default: guess)")
    parser.add_argument("--device", default=None, help="cuda, mps, cpu, ... (default: best available)")
    parser.add_argument("--dtype", default=None, choices=["auto", "fp32", "fp16", "bf16"], help="default fp32")
    parser.add_argument("--variant", default=None, help="weight variant of a diffusers folder, e.g. fp16")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="config that the weights cannot tell: a diffusers config.json or a taming/LDM YAML "
                             "(default: MODEL's .yaml/.json beside it, if any)")
    parser.add_argument("--size", type=int, default=256, help="side of the generated test pattern (default 256)")
    parser.add_argument("--exact", action="store_true", help="diffusers' exact computation instead of the fast path")
    parser.set_defaults(run=run_roundtrip)


def run_roundtrip(args):
    from .autoencoder import use_fast_path
    from .loading import load_autoencoder

    if len(args.images) > 2:
        raise VQCoreError(f"roundtrip takes at most an input image and an output PNG; got {len(args.images)} paths")
    source, output = args.images if len(args.images) == 2 else (None, args.images[0])
    check_output(output)
    check_positive("--size", args.size)
    model = load_autoencoder(args.model, device=args.device, dtype=args.dtype, family=args.family, variant=args.variant,
                             config=args.config)
    use_fast_path(model, not args.exact)
    image = read_image(source) if source else test_pattern(args.size)
    image = crop_to_multiple(image, model.downscale_factor)
    x = torch.from_numpy(image).to(model.device, model.dtype).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.inference_mode():
        if hasattr(model, "quantize"):
            z_q, _, indices = model.quantize(model.encode(x))
            y = model.decode(z_q, force_not_quantize=True)
            summary = f"VQ, {tuple(indices.shape[1:])} tokens, {indices.unique().numel()} of {model.num_embeddings} codes used"
        else:
            latents = model.encode(x).mode()
            y = model.decode(latents)
            summary = f"KL, latents {tuple(latents.shape[1:])}, scaling_factor {model.config['scaling_factor']}"
    save_png(y, output)
    print(f"{args.model}: {summary}; {image.shape[1]}x{image.shape[0]} image -> {output}")


def check_output(path):
    """The PNG path can be written: checked before any work, so that a typo costs no model run."""
    if path.is_dir():
        raise VQCoreError(f"{path}: is a folder; give the PNG file to write")
    if path.suffix.lower() != ".png":
        raise VQCoreError(f"{path}: the output must be a .png file")
    if not path.parent.is_dir():
        raise VQCoreError(f"{path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise VQCoreError(f"{path}: the folder {path.parent} is not writable")


def check_positive(option, value):
    if value < 1:
        raise VQCoreError(f"{option} must be a positive integer; got {value}")


def save_png(images, path):
    """(B, 3, H, W) images in [-1, 1], side by side, as one PNG; NaN/inf images are an error, not a black PNG."""
    if not torch.isfinite(images).all():
        raise VQCoreError(f"{path}: not written: the model produced NaN or infinite values")
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    Image.fromarray(torch.cat(list(pixels), dim=1).numpy()).save(path, format="PNG")


def read_image(path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except OSError as e:
        raise VQCoreError(f"{path}: not a readable image: {e}") from e


def test_pattern(size) -> np.ndarray:
    """Colour gradients, a disc and a checkerboard corner: smooth areas, a curved edge and fine detail."""
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    disc = (x - 0.6) ** 2 + (y - 0.45) ** 2 < 0.08
    checker = ((np.mgrid[0:size, 0:size] // 4).sum(0) % 2 == 0) & (x < 0.3) & (y > 0.7)
    rgb = np.stack([x, y, 1 - x * y], axis=-1)
    rgb[disc] = (0.95, 0.8, 0.1)
    rgb[checker] = (1.0, 1.0, 1.0)
    return (rgb * 255).round().astype(np.uint8)


def crop_to_multiple(image, factor) -> np.ndarray:
    height, width = image.shape[0] // factor * factor, image.shape[1] // factor * factor
    if height == 0 or width == 0:
        raise VQCoreError(f"image of {image.shape[1]}x{image.shape[0]} pixels is smaller than the model's downscale factor {factor}")
    if (height, width) != image.shape[:2]:
        print(f"cropping {image.shape[1]}x{image.shape[0]} to {width}x{height} (multiple of {factor})", file=sys.stderr)
    return np.ascontiguousarray(image[:height, :width])


def add_generate_command(subparsers):
    parser = subparsers.add_parser("generate", help="text-to-image with a VQ-Diffusion checkpoint folder (default: the demo model)")
    parser.add_argument("prompt")
    parser.add_argument("output", type=Path, help="PNG to write (several images are tiled side by side)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help=f"VQ-Diffusion folder in the diffusers layout (default: the tiny demo model, written to {DEMO_FOLDER})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="default: every timestep of the schedule")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--truncation", type=float, default=0.86)
    parser.add_argument("--mode", default="standard", choices=MODES)
    parser.add_argument("--images", type=int, default=1, help="images for the prompt")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--variant", default=None, help="weight variant, e.g. fp16")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="config for the VQ-VAE that its config.json gets wrong: a diffusers config.json or a "
                             "taming/LDM YAML")
    parser.set_defaults(run=run_generate)


def run_generate(args):
    from .autoencoder import use_fast_path
    from .demo import write_demo_vq_diffusion
    from .vq_diffusion import load_vq_diffusion

    check_output(args.output)
    check_positive("--images", args.images)
    if args.steps is not None:
        check_positive("--steps", args.steps)
    folder = args.checkpoint
    if folder is None:
        folder = DEMO_FOLDER
        if not (folder / "model_index.json").is_file():
            print(f"writing the demo VQ-Diffusion model to {folder}")
            write_demo_vq_diffusion(folder)
    model = load_vq_diffusion(folder, device=args.device, dtype=args.dtype, variant=args.variant, config=args.config)
    use_fast_path(model.vqvae)
    started = time.perf_counter()

    def progress(step, total, tokens, x0_estimate):
        masked = (tokens == model.transformer.num_vector_embeds - 1).float().mean().item()
        print(f"step {step + 1}/{total}  masked {masked:6.1%}  {time.perf_counter() - started:6.1f} s", flush=True)

    tokens = model.generate([args.prompt], num_images_per_prompt=args.images, steps=args.steps, guidance_scale=args.guidance,
                            truncation_rate=args.truncation, mode=args.mode, seed=args.seed, callback=progress)
    save_png(model.decode(tokens), args.output)
    print(f"{folder}: {tuple(tokens.shape)} tokens -> {args.output}")


COMMANDS = [add_demo_models_command, add_roundtrip_command, add_generate_command]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vqcore", description="vqcore autoencoder and VQ-Diffusion tools")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except VQCoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
