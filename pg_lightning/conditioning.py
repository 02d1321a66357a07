"""The lecture's conditioning example (§8.1, after Peters & Schaal 2008): vanilla vs natural gradient.

One-step problem: s ~ N(0, v) with a small variance v, policy a ~ N(k·s, σ²) with parameters
θ = (k, σ), reward r = -(a + s/2)². Then

    J(k, σ)  = -(v (k + 1/2)² + σ²)                   optimum k* = -1/2, σ → 0
    ∇J       = (-2 v (k + 1/2), -2 σ)
    F(k, σ)  = diag(v / σ², 2 / σ²)                   (Fisher of the Gaussian policy)
    F⁻¹ ∇J   = (-2 σ² (k + 1/2), -σ³)

σ affects the output far more than k does (v ≪ 1), so the vanilla gradient points almost straight at
σ = 0: it collapses exploration long before k is right, and its sampled estimate, whose scores grow
like 1/σ, gets noisier as it does. The natural gradient measures steps by how much they change the
policy (a KL radius) and heads for k* at every σ.

    python -m pg_lightning.conditioning [--out conditioning.png] [--iterations 200] [--seeds 5]

writes the two gradient fields over (k, σ) and the learning curves of both methods from σ = 0.1.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

TARGET = -0.5  # k*: the reward is -(a - k* s)²
STATE_VAR = 0.01  # v = E[s²]: small, so that k moves the action far less than σ does


def objective(k: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """J(k, σ) = -(v (k - k*)² + σ²)."""
    return -(STATE_VAR * (k - TARGET) ** 2 + sigma**2)


def vanilla_gradient(k: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ∇J = (-2 v (k - k*), -2 σ)."""
    return -2 * STATE_VAR * (k - TARGET), -2 * sigma


def fisher_diagonal(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal of the Fisher matrix of N(k s, σ²) over (k, σ) with E[s²] = v: (v/σ², 2/σ²)."""
    return STATE_VAR / sigma**2, 2 / sigma**2


def natural_gradient(k: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact F⁻¹ ∇J = (-2 σ² (k - k*), -σ³)."""
    g_k, g_sigma = vanilla_gradient(k, sigma)
    f_k, f_sigma = fisher_diagonal(sigma)
    return g_k / f_k, g_sigma / f_sigma


def sampled_gradient(k: float, sigma: float, batch: int, generator: torch.Generator) -> torch.Tensor:
    """REINFORCE estimate of ∇J from ``batch`` one-step episodes, leave-one-out average baseline."""
    s = math.sqrt(STATE_VAR) * torch.randn(batch, generator=generator, dtype=torch.float64)
    a = k * s + sigma * torch.randn(batch, generator=generator, dtype=torch.float64)
    r = -((a - TARGET * s) ** 2)
    score = torch.stack([(a - k * s) * s / sigma**2, ((a - k * s) ** 2 - sigma**2) / sigma**3], dim=1)
    baseline = (r.sum() - r) / (batch - 1)
    return (score * (r - baseline)[:, None]).mean(0)


def learning_curve(method: str, iterations: int, seed: int, k0: float = 1.0, sigma0: float = 0.1,
                   batch: int = 64, lr: float = 0.1, max_kl: float = 0.01) -> list[float]:
    """J after each step of sampled-gradient ascent: ``vanilla`` (θ += lr·ĝ) or ``natural`` (KL radius)."""
    generator = torch.Generator().manual_seed(seed)
    k, sigma = k0, sigma0
    curve = [float(objective(torch.tensor(k), torch.tensor(sigma)))]
    for _ in range(iterations):
        g = sampled_gradient(k, sigma, batch, generator)
        if method == "vanilla":
            step = lr * g
        else:
            f = torch.tensor(fisher_diagonal(torch.tensor(sigma)), dtype=torch.float64)
            direction = g / f
            step = math.sqrt(2 * max_kl / float(direction @ (f * direction))) * direction
        k, sigma = k + float(step[0]), max(sigma + float(step[1]), 1e-3)  # σ must stay positive
        curve.append(float(objective(torch.tensor(k), torch.tensor(sigma))))
    return curve


def plot(out: Path, iterations: int, seeds: int) -> dict[str, float]:
    """Write the figure; returns the median final J of each method."""
    from pg_lightning.plot import pyplot, save_figure


    k, sigma = torch.meshgrid(torch.linspace(-2.0, 1.5, 15), torch.linspace(0.05, 1.0, 12), indexing="ij")
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4.3))
    for ax, (title, field) in zip(axes[:2], (("vanilla gradient ∇J", vanilla_gradient), ("natural gradient F⁻¹∇J", natural_gradient))):
        u, v = field(k, sigma)
        norm = torch.sqrt(u**2 + v**2).clamp(min=1e-12)  # arrows show directions; length is not comparable
        ax.quiver(k, sigma, u / norm, v / norm, angles="xy", color="tab:blue")
        ax.plot([TARGET], [0.05], "r*", markersize=14)
        ax.set_xlabel("k")
        ax.set_ylabel("σ")
        ax.set_title(title)
    finals = {}
    labels = {"vanilla": "vanilla, lr 0.1", "natural": "natural, KL radius 0.01"}
    for method, color in (("vanilla", "tab:orange"), ("natural", "tab:green")):
        curves = torch.tensor([learning_curve(method, iterations, seed) for seed in range(seeds)])
        median = curves.median(0).values
        finals[method] = float(median[-1])
        axes[2].plot(median, color=color, label=f"{labels[method]} (median, range of {seeds} seeds)")
        axes[2].fill_between(range(iterations + 1), curves.min(0).values, curves.max(0).values, color=color, alpha=0.2)
    axes[2].set_yscale("symlog", linthresh=0.01)
    axes[2].set_xlabel("iteration (64 sampled episodes each)")
    axes[2].set_ylabel("J(k, σ)  (0 is optimal)")
    axes[2].set_title("sampled-gradient ascent from k = 1, σ = 0.1")
    axes[2].legend()
    save_figure(fig, out, dpi=100)
    return finals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("conditioning.png"))
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    finals = plot(args.out, args.iterations, args.seeds)
    print(f"wrote {args.out}; median final J: vanilla {finals['vanilla']:.4g}, natural {finals['natural']:.4g}")


if __name__ == "__main__":
    main()
