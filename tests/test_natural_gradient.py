"""Natural gradient: Fisher-vector products, conjugate gradient, KL radius, and refused settings."""

from __future__ import annotations

import pytest
import torch
from test_configs import compose_with

from pg_lightning import NaturalGradient, VectorEnvFactory, collect, estimators, mlp_policy
from pg_lightning.linalg import conjugate_gradient
from pg_lightning.gradient import policy_loss
from pg_lightning.natural_gradient import fisher_vector_product, measured_kl
from pg_lightning.run import ConfigError, train


def tiny_problem(dtype=torch.float64):
    """A linear-softmax policy (3 inputs, 3 actions: 12 parameters) and 50 random states."""
    torch.manual_seed(0)
    import gymnasium as gym

    policy = mlp_policy(gym.spaces.Box(-1, 1, (3,)), gym.spaces.Discrete(3), hidden_sizes=[]).to(dtype)
    with torch.no_grad():
        for p in policy.parameters():
            p.normal_(0, 0.7)
    obs = torch.randn(50, 3, dtype=dtype)
    return policy, obs, torch.ones(50, dtype=torch.bool)


def explicit_matrix(matvec, size: int, dtype) -> torch.Tensor:
    return torch.stack([matvec(e) for e in torch.eye(size, dtype=dtype)], dim=1)


def test_fisher_vector_product_is_the_expected_score_outer_product():
    """F = E_s Σ_a π(a|s) ∇log π(a|s) ∇log π(a|s)ᵀ: enumerated exactly, and estimated from samples."""
    policy, obs, mask = tiny_problem()
    params = list(policy.parameters())
    size = sum(p.numel() for p in params)
    fisher = explicit_matrix(fisher_vector_product(policy, obs, mask, damping=0.0), size, torch.float64)
    exact = torch.zeros(size, size, dtype=torch.float64)
    for s in obs:
        probs = policy(s).probs
        for a in range(3):
            score = torch.cat([g.flatten() for g in torch.autograd.grad(policy(s).log_prob(torch.tensor(a)), params)])
            exact += probs[a].detach() * torch.outer(score, score)
    exact /= len(obs)
    torch.testing.assert_close(fisher, exact, rtol=1e-6, atol=1e-9)
    # The sampled Fisher E[∇log π ∇log πᵀ] over actions drawn from π converges to the same matrix.
    # Linear softmax: ∇_W log π(a|s) = (e_a - π(·|s)) sᵀ and ∇_b log π(a|s) = e_a - π(·|s).
    states = obs.repeat(400, 1)
    with torch.no_grad():
        probs = policy(states).probs
        actions = torch.distributions.Categorical(probs=probs).sample()
        residual = torch.nn.functional.one_hot(actions, 3).double() - probs
    scores = torch.cat([(residual[:, :, None] * states[:, None, :]).flatten(1), residual], dim=1)
    sampled = scores.T @ scores / len(scores)
    assert torch.linalg.norm(sampled - exact) / torch.linalg.norm(exact) < 0.1


def test_conjugate_gradient_matches_an_explicit_solve():
    policy, obs, mask = tiny_problem()
    size = sum(p.numel() for p in policy.parameters())
    fvp = fisher_vector_product(policy, obs, mask, damping=0.1)
    gradient = torch.randn(size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    solution = conjugate_gradient(fvp, gradient, iters=2 * size, residual_tol=1e-30)
    explicit = torch.linalg.solve(explicit_matrix(fvp, size, torch.float64), gradient)
    assert torch.linalg.norm(solution - explicit) / torch.linalg.norm(explicit) < 1e-5


def cartpole_step(line_search: bool, max_kl: float = 0.01):
    factory = VectorEnvFactory("CartPole-v1", num_envs=8)
    torch.manual_seed(0)
    policy = mlp_policy(*factory.spaces())
    batch = collect(policy, factory, num_steps=2048, seed=0)
    loss = policy_loss(policy, batch, estimators.baseline())
    params = [p for p in policy.parameters()]
    gradient = torch.cat([g.flatten() for g in torch.autograd.grad(-loss.loss, params)])
    from pg_lightning.natural_gradient import _surrogate

    ng = NaturalGradient(max_kl=max_kl, line_search=line_search)
    step, stats = ng.step(policy, batch.obs[:-1], batch.valid, gradient, surrogate=_surrogate(batch, loss))
    return float(measured_kl(policy, batch.obs[:-1], batch.valid, params, step)), stats


def test_kl_of_a_step_stays_near_the_radius_and_within_it_with_line_search():
    kl, stats = cartpole_step(line_search=False)
    assert 0.2 * 0.01 < kl <= 1.5 * 0.01, kl
    assert stats["kl"] == pytest.approx(kl)
    kl, stats = cartpole_step(line_search=True)
    assert 0 < kl <= 0.01 and stats["improvement"] > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_kl": 0.0}, "optimizer.max_kl must be a positive number, got 0.0"), ({"cg_iters": 0}, "optimizer.cg_iters"),
     ({"damping": -1.0}, "optimizer.damping")],
)
def test_nonsensical_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NaturalGradient(**kwargs)


