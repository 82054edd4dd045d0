"""VQ-Diffusion's mask-and-replace noise schedule and reverse step, in log space.

Forward process q(x_t | x_0): a token stays with probability a_t + b_t, becomes any other class with b_t each, or
becomes [MASK] (the last class, absorbing) with c_t. The tables are built exactly as diffusers builds them (numpy
float64, logs stored as float32), so the reverse step reproduces diffusers' VQDiffusionScheduler bit for bit.

Beyond diffusers:
* `timesteps(steps)` spreads fewer steps over the whole schedule (the original's fast sampling) instead of running
  only the last `steps` timesteps; the posterior then uses the exact transition from the next timestep s to t
  (a_{s->t} = att_t / att_s, 1 - c_{s->t} = (1 - ctt_t) / (1 - ctt_s)), which for s = t - 1 is the single-step table.
* q_posterior needs no one-hot tensor: the transition rows of a column take only two values (x_t's own class or any
  other class), so it works on per-column values and one scattered row, in place, in float32.
* `add_noise` samples q(x_t | x_0) for img2img and inpainting.
"""

import numpy as np
import torch

from .errors import VQCoreError
from .model_config import Configured

# log(1e-30) in float32: the log of a one-hot's zero entries in diffusers' index_to_log_onehot.
LOG_ZERO = float(torch.tensor(1e-30).log())


