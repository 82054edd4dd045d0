"""The `ui` payloads the front end draws (documented in web/docs/ui_payloads.md): plain JSON numbers only."""

import math

import torch

MAX_BINS = 64
MAX_MAP_SIDE = 32


def token_usage(indices: torch.Tensor, codebook: int) -> list:
    """vqcore_tokens: one entry per image of a (B, h, w) token batch."""
    entries = []
    bins = min(MAX_BINS, codebook)
    for tokens in indices.cpu():
        h, w = tokens.shape
        flat = tokens.flatten()
        # bin i counts i*K//B <= index < (i+1)*K//B
        edges = torch.tensor([(i + 1) * codebook // bins for i in range(bins)])
        histogram = torch.bincount(torch.bucketize(flat, edges, right=True), minlength=bins)[:bins]
        rows = torch.linspace(0, h - 1, min(h, MAX_MAP_SIDE)).round().long()
        cols = torch.linspace(0, w - 1, min(w, MAX_MAP_SIDE)).round().long()
        small = tokens[rows][:, cols]
        entries.append({"grid": [int(h), int(w)], "codebook": int(codebook), "used": int(flat.unique().numel()),
                        "histogram": [int(v) for v in histogram], "map": [int(v) for v in small.flatten()],
                        "map_grid": [int(small.shape[0]), int(small.shape[1])]})
    return entries


def tiles(image_hw, tile_px: int, seconds: float) -> list:
    """vqcore_tiles: the tile grid over an image and the mean time per tile (tiles never overlap: each carries
    the halo its convolutions need instead)."""
    height, width = (int(v) for v in image_hw)
    grid = [max(1, math.ceil(height / tile_px)), max(1, math.ceil(width / tile_px))]
    count = grid[0] * grid[1]
    return [{"grid": grid, "tile_px": int(tile_px), "image_px": [height, width],
             "ms_per_tile": float(1000 * seconds / count)}]


def sampler(steps: int, seconds: float, mode: str) -> list:
    return [{"steps": int(steps), "steps_per_s": float(steps / seconds) if seconds > 0 else 0.0, "mode": str(mode)}]
