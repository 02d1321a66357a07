"""Compare the variance of every gradient estimator on the same trajectories.

    python -m pg_lightning.variance [env=cartpole] [variance.snapshots=[0,3,6]] [other Hydra overrides]

At a few snapshots of a policy trained with the configured estimator, it collects ``num_batches``
independent batches of ``episodes_per_batch`` whole episodes, and gives each estimator the same
batches. Per estimator and snapshot it reports the variance of one batch's estimate (trace of the
covariance), its signal-to-noise ratio, and its mean cosine similarity to a reference gradient from a
large independent batch (``reference_episodes`` episodes, one per env, other-envs baseline). Value baselines use
a V_φ fitted on the reference batch, so V is independent of the batches it is evaluated on.

Writes ``variance.csv``, ``variance.md`` and ``variance.png`` to the run dir (``hydra.run.dir``).
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch import Callback
from omegaconf import DictConfig, OmegaConf

from pg_lightning.batch import RolloutBatch
from pg_lightning.diagnostics import cosine_similarity, flat_gradient, gradient_statistics, sub_batch_gradients
from pg_lightning.estimators import Estimator, baseline
from pg_lightning.module import PolicyGradientModule
from pg_lightning.analysis import collect
from pg_lightning.run import make_module, optimizer_callbacks
from pg_lightning.threads import set_torch_threads
from pg_lightning.recurrent import value_inputs
from pg_lightning.value import ValueFunction, value_loss, value_optimizer

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
COLUMNS = ("snapshot", "env_steps", "estimator", "grad_var", "grad_snr", "cosine_to_reference")


class PolicySnapshots(Callback):
    """Keeps a copy of the policy's weights after the given iterations (0 = before training)."""

    def __init__(self, iterations: list[int]):
        self.iterations = sorted(iterations)
        self.states: dict[int, tuple[int, dict]] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        if 0 in self.iterations:
            self.states[0] = (0, copy.deepcopy(pl_module.policy.state_dict()))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if pl_module.iterations in self.iterations:
            self.states[pl_module.iterations] = (pl_module.env_steps, copy.deepcopy(pl_module.policy.state_dict()))


def load_estimator(name: str, gamma: float) -> Estimator:
    """The preset ``conf/estimator/<name>.yaml`` with the run's discount."""
    cfg = estimator_config(name)
    cfg.gamma = gamma
    return instantiate(cfg)


def estimator_config(name: str) -> DictConfig:
    """``conf/estimator/<name>.yaml`` merged over the files its defaults list extends, as Hydra composes it
    (the file's own keys last)."""
    cfg = OmegaConf.load(CONF_DIR / "estimator" / f"{name}.yaml")
    bases = [estimator_config(base) for base in cfg.pop("defaults", [])]
    return OmegaConf.merge(*bases, cfg) if bases else cfg


def fit_value_function(
    module: PolicyGradientModule, batch: RolloutBatch, estimator: Estimator, steps: int, minibatch: int = 4096
) -> ValueFunction:
    """V_φ regressed on the reference batch's reward-to-go (whole episodes: no bootstrap needed).

    ``steps`` Adam steps on random minibatches of the batch's valid steps.
    """
    assert estimator.value is not None
    value_fn = ValueFunction.for_policy(module.policy, module.env.spaces()[0], estimator.value)
    targets = estimator(batch, torch.zeros(batch.num_steps + 1, batch.num_envs)).value_targets
    inputs, targets = value_inputs(module.policy, batch)[:-1][batch.valid], targets[batch.valid]
    optimizer = value_optimizer(value_fn, estimator.value)
    ones = torch.ones_like(targets, dtype=torch.bool)
    for _ in range(steps):
        pick = torch.randint(len(targets), (min(minibatch, len(targets)),))
        optimizer.zero_grad()
        value_loss(value_fn, inputs[pick], targets[pick], ones[pick]).backward()
        optimizer.step()
    return value_fn


