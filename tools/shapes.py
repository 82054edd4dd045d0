"""The captioned shape pictures the demo VQ-Diffusion model is trained on: one filled shape of one colour on a plain
background, 32x32 pixels, with a caption such as "a red circle in the top left on a white background".

The position phrase may be left out (the shape is then in the centre) and so may the background phrase (any
background). Shapes keep their size and place within a few pixels, so a picture can be checked against its caption
by looking at it (tests/test_demo_models.py).
"""

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "yellow": (240, 210, 20), "green": (30, 170, 50), "blue": (30, 60, 220),
           "purple": (150, 40, 190)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
# Phrase -> centre of the shape as a fraction of the picture (x, y).
POSITIONS = {"in the center": (0.5, 0.5), "in the top left": (0.28, 0.28), "in the top right": (0.72, 0.28),
             "in the bottom left": (0.28, 0.72), "in the bottom right": (0.72, 0.72)}
HALF_SIZE = (0.17, 0.21)  # half the width of a shape, as a fraction of the picture (at 32 px: 5.4-6.7 px)
JITTER = 0.03  # of the centre, as a fraction of the picture
OMIT_POSITION, OMIT_BACKGROUND = 0.2, 0.2  # how often a caption leaves the phrase out


def caption(shape, colour, position=None, background=None):
    words = f"a {colour} {shape}"
    if position is not None:
        words += f" {position}"
    if background is not None:
        words += f" on a {background} background"
    return words


def sample_caption(rng):
    """A random (picture spec, caption) pair; the spec is what render_shape draws."""
    shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
    position, background = list(POSITIONS)[rng.integers(len(POSITIONS))], list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    said_position = None if rng.random() < OMIT_POSITION else position
    said_background = None if rng.random() < OMIT_BACKGROUND else background
    if said_position is None:
        position = "in the center"
    cx, cy = POSITIONS[position]
    spec = dict(shape=shape, colour=colour, background=background, half_size=rng.uniform(*HALF_SIZE),
                centre=(cx + rng.uniform(-JITTER, JITTER), cy + rng.uniform(-JITTER, JITTER)))
    return spec, caption(shape, colour, said_position, said_background)


def render_shape(spec, size=IMAGE_SIZE):
    """uint8 (size, size, 3) picture of spec (see sample_caption), drawn 4x larger and reduced (smooth edges)."""
    scale = 4
    big = size * scale
    image = Image.new("RGB", (big, big), BACKGROUNDS[spec["background"]])
    draw = ImageDraw.Draw(image)
    r = spec["half_size"] * big
    cx, cy = spec["centre"][0] * big, spec["centre"][1] * big
    fill = COLOURS[spec["colour"]]
    if spec["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif spec["shape"] == "square":
        s = r * 0.9  # a square of the circle's area reads as larger; keep their sizes alike
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    return np.asarray(image.resize((size, size), Image.LANCZOS))