class VQDiffusionScheduler(Configured):
    def __init__(self, num_vec_classes, num_train_timesteps=100, alpha_cum_start=0.99999, alpha_cum_end=0.000009,
                 gamma_cum_start=0.000009, gamma_cum_end=0.99999):
        self.keep_config(locals())
        if num_vec_classes < 2 or num_train_timesteps < 2:
            raise VQCoreError(f"scheduler needs >= 2 classes and >= 2 timesteps; got {num_vec_classes}, {num_train_timesteps}")
        self.num_embed = num_vec_classes
        self.mask_class = num_vec_classes - 1
        self.num_train_timesteps = T = num_train_timesteps
        steps = np.arange(0, T) / (T - 1)
        # Cumulative alpha/gamma with the schedule's start value prepended (index t + 1 holds timestep t).
        self._att = np.concatenate(([1], steps * (alpha_cum_end - alpha_cum_start) + alpha_cum_start))
        self._ctt = np.concatenate(([0], steps * (gamma_cum_end - gamma_cum_start) + gamma_cum_start))
        at, bt, ct = self._transition(np.arange(0, T) - 1, np.arange(0, T))
        att, ctt = np.concatenate((self._att[1:], [1])), np.concatenate((self._ctt[1:], [0]))
        btt = (1 - att - ctt) / (num_vec_classes - 1)
        self.log_at, self.log_bt, self.log_ct = (_log32(v) for v in (at, bt, ct))
        self.log_cumprod_at, self.log_cumprod_bt, self.log_cumprod_ct = (_log32(v) for v in (att, btt, ctt))

    def _transition(self, s, t):
        """a, b, c of q(x_t | x_s) (float64 arrays; s = t - 1 gives diffusers' single-step tables, s = -1 means x_0)."""
        a = self._att[t + 1] / self._att[s + 1]
        c = 1 - (1 - self._ctt[t + 1]) / (1 - self._ctt[s + 1])
        return a, (1 - a - c) / (self.num_embed - 1), c

    def timesteps(self, steps, start=None):
        """The descending timesteps of a `steps`-step run from timestep `start` (default T - 1) down to 0.

        steps = start + 1 is the full schedule; fewer steps are spread evenly over it and always end at 0.
        """
        start = self.num_train_timesteps - 1 if start is None else int(start)
        if not 0 <= start < self.num_train_timesteps:
            raise VQCoreError(f"start timestep must lie in [0, {self.num_train_timesteps - 1}]; got {start}")
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= start + 1:
            raise VQCoreError(f"steps must be an integer in [1, {start + 1}] (the schedule has {start + 1} timesteps "
                              f"from {start}); got {steps!r}")
        if steps == 1:
            return [start]
        return [int(v) for v in np.round(np.linspace(start, 0, steps))]

    def last_timesteps(self, steps):
        """The last `steps` timesteps, steps - 1 down to 0: diffusers' set_timesteps(steps), which does not respace."""
        self.timesteps(steps)  # checks 1 <= steps <= T
        return list(range(steps - 1, -1, -1))

    def transition_logs(self, t, prev_t):
        """float32 logs of a, b, c of q(x_t | x_prev_t), taken from the single-step tables when prev_t = t - 1."""
        if prev_t == t - 1:
            return self.log_at[t], self.log_bt[t], self.log_ct[t]
        a, b, c = self._transition(np.array([prev_t]), np.array([t]))
        return _log32(a)[0], _log32(b)[0], _log32(c)[0]

    def q_posterior(self, log_p_x0, x_t, t, prev_t=None):
        """log p(x_prev | x_t) = log sum_x0 q(x_prev | x_t, x0) p(x0), (B, K, N), from log p(x0) (B, K - 1, N).

        Same operations on the same values as diffusers' q_posterior, in float32 and without (B, K, N) one-hots.
        """
        prev_t = t - 1 if prev_t is None else prev_t
        batch, classes, pixels = log_p_x0.shape
        device = log_p_x0.device
        is_mask = (x_t == self.mask_class)[:, None, :]
        own_class = torch.where(is_mask, 0, x_t[:, None, :])  # any valid row for masked columns; not used there

        def transition_values(a, b, c):
            """Per column: log q(x_t | x_s = x_t's class) and log q(x_t | x_s = another class); mask columns: c."""
            own = torch.logaddexp(torch.zeros(batch, 1, pixels, device=device) + a, b)
            other = torch.logaddexp(torch.full((batch, 1, pixels), LOG_ZERO, device=device) + a, b)
            return torch.where(is_mask, c, own), torch.where(is_mask, c, other)

        cum = [v[t].to(device) for v in (self.log_cumprod_at, self.log_cumprod_bt, self.log_cumprod_ct)]
        own_cum, other_cum = transition_values(*cum)
        out = torch.empty(batch, classes + 1, pixels, device=device)
        q = out[:, :-1]
        for item, source in zip(q, log_p_x0):  # 2-D copies: torch transposes a class-last log_p_x0 in cache-sized blocks
            item.copy_(source)
        q.sub_(other_cum)
        q.scatter_(1, own_class, torch.where(is_mask, q.gather(1, own_class), log_p_x0.gather(1, own_class) - own_cum))
        log_sum = torch.logsumexp(q, dim=1, keepdim=True)
        q.sub_(log_sum)
        a_prev, b_prev, c_prev = (v[prev_t].to(device) for v in (self.log_cumprod_at, self.log_cumprod_bt, self.log_cumprod_ct))
        torch.logaddexp(q.add_(a_prev), b_prev, out=q)
        own_step, other_step = transition_values(*(v.to(device) for v in self.transition_logs(t, prev_t)))
        own_rows = q.gather(1, own_class) + own_step
        q.add_(other_step).scatter_(1, own_class, torch.where(is_mask, q.gather(1, own_class), own_rows))
        out[:, -1:] = c_prev + torch.where(is_mask, 0.0, LOG_ZERO)
        return out.add_(log_sum)

    def step(self, log_p_x0, t, x_t, generator=None, prev_t=None):
        """Samples x_prev (B, N) from p(x_prev | x_t); at the last step (prev_t None at t = 0, or prev_t < 0) from
        p(x0) itself. One torch.rand per step, shaped as diffusers draws it, so a seeded run matches diffusers."""
        prev_t = t - 1 if prev_t is None else prev_t
        log_p = log_p_x0 if prev_t < 0 else self.q_posterior(log_p_x0, x_t, t, prev_t)
        return gumbel_argmax(log_p, generator)

    def add_noise(self, x0, t, generator=None):
        """Samples x_t ~ q(x_t | x0) for tokens x0 (B, N): kept, replaced by a uniform class, or masked."""
        a, b, c = (float(v[t]) for v in (self.log_cumprod_at, self.log_cumprod_bt, self.log_cumprod_ct))
        u = torch.rand(x0.shape, device=x0.device, generator=generator)
        random_class = torch.randint(0, self.num_embed - 1, x0.shape, device=x0.device, generator=generator)
        keep, replace = np.exp(a), np.exp(b) * (self.num_embed - 1)
        return torch.where(u < keep, x0, torch.where(u < keep + replace, random_class, self.mask_class))


def gumbel_argmax(log_p, generator=None):
    """argmax(log_p + Gumbel noise) over dim 1: a sample from softmax(log_p), noise drawn as diffusers draws it."""
    noise = torch.rand(log_p.shape, device=log_p.device, generator=generator)
    noise.add_(1e-30).log_().neg_().add_(1e-30).log_().neg_()
    return noise.add_(log_p).argmax(dim=1)


def _log32(values):
    return torch.log(torch.tensor(np.asarray(values).astype("float64"))).float()
