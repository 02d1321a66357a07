"""MuJoCo at a fixed env-step budget: a pg_lightning preset and Stable-Baselines3 PPO, side by side.

    pip install -e ".[bench]"
    python benchmarks/mujoco.py --preset ppo_mujoco --envs hopper half_cheetah --seeds 0 1 2 --steps 1000000
    python benchmarks/mujoco.py ... --no-sb3               # our preset only (--no-ours: SB3 only)
    python benchmarks/mujoco.py --aggregate-only           # re-read the JSON files of earlier runs
    python benchmarks/mujoco.py ... --resume               # continue our runs that stopped early (last.ckpt)
    python benchmarks/mujoco.py ... --overrides anneal_lr=false  # a variant: records under ppo_mujoco+anneal_lr=false
    python benchmarks/mujoco.py --throughput --steps 30720 # env steps/s of both, timed alone, as a ratio

Each run is a separate process, one after another, and writes ``<out>/<method>/<env>/seed<k>.json`` (our run dirs,
with their checkpoints, go to ``outputs/mujoco/``): the final return as the **mean of the last 100 training
episodes** (CleanRL's metric for its published PPO numbers), the deterministic evaluation at the end (10
episodes; for SB3 with its VecNormalize statistics frozen), and env steps per second of training: from the
model's construction to the end of its last update, evaluations excluded, on both sides (process start-up,
imports and Hydra are not counted; ours evaluates during training, SB3 does not). Over seeds it prints, per env and method, the env-step budget and the interquartile
mean with a 95% stratified-bootstrap interval (``rliable``). Returns do not depend on speed, so runs of returns may
share the machine (start several invocations); their steps/s then say nothing.

``--throughput`` is the speed comparison: ours and SB3 alternately (``--repeats`` pairs, nothing else may run),
each for ``--steps`` env steps on the first env and seed, and prints the median steps/s of each and their
ratio, ours / SB3.

SB3's side: ``PPO("MlpPolicy")`` with its defaults (which are its MuJoCo settings: 2048 steps, minibatch 64, 10
epochs, lr 3e-4, GAE 0.95, clip 0.2) inside ``VecNormalize`` (observations and rewards), one env, torch with
one thread as ours.

This file's dir is taken off ``sys.path`` first: run as a script, a file named ``mujoco.py`` would otherwise be
what ``import mujoco`` (gymnasium's MuJoCo envs) finds.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _HERE]

import argparse  # noqa: E402 - after the sys.path fix above
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV_IDS = {"hopper": "Hopper-v5", "half_cheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5",
           "inverted_pendulum": "InvertedPendulum-v5"}
LAST_EPISODES = 100


def last_episodes_mean(metrics_csv: Path, count: int = LAST_EPISODES) -> float:
    """Mean return of the last ``count`` training episodes, from metrics.csv's per-iteration means and counts.

    Iterations are taken from the end until they hold ``count`` episodes; the earliest of them contributes only
    the episodes needed (its mean stands for each of its episodes).
    """
    import csv

    with metrics_csv.open() as f:
        rows = [(float(r["rollout/return_mean"]), float(r["rollout/episodes"]))
                for r in csv.DictReader(f) if r.get("rollout/episodes") and float(r["rollout/episodes"]) > 0]
    total, taken = 0.0, 0.0
    for mean, episodes in reversed(rows):
        use = min(episodes, count - taken)
        total += mean * use
        taken += use
        if taken >= count:
            break
    return total / taken if taken else float("nan")


def method_name(preset: str, overrides: list[str]) -> str:
    """The name a variant's records go under: ``ppo_mujoco``, or ``ppo_mujoco+anneal_lr=false`` with overrides."""
    return "+".join([preset, *overrides])


def run_ours(preset: str, env: str, seed: int, steps: int, run_dir: Path | None = None, resume: bool = False,
             overrides: list[str] = ()) -> dict:
    """One run of ``train.py +experiment=<preset> <overrides>`` in its own process: its JSON record. ``resume``:
    continue the run dir's ``last.ckpt`` if there is one (a run stopped before its budget; its metrics.csv goes on)."""
    method = method_name(preset, list(overrides))
    run_dir = run_dir or REPO / "outputs" / "mujoco" / method / env / f"seed{seed}"  # checkpoints stay out of git
    command = [sys.executable, str(REPO / "train.py"), f"+experiment={preset}", f"env={env}", f"seed={seed}",
               f"total_env_steps={steps}", "logger=csv", "stop_on_solve=false", f"hydra.run.dir='{run_dir}'",  # quoted: a variant's dir name holds '='
               *overrides]
    if resume and (run_dir / "last.ckpt").exists():
        command.append(f"ckpt_path={run_dir / 'last.ckpt'}")
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    training_s = summary["wall_s"] - summary["eval_s"]  # fit's wall time less its evaluations: SB3's train_wall
    return {"method": method, "env": env, "seed": seed, "env_steps": summary["env_steps"], "wall_s": wall,
            "env_steps_per_s": summary["env_steps"] / training_s,
            "final_return": last_episodes_mean(run_dir / "metrics.csv"),
            "eval_return": summary["eval_return_mean"], "eval_s": summary["eval_s"]}


