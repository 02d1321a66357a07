"""The natural policy gradient (lecture §8): F⁻¹ ∇J, scaled to a KL trust region.

``NaturalGradient`` is the policy's optimizer factory, and ``precondition`` turns the policy's vanilla
gradient into the natural-gradient step; ``update.update_policy`` calls it between the backward pass and the
optimizer step, with the batch and the on-policy loss the gradient came from:

    g  = ∇_θ J~                               the estimator's gradient (ascent direction)
    x  ≈ (F + damping·I)⁻¹ g                  by ``cg_iters`` of conjugate gradient
    Δθ = sqrt(2 δ / xᵀ F x) · x               so that ½ Δθᵀ F Δθ = δ = ``max_kl``

F is the Fisher information matrix of the batch's policy, used only through Fisher-vector products
F v = ∇_θ (∇_θ KL̄(θ_old, θ) · v) at θ = θ_old, where KL̄ is the mean over the batch's states of
KL(π_θold(·|s) ‖ π_θ(·|s)): its Hessian at θ_old is E_s E_a[∇ log π ∇ log πᵀ], the Fisher, exactly, and
double backprop never forms the P x P matrix (TRPO, Schulman et al. 2015, Appendix C).

With ``line_search=True`` (TRPO) the step is halved until the measured KL is ≤ δ and the importance-
sampled surrogate (1/N) Σ ρ_t Ψ_t improved (``functional.per_step_surrogate``, the one off-policy reuse
differentiates). The step is applied by plain SGD with lr 1 (the factory this
object is), so every other optimizer (a value baseline's) keeps its own first-order rule.

Distributed: ``torch.autograd.grad`` does not trigger DDP's all-reduce, so the gradient, every Fisher-
vector product and every line-search quantity is averaged across ranks here (docs/architecture.md, trap 6).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from pg_lightning import functional as F
from pg_lightning.batch import RolloutBatch
from pg_lightning.gradient import PolicyLoss
from pg_lightning.linalg import conjugate_gradient
from pg_lightning.linalg import flatten as _flat
from pg_lightning.linalg import unflatten_like as _unflatten
from pg_lightning.segments import masked_mean
from pg_lightning.recurrent import action_distribution
from pg_lightning.validation import non_negative, positive_int, positive_number, require


class NaturalGradient(Callback):
    """Natural-gradient steps with a KL radius for ``PolicyGradientModule``; see the module doc.

    Pass the same object as the module's ``optimizer=`` and in the trainer's ``callbacks``: as a callback it
    only checks, at setup, that it is the module's optimizer (the module refuses gradient clipping).

    Args:
        max_kl: δ, the KL radius of a step (mean KL between the batch's old and new policies).
        damping: Tikhonov damping added to F (F + damping·I), keeps CG well-posed.
        cg_iters: conjugate-gradient iterations.
        line_search: backtrack the step until KL ≤ δ and the surrogate improves (TRPO).
        backtrack_ratio: factor by which each backtracking step shrinks the step.
        max_backtracks: give up (take no step) after this many.
    """

    def __init__(
        self,
        max_kl: float = 0.01,
        damping: float = 0.1,
        cg_iters: int = 10,
        line_search: bool = False,
        backtrack_ratio: float = 0.5,
        max_backtracks: int = 10,
    ):
        require("optimizer.max_kl", max_kl, positive_number, "a positive number")
        require("optimizer.damping", damping, non_negative, "a non-negative number")
        require("optimizer.cg_iters", cg_iters, positive_int, "a positive integer")
        require("optimizer.backtrack_ratio", backtrack_ratio, lambda v: positive_number(v) and v < 1, "in (0, 1)")
        require("optimizer.max_backtracks", max_backtracks, positive_int, "a positive integer")
        self.max_kl = max_kl
        self.damping = damping
        self.cg_iters = cg_iters
        self.line_search = line_search
        self.backtrack_ratio = backtrack_ratio
        self.max_backtracks = max_backtracks
        self.last_stats: dict[str, float] = {}

    def __call__(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The optimizer that applies the step this callback writes into ``.grad``: SGD, lr 1."""
        return torch.optim.SGD(params, lr=1.0)

    # --- Lightning hooks -------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if getattr(pl_module, "optimizer_factory", None) is not self:
            raise ValueError(
                "NaturalGradient must also be the module's optimizer: PolicyGradientModule(..., optimizer=ng) "
                "with the same object in Trainer(callbacks=[ng])"
            )

    def precondition(
        self, policy: nn.Module, batch: RolloutBatch, loss: PolicyLoss, reduce: Callable[[torch.Tensor], torch.Tensor]
    ) -> dict[str, float]:
        """Turn the policy's vanilla gradient (in ``.grad``, from ``loss``) into the natural-gradient step.

        Called by ``update.update_policy`` between the backward pass and the optimizer step, with the batch
        and the on-policy loss the gradient came from. ``reduce`` averages a tensor across processes.
        Returns the step's statistics, logged as ``npg/*``.
        """
        params = [p for p in policy.parameters() if p.requires_grad]
        gradient = reduce(-_flat([p.grad for p in params]))  # ascent direction of J
        step, stats = self.step(policy, batch, batch.valid, gradient, reduce, surrogate=_surrogate(batch, loss))
        for p, delta in zip(params, _unflatten(step, params)):
            p.grad = -delta  # SGD with lr 1: θ ← θ - grad = θ + Δθ
        self.last_stats = stats
        return {f"npg/{k}": v for k, v in stats.items()}

    # --- the step, usable without Lightning --------------------------------------------------------

    def step(self, policy: nn.Module, obs: torch.Tensor | RolloutBatch, mask: torch.Tensor, gradient: torch.Tensor,
             reduce=lambda t: t, surrogate=None) -> tuple[torch.Tensor, dict[str, float]]:
        """The natural-gradient step Δθ ``[P]`` for ascent direction ``gradient`` on the states ``obs``
        (``[T, B, o]``, or a batch: a recurrent policy's Fisher-vector products go through its unrolled cell).

        ``reduce`` averages a tensor across processes (identity in one process). ``surrogate(policy)``,
        if given, returns the importance-sampled objective for the line search's improvement test.
        """
        params = [p for p in policy.parameters() if p.requires_grad]
        fvp = fisher_vector_product(policy, obs, mask, self.damping, reduce)
        direction = conjugate_gradient(fvp, gradient, self.cg_iters)
        curvature = direction @ fvp(direction)  # xᵀ(F + damping I)x
        scale = F.kl_step_scale(curvature, self.max_kl)
        full_step = scale * direction
        stats = {"step_size": scale, "grad_norm": float(gradient.norm()), "backtracks": 0.0}
        if not self.line_search:
            stats["kl"] = float(reduce(measured_kl(policy, obs, mask, params, full_step)))
            return full_step, stats
        with torch.no_grad():  # a value to compare, not to differentiate
            old_value = float(reduce(surrogate(policy))) if surrogate is not None else 0.0
        for backtrack in range(self.max_backtracks):
            candidate = full_step * self.backtrack_ratio**backtrack
            kl, new_value = _try_step(policy, obs, mask, params, candidate, surrogate, reduce)
            if kl <= self.max_kl and (surrogate is None or new_value > old_value):
                stats.update(kl=kl, backtracks=float(backtrack), improvement=new_value - old_value)
                return candidate, stats
        stats.update(kl=0.0, backtracks=float(self.max_backtracks), improvement=0.0)
        return torch.zeros_like(full_step), stats


def fisher_vector_product(policy: nn.Module, obs: torch.Tensor | RolloutBatch, mask: torch.Tensor, damping: float, reduce=lambda t: t):
    """``v ↦ (F + damping·I) v`` with F the Hessian at θ_old of the mean KL(π_θold ‖ π_θ) over ``obs[mask]``.

    The KL's gradient (with its graph) is built once; each product is one more backward pass.
    """
    params = [p for p in policy.parameters() if p.requires_grad]
    with torch.no_grad():
        old = _distribution(policy, obs)
    kl = masked_mean(torch.distributions.kl_divergence(old, _distribution(policy, obs)), mask)
    kl_grad = _flat(torch.autograd.grad(kl, params, create_graph=True))

    def product(v: torch.Tensor) -> torch.Tensor:
        hv = _flat(torch.autograd.grad(kl_grad @ v, params, retain_graph=True))
        return reduce(hv) + damping * v

    return product


def measured_kl(policy: nn.Module, obs: torch.Tensor | RolloutBatch, mask: torch.Tensor, params: list, step: torch.Tensor) -> torch.Tensor:
    """Mean KL(π_θ ‖ π_θ+step) over ``obs[mask]``; the parameters are restored afterwards."""
    with torch.no_grad():
        old = _distribution(policy, obs)
        with _moved(params, step):
            return masked_mean(torch.distributions.kl_divergence(old, _distribution(policy, obs)), mask)


def _try_step(policy, obs, mask, params, step, surrogate, reduce) -> tuple[float, float]:
    """(KL, surrogate value) at θ + step, averaged over processes; θ is restored afterwards."""
    kl = float(reduce(measured_kl(policy, obs, mask, params, step)))
    if surrogate is None:
        return kl, 0.0
    with torch.no_grad(), _moved(params, step):
        return kl, float(reduce(surrogate(policy)))


@contextmanager
def _moved(params: list[torch.Tensor], step: torch.Tensor):
    """Temporarily θ ← θ + step (in place)."""
    _add(params, step)
    try:
        yield
    finally:
        _add(params, -step)


def _surrogate(batch: RolloutBatch, loss: PolicyLoss) -> Callable[[nn.Module], torch.Tensor]:
    """(1/N) Σ_t ρ_t Ψ_t with ρ_t = π_θ(a_t|s_t) / π_θold(a_t|s_t) (``functional.per_step_surrogate``): the
    objective the line search must improve."""
    estimate, logp_old = loss.estimate, loss.logp.detach()

    def value(policy: nn.Module) -> torch.Tensor:
        rho = F.log_ratio(action_distribution(policy, batch).log_prob(batch.act), logp_old).exp()
        return F.per_step_surrogate(rho, estimate.weights, estimate.mask, estimate.num_segments)

    return value


def _distribution(policy: nn.Module, obs: torch.Tensor | RolloutBatch) -> torch.distributions.Distribution:
    """π(·|·) on the states ``obs`` ``[T, B, o]``, or on a batch's steps (a recurrent policy replays its sequences)."""
    return action_distribution(policy, obs) if isinstance(obs, RolloutBatch) else policy(obs)


def _add(params: list[torch.Tensor], step: torch.Tensor) -> None:
    for p, delta in zip(params, _unflatten(step, params)):
        p.add_(delta)
