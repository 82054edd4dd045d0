"""Truncation sampling for VQ-Diffusion: keep, per token, the most likely classes whose probabilities add up to the
rate, drop the rest.

For rate < 1 the kept set is exactly diffusers' `VQDiffusionPipeline.truncate`: the same descending order, the same
float32 cumulative sum, the same classes at ties. Kept classes are a prefix of the sorted order, so only the sorted
values are needed: the last kept value is a threshold, and every class at or above it is kept. Sorting values alone
(numpy's vectorised sort on CPU) is several times faster than torch.sort, which also orders the indices. Where the cut
falls inside a run of equal values, which of the equal classes stay depends on the order torch.sort gives ties, so
those few tokens go through torch.sort exactly as diffusers does.
rate = 1 keeps every class (diffusers still drops a tail there, because the float32 cumulative sum reaches 1 early).
"""

import torch

from .errors import VQCoreError


def check_rate(rate):
    """The truncation rate as a float in (0, 1]."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise VQCoreError(f"truncation rate must be a number in (0, 1]; got {rate!r}")
    return float(rate)


def truncate(log_probs, rate, fill_value=-torch.inf):
    """log_probs (B, C, N) -> a copy with the dropped classes set to fill_value (log 0 by default).

    A class is kept when the probability mass of the classes more likely than it is below `rate`, so the most
    likely class is always kept. For rate < 1 the copy is laid out class-last in memory (a transposed view of a
    contiguous (B, N, C) tensor); an input laid out that way is read without a transposing copy.
    The rate is not checked here, on every sampling step: sample() checks it once (check_rate).
    """
    if rate == 1:
        return log_probs.clone()
    batch, classes, tokens = log_probs.shape
    # One row of class values per token: a view of a class-last input, else a copy.
    rows = log_probs.detach().transpose(1, 2).reshape(-1, classes).contiguous()
    values = sorted_descending(rows)
    # Class j + 1 is kept when the mass of classes 0..j is below the rate. That mass only grows along a row, so those
    # classes are a prefix whose length a binary search finds (the rate as a float32 value, as diffusers compares).
    mass = values.exp().cumsum_(dim=1)
    below = torch.full((len(rows), 1), rate, dtype=mass.dtype, device=mass.device)
    kept_count = 1 + torch.searchsorted(mass, below).clamp_(max=classes - 1)
    last_kept = values.gather(1, kept_count - 1)
    first_dropped = values.gather(1, kept_count.clamp(max=classes - 1))
    kept = torch.where(rows < last_kept, fill_value, rows)
    tied = ((first_dropped == last_kept) & (kept_count < classes)).squeeze(1).nonzero().squeeze(1)
    if len(tied):
        kept[tied] = truncate_sorting_indices(rows[tied], rate, fill_value)
    return kept.view(batch, tokens, classes).transpose(1, 2)


def sorted_descending(rows):
    """Each row's values, largest first. numpy sorts float32/float64 rows on CPU with SIMD and without indices."""
    if rows.device.type != "cpu" or rows.dtype not in (torch.float32, torch.float64):
        return torch.sort(rows, dim=1, descending=True).values
    ascending = rows.neg()
    ascending.numpy().sort(axis=1)
    return ascending.neg_()


def truncate_sorting_indices(rows, rate, fill_value):
    """diffusers' procedure on rows (R, C): sort with indices, cumulative sum, drop, scatter back."""
    sorted_rows, order = torch.sort(rows, dim=1, descending=True)
    mass_before = sorted_rows.exp().cumsum_(dim=1)
    dropped_sorted = torch.empty_like(mass_before, dtype=torch.bool)
    dropped_sorted[:, 0] = False  # the most likely class is always kept
    torch.lt(mass_before[:, :-1], rate, out=dropped_sorted[:, 1:]).logical_not_()
    return mass_before.scatter_(1, order, sorted_rows.masked_fill_(dropped_sorted, fill_value))