def compare(cfg: DictConfig, out_dir: Path) -> list[dict]:
    """Train, take snapshots, and measure every estimator at each; returns the table's rows."""
    settings = cfg.variance
    set_torch_threads(cfg.get("torch_threads"))  # the comparison's own gradients too, not only the training
    module = make_module(cfg)
    module.total_env_steps = None  # the snapshots decide how long it trains
    snapshots = PolicySnapshots(list(settings.snapshots))
    trainer = L.Trainer(
        max_epochs=max(snapshots.iterations), accelerator="cpu", logger=False,
        callbacks=[*optimizer_callbacks(module), snapshots],
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
    )
    if max(snapshots.iterations) > 0:
        trainer.fit(module)
    else:
        snapshots.states[0] = (0, copy.deepcopy(module.policy.state_dict()))
    gamma = module.estimator.gamma
    estimators = [load_estimator(name, gamma) for name in settings.estimators]
    num_episodes = settings.num_batches * settings.episodes_per_batch
    rows = []
    for iteration, (env_steps, state) in sorted(snapshots.states.items()):
        module.policy.load_state_dict(state)
        data = collect(module.policy, module.env, num_episodes=num_episodes, seed=cfg.seed + 1)
        reference_data = collect(module.policy, module.env, num_episodes=settings.reference_episodes, seed=cfg.seed + 2)
        reference = flat_gradient(module.policy, reference_data, baseline(gamma))
        for estimator in estimators:
            value_fn = None
            if estimator.needs_value:
                value_fn = fit_value_function(module, reference_data, estimator, settings.value_fit_steps)
            estimates = sub_batch_gradients(module.policy, data, estimator, value_fn, settings.num_batches)
            stats = gradient_statistics(estimates)
            rows.append(
                {
                    "snapshot": iteration,
                    "env_steps": env_steps,
                    "estimator": estimator.name,
                    # Variance of ONE batch's estimate: K times that of the mean of K.
                    "grad_var": stats["grad_var"] * estimates.shape[0],
                    "grad_snr": stats["grad_snr"] / estimates.shape[0],
                    "cosine_to_reference": float(cosine_similarity(estimates, reference).mean()),
                }
            )
            print(_format_row(rows[-1]), flush=True)
    write_outputs(rows, out_dir, settings.episodes_per_batch)
    return rows


def _format_row(row: dict) -> str:
    return (
        f"snapshot {row['snapshot']:>3} ({row['env_steps']:>7} steps)  {row['estimator']:<17} "
        f"var {row['grad_var']:10.4g}  snr {row['grad_snr']:8.3g}  cos {row['cosine_to_reference']:6.3f}"
    )


def write_outputs(rows: list[dict], out_dir: Path, episodes_per_batch: int) -> None:
    """``variance.csv``, ``variance.md`` (one table) and ``variance.png`` (variance per estimator and snapshot)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "variance.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"Gradient estimators on the same batches of {episodes_per_batch} episodes "
        "(variance = trace of the covariance of one batch's estimate):",
        "",
        "| snapshot (env steps) | estimator | variance | SNR | cosine to reference |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['snapshot']} ({row['env_steps']}) | {row['estimator']} | {row['grad_var']:.4g} | "
            f"{row['grad_snr']:.3g} | {row['cosine_to_reference']:.3f} |"
        )
    (out_dir / "variance.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out_dir / "variance.png")


def _plot(rows: list[dict], path: Path) -> None:
    from pg_lightning.plot import pyplot, save_figure


    snapshots = sorted({row["snapshot"] for row in rows})
    names = list(dict.fromkeys(row["estimator"] for row in rows))
    fig, (ax_var, ax_cos) = pyplot().subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(snapshots)
    for i, snapshot in enumerate(snapshots):
        by_name = {row["estimator"]: row for row in rows if row["snapshot"] == snapshot}
        x = [j + i * width for j in range(len(names))]
        label = f"iteration {snapshot} ({by_name[names[0]]['env_steps']} steps)"
        ax_var.bar(x, [by_name[n]["grad_var"] for n in names], width, label=label)
        ax_cos.bar(x, [by_name[n]["cosine_to_reference"] for n in names], width, label=label)
    for ax, title in ((ax_var, "gradient variance (log scale)"), (ax_cos, "cosine to a large-batch gradient")):
        ax.set_xticks([j + width * (len(snapshots) - 1) / 2 for j in range(len(names))], names, rotation=30, ha="right")
        ax.set_title(title)
    ax_var.set_yscale("log")
    ax_cos.set_ylim(min(0.0, min(r["cosine_to_reference"] for r in rows)), 1.0)
    ax_var.legend(fontsize=8, loc="upper right")
    save_figure(fig, Path(path), dpi=110)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="variance")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    rows = compare(cfg, out_dir)
    finite = [r for r in rows if math.isfinite(r["grad_var"])]
    print(f"wrote {out_dir / 'variance.md'}, variance.csv and variance.png ({len(finite)} rows)")


if __name__ == "__main__":
    main()
