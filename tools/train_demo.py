"""Trains the demo models shipped in vqcore/demo_weights/ (seeded, CPU): a KL autoencoder and a VQ autoencoder on
crops of the photographs scikit-image ships, and a small text-to-image VQ-Diffusion model on captioned shapes.

    pip install torch==2.13.0 -r requirements-train.txt
    python tools/train_demo.py STAGE ...      # the shipped weights' commands: vqcore/demo_weights/README.md

Stages (each seeded on its own, so they can also run one at a time or side by side):
* kl: AutoencoderKL in Stable Diffusion's shape (4 levels, f8, 4 latent channels, quant convs, mid-block attention)
  with narrow channels; L2 + L1 reconstruction and a small KL term. --kl-shuffle-colours puts each crop's RGB
  channels in a random order: the photos' own hues alone (few greens and blues) left other photos' colours shifted.
* vq: a VQModel (f4, 512 codes; EMA codebook with dead-code restarts) on photo crops.
* shape-vq: the text-to-image model's own VQModel (f4, 128 codes) on shape pictures, starting from the photo VQ
  model's encoder and decoder (--shape-vq-init).
* shapes: the shape data set tokenised by the shape VQ model (the fp16 weights that are shipped), then a VQ-Diffusion
  transformer with a tiny CLIP text encoder and learned classifier-free embeddings trained on it with VQ-Diffusion's
  objective (mask-and-replace forward process, posterior KL + auxiliary x0 cross-entropy, text dropped 10 % of the
  time).

The models are vqcore's own classes, so the weights are written in exactly the layouts the loaders read. Only the
forward process, the loss and the training-mode forward passes live here (vqcore's inference code writes in place).
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.append(str(Path(__file__).resolve().parents[1]))  # vqcore from this checkout unless one is importable

from shapes import IMAGE_SIZE, render_shape, sample_caption  # noqa: E402  (tools/shapes.py)

from vqcore.autoencoder import GroupNorm, use_fast_path  # noqa: E402
from vqcore.autoencoder_kl import AutoencoderKL  # noqa: E402
from vqcore.scheduler import LOG_ZERO, VQDiffusionScheduler  # noqa: E402
from vqcore.text_encoder import MAX_LENGTH, PAD_TOKEN, load_tokenizer  # noqa: E402
from vqcore.transformer import VQDiffusionTransformer  # noqa: E402
from vqcore.vq_diffusion import NULL_EMBEDDINGS  # noqa: E402
from vqcore.vq_model import VQModel  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "vqcore" / "demo_weights" / "models"
DOWN, UP = "DownEncoderBlock2D", "UpDecoderBlock2D"

# 8 GroupNorm groups, 4 channels each at the 32-channel level: with 32 groups there, every channel is normalised on
# its own over the picture, which wipes out each picture's overall level of that channel (flat backgrounds suffer
# most). The group count is in config.json, so the models ship as diffusers folders.
KL_CONFIG = dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, latent_channels=4, norm_num_groups=8,
                 down_block_types=[DOWN] * 4, up_block_types=[UP] * 4, sample_size=256)
# f4 and 512 codes: 9 bits per 4x4 pixels. At f8 a few hundred codes give 8-9 bits per 8x8 pixels, far less than the
# 24 bits of an f8 RGB thumbnail.
VQ_CONFIG = dict(block_out_channels=[32, 32, 64], layers_per_block=1, latent_channels=4, vq_embed_dim=4,
                 num_vq_embeddings=512, norm_num_groups=8, down_block_types=[DOWN] * 3, up_block_types=[UP] * 3, sample_size=256)
# The text-to-image model's own VQ model, trained on the shape pictures: flat colours and edges need few codes, and
# fewer classes make the transformer's task smaller. 32x32 pictures at f4: 64 tokens.
SHAPE_VQ_CONFIG = dict(VQ_CONFIG, num_vq_embeddings=128, sample_size=IMAGE_SIZE)
TEXT_CONFIG = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                   projection_dim=64, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
                   bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
TIMESTEPS = 100
# Small enough for a CPU hour: 64 tokens, width 96, 3 blocks.
TRANSFORMER_CONFIG = dict(num_attention_heads=4, attention_head_dim=24, num_layers=3, cross_attention_dim=64,
                          attention_bias=True, sample_size=IMAGE_SIZE // 4,
                          num_vector_embeds=SHAPE_VQ_CONFIG["num_vq_embeddings"] + 1, activation_fn="geglu-approximate",
                          num_embeds_ada_norm=TIMESTEPS, dropout=0.0, norm_num_groups=32)

# The photographs of skimage/data (grey ones as grey RGB); colour ones are drawn three times as often.
COLOUR_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                 "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png")
GREY_PHOTOS = ("camera.png", "brick.png", "grass.png", "gravel.png", "moon.png", "coins.png", "clock_motion.png", "cell.png")
SCALES = (1.0, 0.71, 0.5, 0.35, 0.25)  # held-out photos are judged at 256 px, a scale these cover
CROP = 48

KL_NAME = "diffusers/vqcore-photo-kl-f8"
VQ_NAME = "diffusers/vqcore-photo-vq-f4"
PIPELINE_NAME = "diffusers/vqcore-shapes-vq-diffusion"

# Default step counts (those of the shipped weights are in vqcore/demo_weights/README.md). The learning rate is
# constant after its warm-up, so the weights saved at step n of a longer run are those of an n-step run.
KL_STEPS, VQ_STEPS, SHAPE_VQ_STEPS, DIFFUSION_STEPS = 100000, 100000, 100000, 100000
SAVE_EVERY = 25


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["kl", "vq", "shape-vq", "shapes"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="models folder to write (default: the shipped one)")
    parser.add_argument("--work", type=Path, default=Path("train_work"), help="training logs")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_OUT / PIPELINE_NAME / "tokenizer",
                        help="folder with CLIP's vocab.json and merges.txt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kl-steps", type=int, default=KL_STEPS)
    parser.add_argument("--kl-init", type=Path, help="AutoencoderKL folder of the same architecture to start from")
    parser.add_argument("--kl-shuffle-colours", action="store_true",
                        help="put each crop's RGB channels in a random order (every hue seen, not only the photos' own)")
    parser.add_argument("--vq-steps", type=int, default=VQ_STEPS)
    parser.add_argument("--shape-vq-steps", type=int, default=SHAPE_VQ_STEPS)
    parser.add_argument("--shape-vq-batch", type=int, default=SHAPE_VQ_BATCH)
    parser.add_argument("--shape-vq-lr", type=float, default=VQ_LR)
    parser.add_argument("--shape-vq-init", type=Path,
                        help="VQModel folder whose encoder and decoder the shape VQ model starts from (not its codebook)")
    parser.add_argument("--diffusion-steps", type=int, default=DIFFUSION_STEPS)
    parser.add_argument("--diffusion-samples", type=int, default=6000, help="shape pictures in the data set")
    parser.add_argument("--diffusion-lr", type=float, default=DIFFUSION_LR)
    parser.add_argument("--diffusion-init", type=Path,
                        help="VQ-Diffusion pipeline folder whose transformer, text encoder and null embeddings to start from")
    parser.add_argument("--guided-weight", type=float, default=0.0,
                        help="weight of the guided x0 cross-entropy (see guided_cross_entropy); 0 leaves it out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "kl":
        train_kl(args)
    elif args.stage == "vq":
        train_vq(args, VQ_CONFIG, args.vq_steps, VQ_BATCH, VQ_LR, photos=True, seed=args.seed + 1,
                 save=lambda model, step: save_photo_vq(model, args.out))
    elif args.stage == "shape-vq":
        train_vq(args, SHAPE_VQ_CONFIG, args.shape_vq_steps, args.shape_vq_batch, args.shape_vq_lr, photos=False, seed=args.seed + 2,
                 save=lambda model, step: save_shape_vq(model, args.out), init=args.shape_vq_init)
    else:
        train_vq_diffusion(args, shipped_shape_vq(args.out))


class Log:
    """Training log: step, wall and CPU seconds, values. A file NAME.stop beside NAME.log ends the run at its next save
    (a saved step n of a constant-rate run equals an n-step run)."""

    def __init__(self, path, total):
        self.file, self.total, self.started = open(path, "a"), total, time.perf_counter()
        self.stop = path.with_suffix(".stop")

    def __call__(self, step, **values):
        """values: numbers or scalar tensors (detached here, so a loss can be logged as it is)."""
        elapsed = time.perf_counter() - self.started
        text = (f"step {step}/{self.total} {elapsed:7.0f} s {time.process_time():7.0f} cpu-s "
                + " ".join(f"{k} {float(torch.as_tensor(v).detach()):.4f}" for k, v in values.items()))
        print(text, file=self.file, flush=True)

    def saved(self, step):
        """Logs a save at step; True when the run should end here."""
        self(step, saved=1.0)
        return self.stop.exists()


def learning_rate(step, peak, warmup=50):
    """Linear warm-up, then constant (so a checkpoint of a longer run equals a shorter run)."""
    return peak * min(1.0, (step + 1) / warmup)


def trainable(model):
    """The model on the fast path (the decoder's channels-last maps), with torch's GroupNorm, which autograd can
    follow (the fast path's normalisation may write into its input)."""
    use_fast_path(model)
    for module in model.modules():
        if isinstance(module, GroupNorm):
            module.fast = False
    return model.requires_grad_(True).train()  # the loaders return frozen models


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


class WeightAverage:
    """Exponential moving average of parameters (decay ramping up to 0.99): smoother weights than the last step's,
    without a learning-rate schedule tied to the run's length."""

    def __init__(self, tensors):
        self.tensors = list(tensors)
        self.average = [t.detach().clone() for t in self.tensors]

    @torch.no_grad()
    def update(self, step):
        decay = min(0.99, (1 + step) / (10 + step))
        for average, t in zip(self.average, self.tensors):
            average.lerp_(t.detach(), 1 - decay)

    @torch.no_grad()
    def swap(self):
        """Exchanges the live and averaged values (call twice to swap back)."""
        for average, t in zip(self.average, self.tensors):
            live = t.detach().clone()
            t.copy_(average)
            average.copy_(live)


# ---- photographs -------------------------------------------------------------------------------------------------

def photo_pyramid():
    """Each skimage photo at SCALES (those at least CROP on the short side), as uint8 HxWx3 arrays."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    pyramid = []
    for name in COLOUR_PHOTOS + GREY_PHOTOS:
        with Image.open(folder / name) as im:
            im = im.convert("RGB")
        for scale in SCALES:
            size = (round(im.width * scale), round(im.height * scale))
            if min(size) >= CROP:
                pyramid += [np.asarray(im.resize(size, Image.LANCZOS))] * (3 if name in COLOUR_PHOTOS else 1)
    return pyramid


def photo_batch(pyramid, count, rng, shuffle_colours=False):
    crops = []
    for _ in range(count):
        image = pyramid[rng.integers(len(pyramid))]
        y, x = rng.integers(image.shape[0] - CROP + 1), rng.integers(image.shape[1] - CROP + 1)
        crop = image[y:y + CROP, x:x + CROP]
        crop = crop[:, ::-1] if rng.random() < 0.5 else crop
        crops.append(crop[..., rng.permutation(3)] if shuffle_colours else crop)
    return to_tensor(np.stack(crops))


def to_tensor(images):
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def reconstruction_loss(y, x):
    return F.mse_loss(y, x) + 0.1 * F.l1_loss(y, x)


def psnr(y, x):
    return float(10 * torch.log10(4 / F.mse_loss(y.clamp(-1, 1), x)))


# ---- KL autoencoder ----------------------------------------------------------------------------------------------

KL_BATCH, KL_LR, KL_WEIGHT = 8, 1.5e-3, 1e-6


def train_kl(args):
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    pyramid = photo_pyramid()
    if args.kl_init is not None:
        from vqcore.loading import load_autoencoder_kl

        model = trainable(load_autoencoder_kl(args.kl_init, device="cpu"))
    else:
        model = trainable(AutoencoderKL(**KL_CONFIG))
        with torch.no_grad():  # start with small posterior noise: the reconstruction need not first learn to shrink it
            model.quant_conv.bias[KL_CONFIG["latent_channels"]:] = -8.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=KL_LR, betas=(0.9, 0.99), weight_decay=0.0)
    average = WeightAverage(model.state_dict().values())
    log = Log(args.work / "kl.log", args.kl_steps)
    for step in range(args.kl_steps):
        set_lr(optimizer, learning_rate(step, KL_LR))
        x = photo_batch(pyramid, KL_BATCH, rng, args.kl_shuffle_colours)
        posterior = model.encode(x)
        y = model.decode(posterior.sample())
        kl = posterior.kl().mean() / x[0].numel()
        loss = reconstruction_loss(y, x) + KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        average.update(step)
        if step % 10 == 0:
            log(step, loss=loss, psnr=psnr(y.detach(), x), kl=kl, logvar=posterior.logvar.mean())
        if (step + 1) % SAVE_EVERY == 0 or step + 1 == args.kl_steps:
            average.swap()
            write_diffusers_folder(args.out / KL_NAME, model)
            average.swap()
            if log.saved(step + 1):
                break


# ---- VQ autoencoders ----------------------------------------------------------------------------------------------

VQ_BATCH, SHAPE_VQ_BATCH, VQ_LR, VQ_BETA, CODEBOOK_DECAY = 8, 16, 1.5e-3, 0.25, 0.99


def train_vq(args, config, steps, batch, peak, photos, seed, save, init=None):
    """A VQModel with an EMA codebook (initialised from encoder outputs, dead codes restarted at encoder outputs),
    straight-through gradients and a commitment loss, on photo crops or on shape pictures. init: a VQModel folder of
    the same architecture whose weights, all but the codebook (it may have another size), are the starting point."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pyramid = photo_pyramid() if photos else None
    model = VQModel(**config)
    if init is not None:
        from vqcore.loading import load_vqmodel

        start = {k: v for k, v in load_vqmodel(init, device="cpu").state_dict().items() if "embedding" not in k}
        missing, unexpected = model.load_state_dict(start, strict=False)
        assert not unexpected and all("embedding" in k for k in missing), (missing, unexpected)
    model = trainable(model)
    codebook = model.quantize.embedding.weight
    codebook.requires_grad_(False)  # updated by moving averages, not by the optimizer
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=peak, betas=(0.9, 0.99),
                                  weight_decay=0.0)
    codes, dim = codebook.shape
    cluster_size, embed_sum = torch.zeros(codes), torch.zeros(codes, dim)
    log = Log(args.work / ("vq.log" if photos else "shape_vq.log"), steps)
    for step in range(steps):
        set_lr(optimizer, learning_rate(step, peak, warmup=20 if not photos else 50))
        x = photo_batch(pyramid, batch, rng) if photos else shape_batch(batch, rng)[0]
        z = model.encode(x)
        flat = z.permute(0, 2, 3, 1).reshape(-1, dim)
        if step == 0:  # every code starts where the data is
            with torch.no_grad():
                codebook.copy_(flat[torch.randint(len(flat), (codes,))])
                embed_sum.copy_(codebook)
                cluster_size.fill_(1.0)
        indices = torch.cdist(flat.detach(), codebook).argmin(1)
        quantized = codebook[indices]
        commitment = F.mse_loss(flat, quantized)
        z_q = (flat + (quantized - flat).detach()).view(z.shape[0], z.shape[2], z.shape[3], dim).permute(0, 3, 1, 2)
        y = model.decode(z_q, force_not_quantize=True)
        loss = reconstruction_loss(y, x) + VQ_BETA * commitment
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            onehot = F.one_hot(indices, codes).float()
            cluster_size.mul_(CODEBOOK_DECAY).add_(onehot.sum(0), alpha=1 - CODEBOOK_DECAY)
            embed_sum.mul_(CODEBOOK_DECAY).add_(onehot.T @ flat.detach(), alpha=1 - CODEBOOK_DECAY)
            total = cluster_size.sum()
            smoothed = (cluster_size + 1e-5) / (total + codes * 1e-5) * total
            codebook.copy_(embed_sum / smoothed[:, None])
            dead = cluster_size < 0.03
            if step % 10 == 0 and dead.any():
                fresh = flat.detach()[torch.randint(len(flat), (int(dead.sum()),))]
                codebook[dead] = fresh
                embed_sum[dead] = fresh
                cluster_size[dead] = 1.0
        if step % 10 == 0:
            log(step, loss=loss, psnr=psnr(y.detach(), x), commitment=commitment,
                used=float(indices.unique().numel()), dead=float(dead.sum()))
        if (step + 1) % SAVE_EVERY == 0 or step + 1 == steps:
            save(model, step + 1)
            if log.saved(step + 1):
                break


def save_photo_vq(model, out):
    write_diffusers_folder(out / VQ_NAME, model)


def save_shape_vq(model, out):
    write_diffusers_folder(out / PIPELINE_NAME / "vqvae", model)


def shipped_shape_vq(out):
    """The shape VQ model as users get it: the fp16 weights, in float32."""
    from vqcore.loading import load_vqmodel

    return load_vqmodel(out / PIPELINE_NAME / "vqvae", device="cpu")


# ---- shape pictures ------------------------------------------------------------------------------------------------

def shape_batch(count, rng):
    """(images (B, 3, IMAGE_SIZE, IMAGE_SIZE) in [-1, 1], captions) of random captioned shapes."""
    pairs = [sample_caption(rng) for _ in range(count)]
    images = np.stack([render_shape(spec) for spec, _ in pairs])
    return to_tensor(images), [caption for _, caption in pairs]


# ---- VQ-Diffusion ----------------------------------------------------------------------------------------------------

DIFFUSION_BATCH, DIFFUSION_LR = 32, 2e-3
TEXT_DROPOUT, AUX_WEIGHT = 0.1, 1.0
GUIDANCE_RANGE = (1.0, 6.0)  # the scales the guided cross-entropy trains for, drawn uniformly per sample


def train_vq_diffusion(args, vq):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(args.seed + 3)
    rng = np.random.default_rng(args.seed + 3)
    folder = args.out / PIPELINE_NAME
    copy_tokenizer(args.tokenizer, folder / "tokenizer")
    tokenizer = load_tokenizer(folder / "tokenizer")
    images, captions = shape_batch(args.diffusion_samples, rng)
    with torch.no_grad():
        grids = torch.cat([vq.quantize(vq.encode(part))[2] for part in images.split(64)])
        shape_psnr = psnr(vq.decode_indices(grids[:64]), images[:64])
    tokens = grids.flatten(1)
    unique = sorted(set(captions))
    ids = tokenizer(unique, padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids[:, :MAX_LENGTH]
    caption_index = torch.tensor([unique.index(c) for c in captions])
    with open(args.work / "diffusion.log", "a") as file:
        print(f"{len(captions)} pictures, {len(unique)} captions, {tokens.unique().numel()} codes used, "
              f"shape VQ PSNR {shape_psnr:.2f} dB", file=file)

    scheduler = VQDiffusionScheduler(num_vec_classes=TRANSFORMER_CONFIG["num_vector_embeds"], num_train_timesteps=TIMESTEPS)
    transformer = VQDiffusionTransformer.from_config(TRANSFORMER_CONFIG).train()
    text_model = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).train()
    null_embeddings = torch.nn.Parameter(torch.randn(MAX_LENGTH, TEXT_CONFIG["hidden_size"]) * 0.02)
    if args.diffusion_init is not None:
        start_from_pipeline(args.diffusion_init, transformer, text_model, null_embeddings)
    parameters = [*transformer.parameters(), *text_model.parameters(), null_embeddings]
    optimizer = torch.optim.AdamW(parameters, lr=args.diffusion_lr, betas=(0.9, 0.99), weight_decay=0.01)
    average = WeightAverage(parameters)
    steps = args.diffusion_steps
    log = Log(args.work / "diffusion.log", steps)
    for step in range(steps):
        set_lr(optimizer, learning_rate(step, args.diffusion_lr, warmup=50))
        batch = torch.from_numpy(rng.integers(len(tokens), size=DIFFUSION_BATCH))
        x0 = tokens[batch]
        text = text_embeddings(text_model, ids[caption_index[batch]])
        dropped = torch.from_numpy(rng.random(DIFFUSION_BATCH) < TEXT_DROPOUT)[:, None, None]
        context = torch.where(dropped, null_embeddings.expand_as(text), text)
        t = torch.from_numpy(rng.integers(TIMESTEPS, size=DIFFUSION_BATCH))
        x_t = forward_noise(scheduler, x0, t)
        log_x0 = x0_log_probs(transformer, x_t, context, t)
        kl, ce = diffusion_losses(scheduler, log_x0, x0, x_t, t)
        loss = kl + AUX_WEIGHT * ce
        if args.guided_weight:
            log_uncond = x0_log_probs(transformer, x_t, null_embeddings.expand_as(text), t)
            guided = guided_cross_entropy(log_x0, log_uncond, x0, rng)  # (for dropped texts: the unconditional CE)
            loss = loss + args.guided_weight * guided
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        average.update(step)
        if step % 10 == 0:
            accuracy = float((log_x0.argmax(1) == x0).float().mean())
            log(step, loss=loss, kl=kl, ce=ce, x0_accuracy=accuracy)
        if (step + 1) % SAVE_EVERY == 0 or step + 1 == steps:
            average.swap()
            save_vq_diffusion(folder, transformer, text_model, null_embeddings)
            average.swap()
            if log.saved(step + 1):
                break


def start_from_pipeline(folder, transformer, text_model, null_embeddings):
    """Starts the float32 modules from a saved pipeline's trainable parts, read by vqcore's loader."""
    from vqcore.vq_diffusion import load_vq_diffusion

    saved = load_vq_diffusion(folder, device="cpu")
    transformer.load_state_dict(saved.transformer.state_dict())
    text_model.load_state_dict(saved.text_encoder.text_model.state_dict())
    with torch.no_grad():
        null_embeddings.copy_(saved.null_embeddings)


def text_embeddings(text_model, ids):
    """What vqcore's VQTextEncoder.encode computes, with gradients: last hidden states, each token L2-normalised."""
    hidden = text_model(ids)[0]
    return hidden / hidden.norm(dim=-1, keepdim=True)


def forward_noise(scheduler, x0, t):
    """x_t ~ q(x_t | x_0) with one timestep per sample: kept (a_t + b_t), a uniform class (b_t each), or [MASK] (c_t)."""
    keep = scheduler.log_cumprod_at[t].exp()[:, None]
    replace = scheduler.log_cumprod_bt[t].exp()[:, None] * (scheduler.num_embed - 1)
    u = torch.rand(x0.shape)
    random_class = torch.randint(0, scheduler.num_embed - 1, x0.shape)
    return torch.where(u < keep, x0, torch.where(u < keep + replace, random_class, scheduler.mask_class))


def x0_log_probs(transformer, tokens, context, t):
    """The transformer's log p(x0 | x_t) (B, K - 1, N) with one timestep per sample, computed by its modules out of
    place (its inference forward works in place, which autograd cannot follow)."""
    hidden = transformer.latent_image_embedding(tokens)
    for block in transformer.transformer_blocks:
        hidden = hidden + block.attn1(ada_norm(block.norm1, hidden, t))
        hidden = hidden + block.attn2(ada_norm(block.norm2, hidden, t), context)
        projection, _, output = block.ff.net
        h = projection.proj(block.norm3(hidden))
        hidden = hidden + output(h * torch.sigmoid(1.702 * h))  # geglu-approximate, the original's GELU2
    return F.log_softmax(transformer.out(transformer.norm_out(hidden)), dim=-1).transpose(1, 2)


def guided_cross_entropy(log_cond, log_uncond, x0, rng):
    """-log of x0 under the classifier-free guided prediction the sampler forms, uncond + s (cond - uncond) renormalised,
    at a random scale s per sample.

    The diffusion losses train each prediction alone. Classes that both predictions rule out then differ between them
    by chance, by several nats, and guidance multiplies that difference by s - 1 until such a class wins (the small
    model's images collapse at diffusers' default of 5). This term trains the guided prediction itself.
    """
    scale = torch.from_numpy(rng.uniform(*GUIDANCE_RANGE, size=x0.shape[0])).float().view(-1, 1, 1)
    guided = F.log_softmax(log_uncond + scale * (log_cond - log_uncond), dim=1)
    return -guided.gather(1, x0[:, None]).mean()


def ada_norm(norm, x, t):
    scale, shift = norm.linear(F.silu(norm.emb(t)))[:, None, :].chunk(2, dim=-1)
    return norm.norm(x) * (1 + scale) + shift


def posterior(scheduler, log_p_x0, x_t, t):
    """log p(x_{t-1} | x_t) = log sum_x0 q(x_{t-1} | x_t, x0) p(x0), (B, K, N), with one timestep per sample.

    The same formula on the same tables as vqcore's VQDiffusionScheduler.q_posterior (which samples with a single
    timestep, in place, and cannot be differentiated); tests/test_demo_models.py compares them.
    """
    def table(values, index):
        return values[index].view(-1, 1, 1)

    batch, classes, pixels = log_p_x0.shape
    is_mask = (x_t == scheduler.mask_class)[:, None, :]
    log_onehot_x_t = torch.where(F.one_hot(x_t, scheduler.num_embed).transpose(1, 2).bool(), 0.0, LOG_ZERO)

    def transition(a, b, c):  # log q(x_t | x_s = k) for the non-mask classes k
        return torch.where(is_mask, c, torch.logaddexp(log_onehot_x_t[:, :-1] + a, b))

    cumulative = transition(*(table(v, t) for v in (scheduler.log_cumprod_at, scheduler.log_cumprod_bt, scheduler.log_cumprod_ct)))
    one_step = transition(*(table(v, t) for v in (scheduler.log_at, scheduler.log_bt, scheduler.log_ct)))
    one_step = torch.cat([one_step, log_onehot_x_t[:, -1:]], dim=1)
    q = log_p_x0 - cumulative
    log_sum = torch.logsumexp(q, dim=1, keepdim=True)
    q = q - log_sum
    a, b, c = (table(v, t - 1) for v in (scheduler.log_cumprod_at, scheduler.log_cumprod_bt, scheduler.log_cumprod_ct))
    q = torch.cat([torch.logaddexp(q + a, b), c.expand(batch, 1, pixels)], dim=1)
    return q + one_step + log_sum


def diffusion_losses(scheduler, log_x0, x0, x_t, t):
    """Per-token means of VQ-Diffusion's loss terms: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) (at t = 0 the
    decoder's -log p(x0)), and the auxiliary x0 cross-entropy, weighted up at small t (2 - t / T) as in the original."""
    t_kl = t.clamp(min=1)  # the KL is not used at t = 0, where the posterior's mask row is log(0)
    log_true = posterior(scheduler, torch.where(F.one_hot(x0, log_x0.shape[1]).transpose(1, 2).bool(), 0.0, LOG_ZERO), x_t, t_kl)
    log_model = posterior(scheduler, log_x0, x_t, t_kl)
    kl = (log_true.exp() * (log_true - log_model)).sum(1)
    ce = -log_x0.gather(1, x0[:, None]).squeeze(1)
    first = (t == 0)[:, None]
    kl = torch.where(first, ce, kl)
    weight = (2 - t.float() / TIMESTEPS)[:, None]
    return kl.mean(), (weight * ce).mean()


def save_vq_diffusion(folder, transformer, text_model, null_embeddings):
    write_json(folder / "model_index.json", {
        "_class_name": "VQDiffusionPipeline", "_diffusers_version": "0.8.0.dev0",
        NULL_EMBEDDINGS: ["vq_diffusion", "LearnedClassifierFreeSamplingEmbeddings"],
        "scheduler": ["diffusers", "VQDiffusionScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "transformer": ["diffusers", "Transformer2DModel"],
        "vqvae": ["diffusers", "VQModel"]})
    write_json(folder / "tokenizer" / "tokenizer_config.json", {"model_max_length": MAX_LENGTH, "pad_token": PAD_TOKEN})
    write_json(folder / "text_encoder" / "config.json", dict(TEXT_CONFIG, architectures=["CLIPTextModel"], model_type="clip_text_model"))
    state = {k.removeprefix("text_model."): v for k, v in fp16_state(text_model).items() if not k.endswith("position_ids")}
    write_safetensors(folder / "text_encoder" / "model.safetensors", {"text_model." + k: v for k, v in state.items()})
    write_json(folder / "transformer" / "config.json", dict(TRANSFORMER_CONFIG, _class_name="Transformer2DModel"))
    write_safetensors(folder / "transformer" / "diffusion_pytorch_model.safetensors", fp16_state(transformer))
    write_json(folder / "scheduler" / "scheduler_config.json",
               {"_class_name": "VQDiffusionScheduler", "num_vec_classes": TRANSFORMER_CONFIG["num_vector_embeds"],
                "num_train_timesteps": TIMESTEPS})
    write_json(folder / NULL_EMBEDDINGS / "config.json",
               {"_class_name": "LearnedClassifierFreeSamplingEmbeddings", "learnable": True,
                "hidden_size": TEXT_CONFIG["hidden_size"], "length": MAX_LENGTH})
    write_safetensors(folder / NULL_EMBEDDINGS / "diffusion_pytorch_model.safetensors",
                      {"embeddings": null_embeddings.detach().half()})


def copy_tokenizer(source, target):
    target.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        if (source / name).resolve() != (target / name).resolve():
            shutil.copyfile(source / name, target / name)


# ---- files ---------------------------------------------------------------------------------------------------------

def write_diffusers_folder(folder, model):
    write_json(folder / "config.json", {"_class_name": type(model).__name__, **model.config})
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", fp16_state(model))


def fp16_state(model):
    return {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}


def write_safetensors(path, state):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(state, str(partial))
    partial.replace(path)  # a run stopped while saving leaves the previous file whole


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
