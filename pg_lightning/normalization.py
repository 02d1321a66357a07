"""Observation normalisation: a running mean and variance of every observation seen, inside the network.

    s̃ = clip((s - μ) / sqrt(σ² + ε), -c, c)          μ, σ²: over all observations of all batches so far

Andrychowicz et al. 2021 ("What matters in on-policy RL") find it the most important of the continuous-control
details; Huang et al. 2022 list it among PPO's. The statistics are buffers of ``NormalizedObservations``, the
module that wraps the policy (and V_φ): a saved, loaded or evaluated policy carries them, and evaluation
uses them as they are.

When they change (``normalizer_updates``):

- ``batch`` (the default): after each iteration's update, from that batch's observations (``update``). The
  batch was collected, and the gradient is taken, with the same statistics, so the on-policy gradient stays the
  gradient of the policy that acted; the next batch is collected with the new ones. With several processes
  each rank's sums are all-reduced first, so every rank holds the statistics of the whole batch.
- ``step``: as SB3's ``VecNormalize`` and CleanRL's wrappers, at every env step, before the policy acts on the
  step's observation (``NormalizedObservations.observe``), so the first batch is normalised too and nothing
  lags by a batch. Each step's μ and scale are recorded, and training reads ``acted_inputs``: every step's
  input exactly as the policy saw it, with the normalisers passed through (``inputs_normalized``). So the
  gradient is still that of the policy that acted. At the batch's end the statistics are set again from the
  ones before the batch and the batch's all-reduced sums: the ranks, which each saw only their own steps
  during the rollout, agree again before the update.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from pg_lightning.distributed import LOCAL, Reduction
from pg_lightning.policies import is_recurrent


class RunningNormalizer(nn.Module):
    """``x [..., *shape] ↦ clip((x - μ) / sqrt(σ² + ε), -clip, clip)``; μ, σ² and the count are float64 buffers.

    Args:
        shape: the shape of one observation.
        clip: the bound on a normalised entry (10, as CleanRL and SB3).
        eps: added to σ² (a constant entry would divide by zero).
    """

    def __init__(self, shape: tuple[int, ...], clip: float = 10.0, eps: float = 1e-8):
        super().__init__()
        self.clip = clip
        self.eps = eps
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self._cache: tuple | None = None  # (key, μ, scale) of ``_affine``; not state
        self.passthrough = False  # ``inputs_normalized``: the inputs were normalised when the policy acted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.passthrough:
            return x
        mean, scale = self._affine(x.dtype)
        return ((x - mean) / scale).clamp(-self.clip, self.clip)

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copies of (μ, σ², count): what ``restore`` sets back."""
        return self.mean.clone(), self.var.clone(), self.count.clone()

    def restore(self, statistics: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        for buffer, value in zip((self.mean, self.var, self.count), statistics):
            buffer.copy_(value)

    def _affine(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """μ and sqrt(σ² + ε) in ``dtype``, computed again only after the buffers changed (an update, a load:
        their version counters), not at every env step. (Tensors made in inference mode stay in it.)"""
        key = (dtype, self.mean.device, self.mean._version, self.var._version, torch.is_inference_mode_enabled())
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.mean.to(dtype), (self.var + self.eps).sqrt().to(dtype))
        return self._cache[1], self._cache[2]

    @torch.no_grad()
    def update(self, x: torch.Tensor, reduction: Reduction = LOCAL) -> None:
        """Merge the observations ``x [N, *shape]`` (over all ranks) into the running statistics.

        Chan et al.'s parallel update: with the batch's n_b, μ_b, σ²_b and δ = μ_b - μ,
        μ ← μ + δ n_b / n,   n σ² ← n_a σ²_a + n_b σ²_b + δ² n_a n_b / n,   n = n_a + n_b.
        The batch's moments come from all-reduced sums Σ1, Σx, Σx², in float64.
        """
        x = x.reshape(-1, *self.mean.shape).to(torch.float64)
        sums = reduction.sum(torch.cat([x.new_tensor([len(x)]), x.sum(0).reshape(-1), (x * x).sum(0).reshape(-1)]))
        n_b = sums[0]
        if n_b == 0:
            return
        size = self.mean.numel()
        mean_b = (sums[1 : 1 + size] / n_b).reshape(self.mean.shape)
        var_b = ((sums[1 + size :] / n_b).reshape(self.mean.shape) - mean_b**2).clamp(min=0.0)
        self._merge(n_b, mean_b, var_b)

    @torch.no_grad()
    def update_local(self, x: torch.Tensor) -> None:
        """``update`` with this process's observations only, without packing sums for an all-reduce (about 0.7 of its
        time): the per-step update of ``normalizer_updates=step`` (the batch's all-reduce comes at its end)."""
        x = x.reshape(-1, *self.mean.shape).to(torch.float64)
        if len(x):
            self._merge(len(x), x.mean(0), x.var(0, unbiased=False))

    def _merge(self, n_b: torch.Tensor | int, mean_b: torch.Tensor, var_b: torch.Tensor) -> None:
        """Chan et al.'s merge of a batch's n_b, μ_b, σ²_b into the statistics (see ``update``)."""
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.var.copy_((n_a * self.var + n_b * var_b + delta**2 * n_a * n_b / n) / n)
        self.mean.add_(delta * n_b / n)
        self.count.copy_(n)


class NormalizedObservations(nn.Module):
    """``module(normalizer(obs))``: a policy or V_φ that sees normalised observations.

    The wrapped module's outputs are unchanged in kind (a ``Distribution`` for a policy, values for V_φ), so it
    plugs in wherever the module did. Its state dict holds the module's parameters under ``module.`` and the
    statistics under ``normalizer.``.
    """

    def __init__(self, module: nn.Module, observation_shape: tuple[int, ...], clip: float = 10.0):
        super().__init__()
        self.module = module
        self.normalizer = RunningNormalizer(observation_shape, clip=clip)
        self._rows: list | None = None  # per-step updates: the (μ, scale) of this batch's steps; None between batches
        self._before: tuple | None = None  # and the statistics before the batch

    def forward(self, obs: torch.Tensor, *state):
        """``module(normalizer(obs), *state)``: a recurrent policy's state and episode starts pass through."""
        return self.module(self.normalizer(obs), *state)

    @property
    def recurrent(self) -> bool:
        return is_recurrent(self.module)

    def initial_state(self, batch_size: int) -> torch.Tensor:
        return self.module.initial_state(batch_size)

    def step(self, obs: torch.Tensor, state: torch.Tensor):
        return self.module.step(self.normalizer(obs), state)

    def features(self, obs: torch.Tensor, state: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        return self.module.features(self.normalizer(obs), state, first)

    @property
    def feature_size(self) -> int:
        return self.module.feature_size

    def update_normalizer(self, obs: torch.Tensor, reduction: Reduction = LOCAL) -> None:
        self.normalizer.update(obs, reduction)

    # Per-step updates (``normalizer_updates=step``, see the module doc): observe at every step; at the batch's end
    # rewind, update_normalizer with the whole batch, then acted_inputs.

    @torch.no_grad()
    def observe(self, obs: torch.Tensor, rows: torch.Tensor) -> None:
        """Before the policy acts on step t's ``obs [B, *o]``: its ``rows [B]`` of the batch's episodes join the
        statistics (this process's only), and the μ and scale the policy then uses are recorded for step t."""
        if self._rows is None:  # the batch's first step: the statistics to merge the whole batch into at its end
            self._rows, self._before = [], self.normalizer.statistics()
        self.normalizer.update_local(obs[rows])
        mean, scale = self.normalizer._affine(obs.dtype)
        self._rows.append((mean.clone(), scale.clone()))

    def settled_statistics(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(μ, σ², count) as of the last batch trained on: during a rollout with per-step updates, the ones before
        it (what a checkpoint written mid-batch, e.g. after an env error, should keep)."""
        return self._before if self._rows is not None else self.normalizer.statistics()

    def rewind(self) -> None:
        """The statistics back to the ones before this batch's per-step updates, to merge the whole batch into them
        with ``update_normalizer`` (over every rank); then ``acted_inputs``."""
        self.normalizer.restore(self._before)

    @torch.no_grad()
    def acted_inputs(self, obs: torch.Tensor) -> torch.Tensor:
        """``obs [T + 1, B, *o]`` as the policy saw them, ``clip((s_t - μ_t) / scale_t)`` with each step's recorded
        μ_t and scale_t (the same float ops as ``forward``, so the same numbers). Row T, the bootstrap point, is
        normalised with the statistics as they are now (merged, after ``rewind``)."""
        if self._rows is None or len(self._rows) != len(obs) - 1:
            steps = 0 if self._rows is None else len(self._rows)
            raise RuntimeError(f"acted_inputs: {steps} observed steps for a batch of {len(obs) - 1}; the collector "
                               "calls observe once per step")
        rows, self._rows = self._rows, None
        means = torch.stack([mean for mean, _ in rows]).unsqueeze(1)
        scales = torch.stack([scale for _, scale in rows]).unsqueeze(1)
        acted = ((obs[:-1] - means) / scales).clamp(-self.normalizer.clip, self.normalizer.clip)
        return torch.cat([acted, self.normalizer(obs[-1:])])


@contextmanager
def inputs_normalized(*models: nn.Module | None):
    """Inside it, the observation normalisers of ``models`` pass their inputs through: the inputs are the
    ``acted_inputs`` of a per-step batch, normalised already."""
    normalizers = [m.normalizer for m in models if isinstance(m, NormalizedObservations)]
    for normalizer in normalizers:
        normalizer.passthrough = True
    try:
        yield
    finally:
        for normalizer in normalizers:
            normalizer.passthrough = False


class RewardScaler(nn.Module):
    """Rewards divided by the running standard deviation of the discounted return (not centred):

        G_t = γ G_{t-1} + r_t  (G = 0 at an episode's first step),   r̃_t = r_t / sqrt(Var[G] + ε)

    as gymnasium's ``NormalizeReward`` and CleanRL's PPO do: the scale of Ψ and of V_φ's targets stays near 1
    whatever the env's reward units. ``Var[G]`` is a ``RunningNormalizer`` of shape ``()`` (a buffer: saved in
    checkpoints, all-reduced over ranks). ``returns`` is each env's G so far, carried across batches whose
    episodes run on (not a buffer: DDP would overwrite each rank's with rank 0's; the module checkpoints it).

    ``scale(batch)`` uses the statistics from before the batch, so a batch's weights do not depend on its own
    rewards through the scale; ``update(batch)`` then adds the batch's G_t.
    """

    def __init__(self, num_envs: int, gamma: float, eps: float = 1e-8):
        super().__init__()
        self.gamma = gamma
        self.eps = eps
        self.returns = torch.zeros(num_envs, dtype=torch.float64)
        self.stats = RunningNormalizer(())

    def scale(self, rew: torch.Tensor) -> torch.Tensor:
        """``rew [T, B]`` divided by sqrt(Var[G] + ε) (rewards unchanged until a first batch was seen)."""
        if self.stats.count == 0:
            return rew
        return rew / (self.stats.var + self.eps).sqrt().to(rew.dtype)

    @torch.no_grad()
    def update(self, rew: torch.Tensor, valid: torch.Tensor, done: torch.Tensor, reduction: Reduction = LOCAL) -> None:
        """Run G_t through a batch ``[T, B]`` (invalid steps keep G; it restarts after a ``done``) and merge
        the valid steps' G_t into Var[G]."""
        self.stats.update(self._run_returns(rew, valid, done)[valid], reduction)

    @torch.no_grad()
    def scale_per_step(self, rew: torch.Tensor, valid: torch.Tensor, done: torch.Tensor, reduction: Reduction = LOCAL,
                       clip: float = 10.0) -> torch.Tensor:
        """``normalizer_updates=step``: ``rew [T, B]`` with r̃_t = clip(r_t / sqrt(Var_t[G] + ε), -clip, clip), where
        Var_t[G] includes the G_t of every step up to t (this process's), as SB3's ``VecNormalize`` scales a
        reward with the statistics its own step updated. The clip (10, as SB3 and CleanRL) bounds the first
        steps' rewards, scaled by the spread of a handful of returns. Then the batch's G_t of every rank join
        Var[G], as ``update``.

        Var_t from running sums in float64: n_t = n₀ + Σ_{u≤t} n_u, Σ₁ = n₀μ₀ + Σ G, Σ₂ = n₀(σ₀² + μ₀²) + Σ G²,
        Var_t = Σ₂ / n_t - (Σ₁ / n_t)²; no statistics yet (n_t = 0): the reward as it is.
        """
        returns = self._run_returns(rew, valid, done)
        stats = self.stats
        kept = torch.where(valid, returns, torch.zeros_like(returns))
        n = stats.count + valid.sum(1).double().cumsum(0)  # [T]
        first = stats.count * stats.mean + kept.sum(1).cumsum(0)
        second = stats.count * (stats.var + stats.mean**2) + (kept**2).sum(1).cumsum(0)
        seen = n > 0
        n_safe = n.clamp(min=1.0)
        var = torch.where(seen, (second / n_safe - (first / n_safe) ** 2).clamp(min=0.0), torch.ones_like(n))
        scale = torch.where(seen, (var + self.eps).sqrt(), torch.ones_like(n))
        stats.update(returns[valid], reduction)
        return (rew / scale.unsqueeze(1).to(rew.dtype)).clamp(-clip, clip)

    def _run_returns(self, rew: torch.Tensor, valid: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """G_t of every step of a batch ``[T, B]``, in float64, carrying each env's G on into the next batch."""
        returns = self.returns.to(rew.device)
        values = torch.empty(rew.shape, dtype=torch.float64, device=rew.device)
        for t in range(rew.shape[0]):  # a recurrence in t, vectorised over envs
            returns = torch.where(valid[t], self.gamma * returns + rew[t].double(), returns)
            values[t] = returns
            returns = torch.where(done[t], torch.zeros_like(returns), returns)
        self.returns = returns.cpu()
        return values
