"""Why reward-to-go + normalisation "collapses" on CartPole-v1 (gamma 1, Adam lr 5e-3, batch 4000) while
reinforce + normalisation stays at 500. Uses cs285_peer.py's loop; never imports pg_lightning.

    python benchmarks/cs285_collapse.py --seeds 1 2 3 --batches 30 --continue-iters 60 \
        --out benchmarks/results/collapse.json
    python benchmarks/cs285_collapse.py --ckpt-estimator reinforce --save-at 500 --seeds 0 1 2 3 4 \
        --continue-iters 0 --out benchmarks/results/collapse_at_cap.json

For each seed:
  1. Checkpoint: train reward_to_go + normalize (--ckpt-estimator; lr 5e-3, gamma 1, batch 4000, Adam) and save
     policy + Adam state at the first iteration whose mean training return is >= --save-at (490; before that
     iteration's update).
  2. Gradient statistics at that fixed policy theta0: K independent batches (batch 4000); on EACH batch the
     gradient of the pseudo-loss under every estimator of ESTIMATORS (same trajectories for all):
        SNR = ||g_bar||^2 / tr Cov(g)   (tr Cov = sum of per-coordinate sample variances, ddof 1),
        SNR_unbiased = (||g_bar||^2 - tr Cov / K) / tr Cov   (||g_bar||^2 overestimates ||E g||^2 by trCov/K).
     Optimiser steps for the same gradient stream: plain SGD's step lr*||g_k||, and Adam's step when the K
     gradients are fed, in order, to a fresh Adam at fixed theta0 (mean ||step|| over the last K/2, and the
     "directedness" ||sum of steps|| / sum of ||steps||: ~1 for a consistent direction, ~1/sqrt(n) for noise).
  3. Continuation (skipped with --continue-iters 0): from the checkpoint (policy + its Adam state) run --continue-iters more iterations with
     each estimator; record training return, ||step|| and the drift ||theta_t - theta0||.

Mechanism under test: at the 500 cap R(tau) = 500 for every trajectory, so normalised reinforce weights are all 0
and the update vanishes; reward-to-go Q_t = 500 - t depends on t only, so normalised Q stays of unit size while
E[grad log pi(a_t|s_t) f(t)] = 0: pure noise, which Adam (step ~ lr per coordinate whatever the gradient's size)
turns into a random walk of the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "1")

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cs285_peer as peer  # noqa: E402  (the peer loop, same folder)

torch.set_num_threads(1)

# name -> (estimator, gamma, normalize, baseline)
ESTIMATORS = {
    "reinforce+norm": ("reinforce", 1.0, True, "none"),
    "rtg+norm": ("reward_to_go", 1.0, True, "none"),
    "rtg+norm g0.99": ("reward_to_go", 0.99, True, "none"),
    "rtg+norm+time_baseline": ("reward_to_go", 1.0, True, "time"),
    "rtg (no norm)": ("reward_to_go", 1.0, False, "none"),
}
CONTINUE = ["reinforce+norm", "rtg+norm", "rtg+norm g0.99", "rtg+norm+time_baseline", "rtg+norm lr1e-3"]


def grad_of(policy, trajs, name):
    est, gamma, norm, base = ESTIMATORS[name]
    psi = peer.compute_psi([t[2] for t in trajs], est, gamma, norm, base)
    policy.zero_grad()
    peer.pseudo_loss(policy, trajs, psi).backward()
    return peer.flat_grad(policy).clone()


def adam_stream(grads: torch.Tensor, lr: float, betas=(0.9, 0.999), eps=1e-8):
    """Steps a fresh Adam would take on this gradient stream (theta held fixed)."""
    m = torch.zeros_like(grads[0])
    v = torch.zeros_like(grads[0])
    steps = []
    for t, g in enumerate(grads, start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        steps.append(lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps))
    return torch.stack(steps)


def grad_stats(policy, seed: int, k: int, batch_size: int, lr: float) -> dict:
    env = gym.make("CartPole-v1")
    rng = np.random.default_rng(seed + 20_000)
    actor = peer.NumpyActor(policy)
    grads = {name: [] for name in ESTIMATORS}
    returns, capped = [], []
    for b in range(k):
        trajs, _ = peer.collect_batch(env, actor, rng, batch_size, first_seed=seed + 20_000 if b == 0 else None)
        returns.append(float(np.mean([t[2].sum() for t in trajs])))
        capped.append(float(np.mean([len(t[2]) == 500 for t in trajs])))
        for name in ESTIMATORS:
            grads[name].append(grad_of(policy, trajs, name))
    env.close()
    out = {"batch_mean_return": float(np.mean(returns)), "fraction_of_trajectories_at_500": float(np.mean(capped))}
    for name, gs in grads.items():
        g = torch.stack(gs).double()
        g_bar = g.mean(0)
        tr_cov = float(g.var(0, unbiased=True).sum())
        mean_sq = float(g_bar.pow(2).sum())
        half = k // 2
        steps = adam_stream(g.float(), lr).double()
        tail = steps[half:]
        out[name] = {
            "mean_grad_sq_norm": mean_sq,
            "trace_cov": tr_cov,
            "snr": mean_sq / tr_cov if tr_cov > 0 else None,
            "snr_unbiased": (mean_sq - tr_cov / k) / tr_cov if tr_cov > 0 else None,
            "mean_grad_norm": float(g.norm(dim=1).mean()),
            "sgd_step_norm_mean": lr * float(g.norm(dim=1).mean()),
            "sgd_signal_step_norm": lr * math.sqrt(mean_sq),
            "adam_step_norm_mean_last_half": float(tail.norm(dim=1).mean()),
            "adam_directedness_last_half": float(tail.sum(0).norm() / tail.norm(dim=1).sum()) if float(tail.norm(dim=1).sum()) > 0 else None,
            "adam_over_sgd_step": float(tail.norm(dim=1).mean()) / (lr * float(g[half:].norm(dim=1).mean()))
            if float(g[half:].norm(dim=1).mean()) > 0 else None,
        }
    return out


def continuation(ckpt: dict, seed: int, name: str, iters: int, batch_size: int, lr: float) -> dict:
    """Continue training from the checkpoint (policy + Adam state) with one estimator."""
    lr_here = 1e-3 if name.endswith("lr1e-3") else lr
    est, gamma, norm, base = ESTIMATORS[name.replace(" lr1e-3", "")]
    env = gym.make("CartPole-v1")
    policy = peer.make_policy(4, 2)
    policy.load_state_dict(ckpt["policy"])
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    opt.load_state_dict(ckpt["opt"])
    for group in opt.param_groups:
        group["lr"] = lr_here
    rng = np.random.default_rng(seed + 30_000)  # same stream start for every estimator: paired comparison
    theta0 = peer.flat_params(policy)
    rec = {"train_return": [], "step_norm": [], "drift": []}
    for it in range(iters):
        trajs, _ = peer.collect_batch(env, peer.NumpyActor(policy), rng, batch_size,
                                      first_seed=seed + 30_000 if it == 0 else None)
        rec["train_return"].append(float(np.mean([t[2].sum() for t in trajs])))
        psi = peer.compute_psi([t[2] for t in trajs], est, gamma, norm, base)
        before = peer.flat_params(policy)
        opt.zero_grad()
        peer.pseudo_loss(policy, trajs, psi).backward()
        opt.step()
        after = peer.flat_params(policy)
        rec["step_norm"].append(float((after - before).norm()))
        rec["drift"].append(float((after - theta0).norm()))
    env.close()
    rec["final_eval"] = peer.evaluate(policy, seed)
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4000)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--save-at", type=float, default=490.0)
    p.add_argument("--ckpt-estimator", choices=["reward_to_go", "reinforce"], default="reward_to_go",
                   help="which (normalised, gamma 1) run produces the checkpoint")
    p.add_argument("--continue-iters", type=int, default=60)
    p.add_argument("--out", type=str, default="benchmarks/results/collapse.json")
    args = p.parse_args()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = {"settings": vars(args) | {"estimators": ESTIMATORS, "continue": CONTINUE}, "seeds": {}}
    for seed in args.seeds:
        ckpt_path = out_path.with_name(f"{out_path.stem}_ckpt_seed{seed}.pt")
        train_args = SimpleNamespace(estimator=args.ckpt_estimator, normalize=True, baseline="none", optimizer="adam",
                                     batch_size=args.batch_size, lr=args.lr, gamma=1.0, iterations=100)
        rec = peer.train(seed, train_args, save_at=args.save_at, save_path=str(ckpt_path), stop_at_save=True)
        if rec["saved_at_iteration"] is None:
            print(f"seed {seed}: never reached {args.save_at}", flush=True)
            continue
        ckpt = torch.load(ckpt_path, weights_only=True)
        print(f"seed {seed}: checkpoint at iteration {ckpt['iteration']} (train return {ckpt['train_return']:.1f})",
              flush=True)
        policy = peer.make_policy(4, 2)
        policy.load_state_dict(ckpt["policy"])
        stats = grad_stats(policy, seed, args.batches, args.batch_size, args.lr)
        print(f"  at checkpoint: batch mean return {stats['batch_mean_return']:.1f}, "
              f"trajectories at 500: {stats['fraction_of_trajectories_at_500']:.2f}", flush=True)
        for name in ESTIMATORS:
            s = stats[name]
            fmt = lambda x: "n/a" if x is None else f"{x:.3g}"  # noqa: E731
            print(f"  {name:24s} SNR {fmt(s['snr'])} (unbiased {fmt(s['snr_unbiased'])})  |g| {s['mean_grad_norm']:.3g}"
                  f"  SGD step {s['sgd_step_norm_mean']:.3g}  Adam step {s['adam_step_norm_mean_last_half']:.3g}"
                  f"  Adam directedness {fmt(s['adam_directedness_last_half'])}", flush=True)
        result["seeds"][str(seed)] = {"checkpoint_iteration": ckpt["iteration"],
                                      "checkpoint_train_return": ckpt["train_return"], "grad_stats": stats,
                                      "continuation": {}}
        out_path.write_text(json.dumps(result))
        for name in CONTINUE if args.continue_iters > 0 else []:
            c = continuation(ckpt, seed, name, args.continue_iters, args.batch_size, args.lr)
            result["seeds"][str(seed)]["continuation"][name] = c
            tr = c["train_return"]
            print(f"  continue {name:24s} train return min {min(tr):.0f} last {tr[-1]:.0f}  final eval {c['final_eval']:.1f}"
                  f"  mean step {np.mean(c['step_norm']):.3g}  drift {c['drift'][-1]:.3g}", flush=True)
            out_path.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
