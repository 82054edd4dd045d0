"""Makes the README's pictures of the trained demo models (vqcore/demo_weights/) into a folder:

    python tools/demo_pictures.py docs/demo
        roundtrip.jpg    the demo photo, its KL f8 roundtrip and its VQ f4 roundtrip
        prompts.png      text-to-image, 4 images for each of several prompts (pictures enlarged 4x)
        guidance.png     the same seeds at guidance 1 (no guidance) and 5 for a few prompts
        inpainting.png   token inpainting: a generated picture, the masked quarter, the result for a new prompt
    python tools/demo_pictures.py docs/demo --comfyui COMFYUI_DIR     (a ComfyUI tree: its comfy.utils is imported)
        tiled.jpg        a 2048x2048 decode of the demo photo's latents, tile 256: our seamless tiled decode and
                         ComfyUI's VAE Decode (Tiled) (three blended tilings, as comfy.sd.VAE.decode_tiled_), each
                         with the region around a tile corner enlarged and its difference from the full decode

Sampling settings are those of tests/test_demo_models.py; every picture is seeded.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from shapes import caption  # noqa: E402

from vqcore.autoencoder import use_fast_path  # noqa: E402
from vqcore.demo import DEMO_PHOTO, TRAINED_FOLDER, TRAINED_KL, TRAINED_VQ, TRAINED_VQ_DIFFUSION  # noqa: E402
from vqcore.loading import load_autoencoder  # noqa: E402
from vqcore.tiling import tiled_decode  # noqa: E402
from vqcore.vq_diffusion import load_vq_diffusion  # noqa: E402

MODELS = TRAINED_FOLDER / "models"
PHOTO = TRAINED_FOLDER / "input" / DEMO_PHOTO
SAMPLING = dict(steps=25, mode="fast", truncation_rate=0.86, guidance_scale=5.0)
PROMPTS = [("circle", "red", "in the top left", "white"), ("square", "blue", "in the center", "gray"),
           ("triangle", "yellow", "in the bottom right", "black"), ("circle", "green", "in the bottom left", "gray"),
           ("square", "purple", "in the top right", "white"), ("triangle", "red", None, None)]
GUIDANCE_PROMPTS = [("triangle", "green", "in the top left", "black"), ("square", "yellow", "in the bottom right", "gray"),
                    ("circle", "purple", "in the center", "white")]
INPAINT = (("square", "blue", "in the top left", "white"), ("circle", "red", "in the top left", "white"))
ENLARGE = 4
TILED_SIZE, TILE, CORE_OVERLAP = 2048, 256, 64  # VAE Decode (Tiled): tile_size 256, overlap 64 (its default)


def to_uint8(images):
    """(B, 3, H, W) in [-1, 1] -> list of uint8 (H, W, 3)."""
    return list(((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())


def from_pil(image):
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


def labelled_row(pictures, label, gap=4):
    """Pictures side by side with a line of text above them."""
    height = max(p.shape[0] for p in pictures)
    width = sum(p.shape[1] for p in pictures) + gap * (len(pictures) - 1)
    canvas = Image.new("RGB", (width, height + 16), (255, 255, 255))
    ImageDraw.Draw(canvas).text((2, 2), label, fill=(0, 0, 0))
    x = 0
    for p in pictures:
        canvas.paste(Image.fromarray(p), (x, 16))
        x += p.shape[1] + gap
    return canvas


def stack(rows, gap=6):
    width, height = max(r.width for r in rows), sum(r.height for r in rows) + gap * (len(rows) - 1)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    y = 0
    for r in rows:
        canvas.paste(r, (0, y))
        y += r.height + gap
    return canvas


def enlarge(picture, factor=ENLARGE):
    return np.asarray(Image.fromarray(picture).resize((picture.shape[1] * factor, picture.shape[0] * factor), Image.NEAREST))


def roundtrip_picture(out):
    photo = Image.open(PHOTO).convert("RGB")
    x = from_pil(photo)
    pictures = [np.asarray(photo)]
    with torch.inference_mode():
        kl = use_fast_path(load_autoencoder(MODELS / TRAINED_KL, device="cpu"))
        pictures += to_uint8(kl.decode(kl.encode(x).mode()))
        vq = use_fast_path(load_autoencoder(MODELS / TRAINED_VQ, device="cpu"))
        pictures += to_uint8(vq.decode(vq.quantize(vq.encode(x))[0], force_not_quantize=True))
    labelled_row(pictures, "input  |  KL f8 roundtrip  |  VQ f4 roundtrip").save(out / "roundtrip.jpg", quality=90)


def shapes_model():
    model = load_vq_diffusion(MODELS / TRAINED_VQ_DIFFUSION, device="cpu")
    use_fast_path(model.vqvae)
    return model


def prompts_picture(model, out):
    rows = []
    for spec in PROMPTS:
        prompt = caption(*spec)
        tokens = model.generate([prompt], num_images_per_prompt=4, seed=0, **SAMPLING)
        rows.append(labelled_row([enlarge(p) for p in to_uint8(model.decode(tokens))], prompt))
    stack(rows).save(out / "prompts.png")


def guidance_picture(model, out):
    rows = []
    for spec in GUIDANCE_PROMPTS:
        prompt = caption(*spec)
        for scale in (1.0, SAMPLING["guidance_scale"]):
            tokens = model.generate([prompt], num_images_per_prompt=4, seed=0, **{**SAMPLING, "guidance_scale": scale})
            rows.append(labelled_row([enlarge(p) for p in to_uint8(model.decode(tokens))], f"guidance {scale:g}: {prompt}"))
    stack(rows).save(out / "guidance.png")


def inpainting_picture(model, out):
    before_prompt, after_prompt = caption(*INPAINT[0]), caption(*INPAINT[1])
    before = model.generate([before_prompt], num_images_per_prompt=2, seed=0, **SAMPLING)
    grid = model.transformer.height
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    mask[: grid // 2, : grid // 2] = True
    after = torch.stack([model.generate([after_prompt], init_tokens=b[None], mask=mask[None], seed=1, **SAMPLING)[0]
                         for b in before])
    rows = []
    for b, a in zip(to_uint8(model.decode(before)), to_uint8(model.decode(after))):
        masked = b.copy()
        side = b.shape[0] // 2
        masked[:side, :side] = (masked[:side, :side] * 0.3 + 255 * 0.7).astype(np.uint8)
        rows.append(labelled_row([enlarge(b), enlarge(masked), enlarge(a)], ""))
    title = f'"{before_prompt}"  |  masked quarter  |  "{after_prompt}"'
    stack([labelled_row([np.full((1, rows[0].width, 3), 255, np.uint8)], title), *rows]).save(out / "inpainting.png")


def core_tiled_decode(comfy_utils, decode, latents, tile, overlap):
    """ComfyUI's VAE Decode (Tiled) for tile_size / overlap in pixels: comfy.sd.VAE.decode_tiled_'s average of three
    blended tilings (tile x tile, tile/2 x 2 tile, 2 tile x tile/2 latent cells), by comfy.utils.tiled_scale."""
    tile_x = tile_y = tile // 8
    passes = [(tile_x // 2, tile_y * 2), (tile_x * 2, tile_y // 2), (tile_x, tile_y)]
    return sum(comfy_utils.tiled_scale(latents, decode, tx, ty, overlap // 8, upscale_amount=8, out_channels=3)
               for tx, ty in passes) / 3


def tiled_picture(comfy_dir, out):
    sys.path.insert(0, str(comfy_dir))
    sys.argv = sys.argv[:1]  # comfy.cli_args parses the command line on import
    import comfy.utils

    model = use_fast_path(load_autoencoder(MODELS / TRAINED_KL, device="cpu"))
    photo = Image.open(PHOTO).convert("RGB")
    side = min(photo.size)
    photo = photo.crop(((photo.width - side) // 2, (photo.height - side) // 2, (photo.width + side) // 2,
                        (photo.height + side) // 2)).resize((TILED_SIZE, TILED_SIZE), Image.LANCZOS)
    with torch.inference_mode():
        latents = model.encode(from_pil(photo)).mode()
        full = model.decode(latents).clamp(-1, 1)
        ours = tiled_decode(model, latents, tile_size=TILE).clamp(-1, 1)
        core = core_tiled_decode(comfy.utils, model.decode, latents, TILE, CORE_OVERLAP).clamp(-1, 1)
    # The region around the corner shared by four tiles, enlarged, and |difference from the full decode| x 10.
    corner, half = 3 * TILE, 48
    region = (slice(corner - half, corner + half), slice(corner - half, corner + half))
    columns = []
    for name, image in (("seamless tiled (ours)", ours), ("VAE Decode (Tiled), ComfyUI", core)):
        difference = float((image - full).abs().max()) / 2
        picture = to_uint8(image)[0]
        error = (((image - full).abs()[0] / 2 * 10).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        columns.append([np.asarray(Image.fromarray(picture).resize((512, 512), Image.LANCZOS)),
                        enlarge(picture[region], 512 // (2 * half)), enlarge(error[region], 512 // (2 * half)),
                        f"{name}: max |tiled - full| = {difference:.1e}"])
    rows = [labelled_row([c[0] for c in columns], "   |   ".join(c[3] for c in columns)),
            labelled_row([c[1] for c in columns], f"the {2 * half}x{2 * half} pixels around a tile corner, enlarged"),
            labelled_row([c[2] for c in columns], "|tiled - full decode| x 10 there")]
    stack(rows).save(out / "tiled.jpg", quality=90)
    for name, image in (("ours", ours), ("ComfyUI", core)):
        print(f"{TILED_SIZE}x{TILED_SIZE}, tile {TILE}: {name}: max |tiled - full| = {float((image - full).abs().max()) / 2:.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--comfyui", type=Path, help="a ComfyUI tree: make only tiled.jpg, with its tiled decode")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if args.comfyui:
        tiled_picture(args.comfyui, args.out)
        return
    roundtrip_picture(args.out)
    model = shapes_model()
    prompts_picture(model, args.out)
    guidance_picture(model, args.out)
    inpainting_picture(model, args.out)


if __name__ == "__main__":
    main()