def test_gradient_clipping_is_refused_with_what_to_do(tmp_path):
    cfg = compose_with("optimizer=natural_gradient", "trainer.gradient_clip_val=0.5", "logger=none")
    with pytest.raises(ConfigError, match=r"trainer.gradient_clip_val=0.5 cannot be combined .* optimizer.max_kl"):
        train(cfg, tmp_path)

    # From Python the module applies the same rule when a trainer sets it up (update.check_gradient_clipping).
    from pg_lightning.update import check_gradient_clipping

    with pytest.raises(ValueError, match="gradient_clip_val=1.0 cannot be combined with optimizer=natural_gradient"):
        check_gradient_clipping(1.0, natural_gradient=True)
    with pytest.raises(ValueError, match="gradient_clip_val=1.0 is not supported"):
        check_gradient_clipping(1.0, natural_gradient=False)
    check_gradient_clipping(None, natural_gradient=True)  # unset: nothing to refuse


def test_training_with_natural_gradient_keeps_the_value_optimizer(tmp_path):
    cfg = compose_with("optimizer=natural_gradient", "estimator=gae", "logger=csv", "steps_per_env=64", "total_env_steps=2048")
    summary = train(cfg, tmp_path)
    assert summary["status"] == "finished"
    import csv

    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("npg/kl")]
    assert rows and all(0 < float(r["npg/kl"]) <= 0.015 for r in rows)
    assert all(float(r["loss/value"]) > 0 for r in rows)


def test_conditioning_example_formulas_and_figure(tmp_path, capsys):
    from pg_lightning import conditioning as C

    k, sigma = torch.tensor(0.7, dtype=torch.float64, requires_grad=True), torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(C.objective(k, sigma), (k, sigma))
    torch.testing.assert_close(torch.stack(grads), torch.stack(C.vanilla_gradient(k.detach(), sigma.detach())))
    # The analytic Fisher is E[score scoreᵀ] of N(k s, σ²), s ~ N(0, v): check against samples.
    generator = torch.Generator().manual_seed(0)
    s = (C.STATE_VAR**0.5) * torch.randn(200_000, generator=generator, dtype=torch.float64)
    a = 0.7 * s + 0.2 * torch.randn(200_000, generator=generator, dtype=torch.float64)
    score = torch.stack([(a - 0.7 * s) * s / 0.2**2, ((a - 0.7 * s) ** 2 - 0.2**2) / 0.2**3], dim=1)
    sampled = score.T @ score / len(s)
    exact = torch.diag(torch.stack(C.fisher_diagonal(torch.tensor(0.2, dtype=torch.float64))))
    assert torch.linalg.norm(sampled - exact) / torch.linalg.norm(exact) < 0.02
    natural = torch.stack(C.natural_gradient(k.detach(), sigma.detach()))
    torch.testing.assert_close(natural, torch.linalg.solve(exact, torch.stack(grads)))

    C.main(["--out", str(tmp_path / "c.png"), "--iterations", "60", "--seeds", "3"])
    assert (tmp_path / "c.png").stat().st_size > 20_000
    vanilla, natural_final = (float(x) for x in capsys.readouterr().out.split("vanilla ")[1].split(", natural "))
    assert natural_final > vanilla, "from a small σ the natural gradient ends closer to the optimum"
