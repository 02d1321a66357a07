"""Independent peer of CS285 homework 2's policy-gradient loop on CartPole-v1 (plain torch + gymnasium).

Not part of pg_lightning and never imports it: it exists to check pg_lightning's results against a loop
written from the lecture's formulas alone.

Algorithm (one iteration)
    1. With ONE env, sample whole trajectories from the current policy, one after another, until the batch
       holds >= batch_size steps. The last trajectory is finished, never cut. CartPole-v1's own 500-step
       time limit ends an episode exactly like a termination (the homework does the same).
    2. Weight every step t of trajectory i by Psi_it:
         reinforce     Psi_it = R(tau_i) = sum_t' gamma^t' r_it'          (the whole trajectory's return)
         reward_to_go  Psi_it = Q_it     = sum_{t'>=t} gamma^(t'-t) r_it'
       --normalize standardises Psi over all steps of the batch: (Psi - mean) / (std + 1e-8) (the homework's
       normalisation). --baseline time (an extra, for the collapse study, see cs285_collapse.py) first
       subtracts from Psi_it the leave-one-out mean of Psi_jt over the OTHER trajectories j still running at
       step t: a baseline that depends only on t, so the estimator stays unbiased.
    3. Pseudo-loss  L = -(1/N) sum_i sum_t log pi(a_it | s_it) Psi_it,  N = number of trajectories in the
       batch, and one optimiser step on it (Adam by default; --optimizer sgd for the collapse study).

Settings (defaults): policy MLP 4 -> 64 -> 64 -> 2, tanh, categorical logits (torch default init); Adam,
lr 5e-3; gamma 1.0; batch 1000 steps; 100 iterations. Seeding: torch.manual_seed(seed) (initial weights),
numpy Generator(seed) (action sampling) and env.reset(seed=seed) once, then unseeded resets.
Final evaluation: mean undiscounted return of 20 episodes with the argmax action on a separate env whose
first reset is seeded with seed + 10000.

    python benchmarks/cs285_peer.py --estimator reward_to_go --normalize --batch-size 4000 \
        --seeds 0 1 2 3 4 --lr 5e-3 --gamma 1.0 --iterations 100 --out benchmarks/results/peer_rtg_norm.json

Prints one line per seed and the mean +- standard error over seeds; writes a JSON (rewritten after each
seed, so partial results survive) with the settings, per-seed final eval and per-iteration records.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: 2-core shared machine, no oversubscription

import gymnasium as gym
import numpy as np
import torch
from torch import nn

torch.set_num_threads(1)

EVAL_EPISODES = 20
EVAL_SEED_OFFSET = 10_000
NORM_EPS = 1e-8


def make_policy(obs_dim: int, n_actions: int, hidden: int = 64) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(obs_dim, hidden), nn.Tanh(),
        nn.Linear(hidden, hidden), nn.Tanh(),
        nn.Linear(hidden, n_actions),
    )


class NumpyActor:
    """The policy's current weights as numpy arrays, for acting one step at a time.

    With one env every action needs its own forward pass; torch's per-call overhead (tens of microseconds)
    would dominate the run on this CPU, a numpy matmul chain is a few microseconds. The log-probabilities
    that enter the loss are recomputed by the torch module itself on the whole batch, so the gradient is
    exactly torch's; the weights are the same numbers, so the sampling distribution is the policy's.
    """

    def __init__(self, policy: nn.Sequential):
        linears = [m for m in policy if isinstance(m, nn.Linear)]
        self.layers = [(m.weight.detach().double().numpy().copy(), m.bias.detach().double().numpy().copy())
                       for m in linears]

    def logits(self, obs: np.ndarray) -> np.ndarray:
        h = np.asarray(obs, dtype=np.float64)
        for k, (w, b) in enumerate(self.layers):
            h = h @ w.T + b
            if k < len(self.layers) - 1:
                h = np.tanh(h)
        return h

    def sample(self, obs: np.ndarray, rng: np.random.Generator) -> int:
        z = self.logits(obs)
        p = np.exp(z - z.max())
        cdf = np.cumsum(p)
        # inverse-CDF draw; min() guards the (rounding) case u * total == total
        return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(p) - 1))

    def greedy(self, obs: np.ndarray) -> int:
        return int(np.argmax(self.logits(obs)))


def run_episode(env: gym.Env, actor: NumpyActor, rng: np.random.Generator | None, seed: int | None = None):
    """One whole episode (until terminated or truncated). rng None = greedy (argmax) actions."""
    obs, _ = env.reset(seed=seed)
    observations, actions, rewards = [], [], []
    while True:
        action = actor.greedy(obs) if rng is None else actor.sample(obs, rng)
        observations.append(obs)
        actions.append(action)
        obs, reward, terminated, truncated, _ = env.step(action)
        rewards.append(float(reward))
        if terminated or truncated:
            break
    return np.asarray(observations, dtype=np.float32), np.asarray(actions, dtype=np.int64), np.asarray(rewards)


def collect_batch(env, actor, rng, batch_size: int, first_seed: int | None):
    """Whole trajectories until the step count reaches batch_size; the last one is never cut."""
    trajs, steps = [], 0
    while steps < batch_size:
        traj = run_episode(env, actor, rng, seed=first_seed)
        first_seed = None  # only the run's very first reset is seeded
        trajs.append(traj)
        steps += len(traj[2])
    return trajs, steps


def discounted_cumsum(rewards: np.ndarray, gamma: float) -> np.ndarray:
    out = np.empty_like(rewards)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def compute_psi(rewards_list, estimator: str, gamma: float, normalize: bool, baseline: str = "none"):
    """Per-trajectory arrays of Psi_it (see the module docstring), then the optional batch normalisation."""
    if estimator == "reinforce":
        psis = [np.full(len(r), discounted_cumsum(r, gamma)[0]) for r in rewards_list]
    elif estimator == "reward_to_go":
        psis = [discounted_cumsum(r, gamma) for r in rewards_list]
    else:
        raise ValueError(f"unknown estimator {estimator!r}")
    if baseline == "time":
        # leave-one-out mean over the other trajectories alive at step t: independent of trajectory i's own
        # actions, so subtracting it keeps the estimator unbiased; with no other trajectory at t, 0.
        horizon = max(len(p) for p in psis)
        total, count = np.zeros(horizon), np.zeros(horizon)
        for p in psis:
            total[: len(p)] += p
            count[: len(p)] += 1
        psis = [p - np.where(count[: len(p)] > 1, (total[: len(p)] - p) / np.maximum(count[: len(p)] - 1, 1), 0.0)
                for p in psis]
    elif baseline != "none":
        raise ValueError(f"unknown baseline {baseline!r}")
    flat = np.concatenate(psis)
    if normalize:
        flat = (flat - flat.mean()) / (flat.std() + NORM_EPS)
    return flat


def pseudo_loss(policy: nn.Module, trajs, psi: np.ndarray) -> torch.Tensor:
    """L = -(1/N) sum_i sum_t log pi(a_it|s_it) Psi_it over the whole batch in one forward pass."""
    obs = torch.as_tensor(np.concatenate([t[0] for t in trajs]))
    act = torch.as_tensor(np.concatenate([t[1] for t in trajs]))
    logp = torch.log_softmax(policy(obs), dim=-1).gather(1, act[:, None]).squeeze(1)
    return -(logp * torch.as_tensor(psi, dtype=torch.float32)).sum() / len(trajs)


def flat_params(policy: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in policy.parameters()])


def flat_grad(policy: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().reshape(-1) for p in policy.parameters()])


def evaluate(policy: nn.Module, seed: int, episodes: int = EVAL_EPISODES) -> float:
    env = gym.make("CartPole-v1")
    actor = NumpyActor(policy)
    returns = [run_episode(env, actor, None, seed=seed + EVAL_SEED_OFFSET if k == 0 else None)[2].sum()
               for k in range(episodes)]
    env.close()
    return float(np.mean(returns))


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


def train(seed: int, args, save_at: float | None = None, save_path: str | None = None,
          stop_at_save: bool = False) -> dict:
    """One run; returns the per-iteration record and the final evaluation.

    save_at/save_path: save policy + optimiser state (before that iteration's update) at the first iteration
    whose mean training return is >= save_at (the collapse study's "policy that has just reached 500");
    stop_at_save: return right after saving (no update, no final evaluation).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    env = gym.make("CartPole-v1")
    policy = make_policy(env.observation_space.shape[0], env.action_space.n)
    opt = make_optimizer(args.optimizer, policy.parameters(), args.lr)
    record = {"train_return": [], "env_steps": [], "n_traj": [], "grad_norm": [], "update_norm": []}
    env_steps, saved_at = 0, None
    for it in range(args.iterations):
        actor = NumpyActor(policy)
        trajs, steps = collect_batch(env, actor, rng, args.batch_size, first_seed=seed if it == 0 else None)
        env_steps += steps
        train_return = float(np.mean([t[2].sum() for t in trajs]))
        if save_at is not None and saved_at is None and train_return >= save_at:
            saved_at = it
            torch.save({"policy": policy.state_dict(), "opt": opt.state_dict(), "iteration": it,
                        "seed": seed, "env_steps": env_steps, "train_return": train_return}, save_path)
            if stop_at_save:
                env.close()
                record["saved_at_iteration"] = saved_at
                return record
        psi = compute_psi([t[2] for t in trajs], args.estimator, args.gamma, args.normalize, args.baseline)
        before = flat_params(policy)
        opt.zero_grad()
        pseudo_loss(policy, trajs, psi).backward()
        grad_norm = float(flat_grad(policy).norm())
        opt.step()
        record["train_return"].append(train_return)
        record["env_steps"].append(env_steps)
        record["n_traj"].append(len(trajs))
        record["grad_norm"].append(grad_norm)
        record["update_norm"].append(float((flat_params(policy) - before).norm()))
    env.close()
    record["final_eval"] = evaluate(policy, seed)
    record["final_train_return"] = record["train_return"][-1]
    record["saved_at_iteration"] = saved_at
    return record


def mean_se(xs) -> tuple[float, float]:
    xs = np.asarray(xs, dtype=float)
    se = float(xs.std(ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else float("nan")
    return float(xs.mean()), se


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--estimator", choices=["reinforce", "reward_to_go"], default="reward_to_go")
    p.add_argument("--normalize", action="store_true", help="standardise Psi over the batch's steps")
    p.add_argument("--baseline", choices=["none", "time"], default="none",
                   help="extra: subtract a leave-one-out per-timestep mean of Psi (collapse study)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--out", type=str, default=None, help="JSON path (rewritten after each seed)")
    return p


def main() -> None:
    args = build_parser().parse_args()
    settings = {k: getattr(args, k) for k in
                ("estimator", "normalize", "baseline", "optimizer", "batch_size", "seeds", "lr", "gamma", "iterations")}
    settings.update(env="CartPole-v1", hidden=[64, 64], activation="tanh", eval_episodes=EVAL_EPISODES,
                    eval_seed_offset=EVAL_SEED_OFFSET, norm_eps=NORM_EPS)
    result = {"settings": settings, "seeds": {}}
    print(f"settings: {settings}", flush=True)
    for seed in args.seeds:
        rec = train(seed, args)
        result["seeds"][str(seed)] = rec
        first500 = next((k for k, r in enumerate(rec["train_return"]) if r >= 500), None)
        print(f"seed {seed}: final eval {rec['final_eval']:.1f}  final train return {rec['final_train_return']:.1f}"
              f"  (first iteration at 500: {first500}, max train return {max(rec['train_return']):.1f})", flush=True)
        evals = [r["final_eval"] for r in result["seeds"].values()]
        m, se = mean_se(evals)
        result["summary"] = {"final_eval_mean": m, "final_eval_se": se, "n_seeds": len(evals),
                             "final_train_mean": mean_se([r["final_train_return"] for r in result["seeds"].values()])[0]}
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result))
    s = result["summary"]
    print(f"final eval over {s['n_seeds']} seeds: {s['final_eval_mean']:.1f} +- {s['final_eval_se']:.1f} (SE)"
          f"; final train return mean {s['final_train_mean']:.1f}", flush=True)


if __name__ == "__main__":
    main()