def run_sb3(env: str, seed: int, steps: int) -> dict:
    """SB3 PPO with VecNormalize, in this process (``main`` starts one process per run)."""
    import gymnasium as gym
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    torch.set_num_threads(1)
    start = time.perf_counter()
    monitor = Monitor(gym.make(ENV_IDS[env]))
    venv = VecNormalize(DummyVecEnv([lambda: monitor]), gamma=0.99)
    model = PPO("MlpPolicy", venv, seed=seed, device="cpu", verbose=0)
    model.learn(total_timesteps=steps)
    train_wall = time.perf_counter() - start
    returns = monitor.get_episode_rewards()
    final = float(np.mean(returns[-LAST_EPISODES:])) if returns else float("nan")
    venv.training, venv.norm_reward = False, False  # evaluation: frozen statistics, raw rewards
    evaluations = []
    for episode in range(10):
        venv.seed(10_000 + episode)
        obs, done, total = venv.reset(), False, 0.0
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, dones, _ = venv.step(action)
            total += float(venv.get_original_reward()[0])
            done = bool(dones[0])
        evaluations.append(total)
    wall = time.perf_counter() - start
    return {"method": "sb3_ppo", "env": env, "seed": seed, "env_steps": int(model.num_timesteps), "wall_s": wall,
            "env_steps_per_s": model.num_timesteps / train_wall, "final_return": final,
            "eval_return": float(np.mean(evaluations)), "eval_s": wall - train_wall}


def bootstrap(scores: dict, statistic) -> tuple[dict, dict]:
    """rliable's point estimates and 95% stratified-bootstrap intervals, 2000 resamples, seeded so that the printed
    table is the same at every invocation. rliable's ``StratifiedBootstrap`` draws its resamples with
    ``np.random.choice`` (numpy's global stream), not from its ``random_state`` argument, so the global seed is what
    fixes them."""
    from rliable import library as rly

    np.random.seed(0)
    return rly.get_interval_estimates(scores, statistic, reps=2000)


def final_returns(runs: list[dict], env: str, method: str) -> np.ndarray:
    """The final returns of one env and method's runs, ``[seeds, 1 task]`` as rliable takes them."""
    return np.array([[r["final_return"]] for r in runs if r["env"] == env and r["method"] == method])


def aggregate(out: Path) -> list[str]:
    """Per env and method: IQM over seeds of the final return, its 95% stratified-bootstrap interval, steps/s."""
    from rliable import metrics

    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*/*/seed*.json"))]
    lines = ["| env | method | env steps | seeds | final return, IQM [95% CI] | eval return, mean | env steps/s, median |",
             "|---|---|---:|---:|---|---:|---:|"]
    for env in sorted({r["env"] for r in runs}):
        for method in sorted({r["method"] for r in runs if r["env"] == env}):
            chosen = [r for r in runs if r["env"] == env and r["method"] == method]
            scores = final_returns(chosen, env, method)
            point, interval = bootstrap({method: scores}, lambda x: np.array([metrics.aggregate_iqm(x)]))
            low, high = interval[method][:, 0]
            lines.append(f"| {ENV_IDS[env]} | {method} | {budget(chosen)} | {len(chosen)} | "
                         f"{point[method][0]:.0f} [{low:.0f}, {high:.0f}] | "
                         f"{np.mean([r['eval_return'] for r in chosen]):.0f} | "
                         f"{np.median([r['env_steps_per_s'] for r in chosen]):.0f} |")
    lines += improvement_over_sb3(runs)
    return lines


def budget(chosen: list[dict]) -> str:
    """The env-step budget of one row's runs, in millions to one decimal (``1.0M``); where its runs round to
    different figures it shows the range (``0.3M–1.0M``), so runs of different budgets cannot pass for one."""
    steps = [r["env_steps"] for r in chosen]
    low, high = f"{min(steps) / 1e6:.1f}M", f"{max(steps) / 1e6:.1f}M"
    return low if low == high else f"{low}–{high}"


def improvement_over_sb3(runs: list[dict]) -> list[str]:
    """Per env and PPO preset run beside SB3 PPO (``ppo_mujoco`` and its variants; the other algorithms' presets are
    not PPO, so the comparison would not be like with like): P(ours > SB3), the probability that a run of ours
    ends above a run of SB3's (the Mann-Whitney U statistic over all pairs of seeds, ties counting ½; rliable's
    ``probability_of_improvement``), with its 95% stratified-bootstrap interval. 0.5: neither is better."""
    from rliable import metrics

    lines = []
    for env in sorted({r["env"] for r in runs}):
        sb3 = final_returns(runs, env, "sb3_ppo")
        for method in sorted({r["method"] for r in runs if r["env"] == env and r["method"].startswith("ppo_")}):
            ours = final_returns(runs, env, method)
            if len(sb3) < 2 or len(ours) < 2:
                continue
            point, interval = bootstrap({method: (ours, sb3)},
                                        lambda x, y: np.array([metrics.probability_of_improvement(x, y)]))
            low, high = interval[method][:, 0]
            lines.append(f"{ENV_IDS[env]}: P({method} > sb3_ppo) = {point[method][0]:.2f} [{low:.2f}, {high:.2f}] "
                         f"over {len(ours)} × {len(sb3)} seeds (final return; 0.5: neither is better)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="ppo_mujoco", help="an experiment overlay of conf/experiment/")
    parser.add_argument("--envs", nargs="+", default=["hopper"], choices=sorted(ENV_IDS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1_000_000, help="env steps per run")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "mujoco")
    parser.add_argument("--no-sb3", action="store_true", help="run our preset only")
    parser.add_argument("--no-ours", action="store_true", help="run SB3 only")
    parser.add_argument("--aggregate-only", action="store_true", help="only print the table of the runs in --out")
    parser.add_argument("--throughput", action="store_true", help="time ours and SB3 alternately (alone!)")
    parser.add_argument("--repeats", type=int, default=3, help="--throughput: pairs of runs")
    parser.add_argument("--resume", action="store_true", help="continue our runs stopped before their budget")
    parser.add_argument("--overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="Hydra overrides on top of the preset (a variant; its records go under preset+overrides)")
    parser.add_argument("--sb3-run", nargs=3, metavar=("ENV", "SEED", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sb3_run:  # one SB3 run, in its own process
        env, seed, steps = args.sb3_run[0], int(args.sb3_run[1]), int(args.sb3_run[2])
        print(json.dumps(run_sb3(env, seed, steps)))
        return 0
    if args.throughput:
        print("\n".join(throughput(args.preset, args.envs[0], args.seeds[0], args.steps, args.repeats, args.out,
                                   args.overrides)))
        return 0
    if not args.aggregate_only:
        for env in args.envs:
            for seed in args.seeds:
                if not args.no_ours:
                    record = run_ours(args.preset, env, seed, args.steps, resume=args.resume, overrides=args.overrides)
                    write(args.out / record["method"] / env / f"seed{seed}.json", record)
                if not args.no_sb3:
                    write(args.out / "sb3_ppo" / env / f"seed{seed}.json", sb3_process(env, seed, args.steps))
    print("\n".join(aggregate(args.out)))
    return 0


def sb3_process(env: str, seed: int, steps: int) -> dict:
    """One SB3 run in a fresh process (as ours are): its JSON record."""
    result = subprocess.run([sys.executable, __file__, "--sb3-run", env, str(seed), str(steps)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def throughput(preset: str, env: str, seed: int, steps: int, repeats: int, out: Path,
               overrides: list[str] = ()) -> list[str]:
    """Env steps/s of our preset and of SB3 PPO, ``repeats`` alternating pairs of ``steps``-step runs.

    Each side's figure is env steps per second of training (collection and updates; start-up and evaluation
    excluded, as in the JSON records), the median over the repeats; the ratio is ours / SB3. Written to
    ``<out>/throughput_<preset>_<env>.json`` (a variant's: ``throughput_<preset>+<overrides>_<env>.json``).
    """
    method = method_name(preset, list(overrides))
    ours, sb3 = [], []
    for _ in range(repeats):
        ours.append(run_ours(preset, env, seed, steps, run_dir=REPO / "outputs" / "mujoco" / "throughput",
                             overrides=overrides)["env_steps_per_s"])
        sb3.append(sb3_process(env, seed, steps)["env_steps_per_s"])
    record = {"preset": method, "env": ENV_IDS[env], "steps": steps, "ours_steps_per_s": ours, "sb3_steps_per_s": sb3,
              "ratio_of_medians": statistics.median(ours) / statistics.median(sb3)}
    write(out / f"throughput_{method}_{env}.json", record)
    return [f"{ENV_IDS[env]}, {steps} env steps per run, {repeats} alternating pairs, alone:",
            f"  {method}: {statistics.median(ours):.0f} env steps/s (median of {', '.join(f'{x:.0f}' for x in ours)})",
            f"  SB3 PPO: {statistics.median(sb3):.0f} env steps/s (median of {', '.join(f'{x:.0f}' for x in sb3)})",
            f"  ratio ours / SB3: {record['ratio_of_medians']:.2f}"]


def write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    sys.exit(main())
