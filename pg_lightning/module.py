"""``PolicyGradientModule``: the policy, its on-policy rollouts and the pseudo-loss, as a LightningModule.

One Lightning epoch is one policy-gradient iteration (lecture §2, the REINFORCE loop):

1. ``train_dataloader`` yields one batch collected with the *current* policy (``rollout.py``);
2. ``training_step`` hands it to ``update.update_policy``: the estimator's weights Ψ_t and one step on the
   pseudo-loss -(1/N) Σ_i Σ_t log π_θ(a_it|s_it) Ψ_it (§7.2); with ``off_policy`` reuse (lecture §6) also the
   last ``reuse_batches`` batches, ``updates_per_batch`` passes of minibatch steps on the importance-weighted
   loss. Every step goes through ``update.GuardedStep``;
3. with a learned value baseline, ``value.fit_value`` then fits V_φ to the batch's targets with its own
   optimizer (after Ψ was computed with the old V_φ, so the baseline does not depend on the batch);
4. the observation and reward statistics take the batch in (``normalization.py``), the metrics are logged,
   and the module stops the trainer when ``total_env_steps`` is spent.

This module holds only what a LightningModule must: its hooks, the loaders, logging and checkpoint state.
Optimization is manual (two optimizers, and a step is skipped when no step of the batch has a weight), so
Lightning's ``gradient_clip_val`` does not apply: ``max_grad_norm`` clips in the update's own step.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial

import gymnasium as gym
import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader

from pg_lightning.batch import RolloutBatch
from pg_lightning.diagnostics import gradient_statistics, sub_batch_gradients
from pg_lightning.encoders import is_image_space
from pg_lightning.envs import UnsupportedSpace, VectorEnvFactory, check_action_space
from pg_lightning.distributed import LOCAL, reduction_for
from pg_lightning.estimators import Estimator, EstimatorOutput
from pg_lightning.evaluation import evaluate_policy
from pg_lightning.natural_gradient import NaturalGradient
from pg_lightning.normalization import NormalizedObservations, RewardScaler, inputs_normalized
from pg_lightning.off_policy import OffPolicy
from pg_lightning.policies import check_policy, is_recurrent, mlp_policy
from pg_lightning.recurrent import value_inputs
from pg_lightning.rollout import RolloutCollector, RolloutDataset
from pg_lightning.threads import DEFAULT_TORCH_THREADS, check_torch_threads, set_torch_threads
from pg_lightning.validation import boolean, non_negative, positive_int, positive_number, require
from pg_lightning.update import (GuardedStep, Precondition, SkipCounter, check_gradient_clipping,
                                 update_policy)
from pg_lightning.value import ValueFunction, explained_variance, fit_value, value_loss, value_optimizer

PolicyFactory = Callable[[gym.Space, gym.Space], nn.Module]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class PolicyGradientModule(LightningModule):
    """Policy-gradient training of ``policy`` on ``env`` with ``estimator``'s weights.

    Args:
        env: a ``VectorEnvFactory`` or a registered gymnasium id.
        policy: an ``nn.Module`` whose ``forward(obs)`` returns a ``torch.distributions.Distribution``,
            or a factory ``(observation_space, action_space) -> nn.Module``; default ``mlp_policy``.
        estimator: the gradient estimator; default ``Estimator()`` (reward-to-go minus the average).
        optimizer: a factory ``params -> torch.optim.Optimizer``; default Adam with lr 0.01.
        steps_per_env: T, time steps per env in each batch (batch = T x ``env.num_envs`` steps).
        total_env_steps: the training budget in env steps, over all ranks; ``None`` for no budget.
        seed: env seeds are ``seed + rank * num_envs + i``; action sampling is seeded per rank.
        grad_variance_groups: if set, log each iteration the estimator's gradient variance
            ``diag/grad_var`` and signal-to-noise ratio ``diag/grad_snr``, measured from this many
            sub-batches of envs (costs one extra backward pass per sub-batch).
        max_skipped_updates: an update whose loss or gradient is not finite is skipped (and counted
            in ``diag/skipped_updates``); this many in a row stop training with ``NonFiniteUpdatesError``.
        off_policy: importance-sampled reuse of past batches (``OffPolicy``); default on-policy.
        max_iterations: stop after this many iterations (batches) as well, e.g. "100 iterations of batch 1000".
        whole_episodes: the batch rule (``RolloutCollector``). True: each env collects whole episodes until
            it has ``steps_per_env`` steps of them (an unbiased gradient with any estimator; needs a time
            limit). False: exactly ``steps_per_env`` steps of each env, episodes cut by the batch end and
            bootstrapped with V_φ (value presets only). ``None``: True for estimators without a value
            function, False for those with one.
        torch_threads: torch's intra-op CPU threads in each training process, set when the trainer sets the
            module up (``threads.py``: one per process keeps runs that share a machine at full speed);
            ``None`` leaves the process's setting alone.
        normalize_observations: wrap the policy and V_φ in ``NormalizedObservations``: running mean and
            variance of the observations, as buffers inside them, updated after each iteration's update
            (``normalization.py``).
        scale_rewards: divide the rewards the estimator sees by the running standard deviation of the
            discounted return (``normalization.RewardScaler``); the logged returns stay raw.
        normalizer_updates: when the observation and reward statistics change: ``"batch"``, after each
            iteration's update; ``"step"``, at every env step, as SB3 and CleanRL (``normalization.py``).
        max_grad_norm: if set, every optimizer step (policy and V_φ) first rescales its model's gradient to
            at most this global L2 norm (``update.GuardedStep``); not with the natural gradient.
        entropy_coef: c ≥ 0 of the entropy bonus -c · H̄ in the policy's loss (``update.with_entropy_bonus``).
        anneal_lr: multiply every optimizer's learning rate by 1 - env_steps / total_env_steps before each
            iteration's update (linear decay to 0 over the budget); needs ``total_env_steps``.
        eval_episodes: deterministic episodes of ``trainer.validate`` (the validation loop), one per eval env,
            reset with seed ``eval_seed`` (``seed + 10_000``), as the ``Evaluation`` callback's during training.
    """

    def __init__(
        self,
        env: VectorEnvFactory | str,
        policy: nn.Module | PolicyFactory | None = None,
        estimator: Estimator | None = None,
        optimizer: OptimizerFactory | None = None,
        steps_per_env: int = 256,
        total_env_steps: int | None = None,
        seed: int = 0,
        grad_variance_groups: int | None = None,
        max_skipped_updates: int = 10,
        off_policy: OffPolicy | None = None,
        max_iterations: int | None = None,
        whole_episodes: bool | None = None,
        torch_threads: int | None = DEFAULT_TORCH_THREADS,
        eval_episodes: int = 20,
        normalize_observations: bool = False,
        scale_rewards: bool = False,
        max_grad_norm: float | None = None,
        entropy_coef: float = 0.0,
        anneal_lr: bool = False,
        normalizer_updates: str = "batch",
    ):
        super().__init__()
        check_torch_threads(torch_threads)
        self.torch_threads = torch_threads
        require("steps_per_env", steps_per_env, positive_int, "a positive integer")
        if total_env_steps is not None:
            require("total_env_steps", total_env_steps, positive_int, "a positive integer")
        if max_iterations is not None:
            require("max_iterations", max_iterations, positive_int, "a positive integer or null")
        require("eval.num_episodes", eval_episodes, positive_int, "a positive integer")
        if grad_variance_groups is not None:
            require("diagnostics.groups", grad_variance_groups, lambda v: positive_int(v) and v >= 2,
                    "an integer of at least 2")
        require("max_skipped_updates", max_skipped_updates, positive_int, "a positive integer")
        if max_grad_norm is not None:
            require("max_grad_norm", max_grad_norm, positive_number, "a positive number or null")
        require("entropy_coef", entropy_coef, non_negative, "a non-negative number")
        for key, flag in (("anneal_lr", anneal_lr), ("scale_rewards", scale_rewards),
                          ("normalize_observations", normalize_observations)):
            require(key, flag, boolean, "true or false")
        require("whole_episodes", whole_episodes, lambda v: v is None or boolean(v), "true, false or null")
        require("normalizer_updates", normalizer_updates, lambda v: v in ("batch", "step"), "batch or step")
        if normalizer_updates == "step":
            _check_per_step_statistics(normalize_observations, scale_rewards, off_policy)
        if anneal_lr and total_env_steps is None:
            raise ValueError("anneal_lr=true decays the learning rate over total_env_steps, which is null: set a budget")
        if isinstance(optimizer, NaturalGradient):
            _check_natural_gradient_settings(max_grad_norm, anneal_lr, off_policy, estimator)
        self.max_grad_norm = max_grad_norm
        self.entropy_coef = entropy_coef
        self.anneal_lr = anneal_lr
        self.normalizer_updates = normalizer_updates
        self.max_iterations = max_iterations
        # Every argument above is checked before the env is made (spaces() makes one).
        self.env = env if isinstance(env, VectorEnvFactory) else VectorEnvFactory(id=env)
        observation_space, action_space = self.env.spaces()
        check_action_space(action_space, self.env.id)
        if not isinstance(policy, nn.Module):
            try:
                policy = (policy or mlp_policy)(observation_space, action_space)
            except UnsupportedSpace as error:  # the policy cannot read this env's spaces: say which env
                raise UnsupportedSpace(f"env.id={self.env.id!r}: {error}") from None
        check_policy(policy, observation_space, action_space)  # a broken contract fails here, not deep in a rollout
        self.estimator = estimator or Estimator()
        self.whole_episodes = self._batch_rule(whole_episodes)
        value_fn = (
            ValueFunction.for_policy(policy, observation_space, self.estimator.value)
            if self.estimator.value is not None else None
        )
        if normalize_observations:
            if is_image_space(observation_space):
                raise ValueError(
                    f"normalize_observations=true with the image observations of env.id={self.env.id!r}: the CNN "
                    "scales pixels by 1/255 itself; set normalize_observations=false"
                )
            policy = NormalizedObservations(policy, observation_space.shape)
            if value_fn is not None and not is_recurrent(policy):  # a recurrent policy's V_φ reads its features
                value_fn = NormalizedObservations(value_fn, observation_space.shape)
        self.reward_scaler = RewardScaler(self.env.num_envs, self.estimator.gamma) if scale_rewards else None
        self.policy = policy
        self.value_fn = value_fn
        self.automatic_optimization = False
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-2, foreach=True)
        self.off_policy = off_policy or OffPolicy()
        self.steps_per_env = steps_per_env
        self._check_off_policy()
        self._check_recurrent()
        # The current batch and the `reuse_batches` before it, each with its behaviour log-probs.
        self.replay: deque[RolloutBatch] = deque(maxlen=self.off_policy.reuse_batches + 1)
        self.total_env_steps = total_env_steps
        self.seed = seed
        self.eval_episodes = eval_episodes
        self.grad_variance_groups = grad_variance_groups
        self.skips = SkipCounter(max_skipped_updates, where=self._position)
        self._limit_val_batches: int | float | None = None  # the trainer's, while fit turns validation off
        self.collector: RolloutCollector | None = None
        self.reduction = LOCAL  # all-reduces of batch statistics once a multi-process run is set up
        # Run counters over all ranks (the budget and summary.json use these).
        self.env_steps = 0
        self.iterations = 0
        self.train_return_mean = math.nan
        self._last_step_time: float | None = None

    @property
    def eval_seed(self) -> int:
        """The seed of the evaluation envs' first reset: apart from the training envs' ``seed + i``."""
        return self.seed + 10_000

    @classmethod
    def from_run(cls, path: str | os.PathLike) -> PolicyGradientModule:
        """The module a ``train.py`` run trained, rebuilt from its run dir (or a checkpoint in it), in eval mode.

        The env, policy and estimator come from the run's saved config, the weights from its checkpoint
        (loaded weights-only): ``pg_lightning.evaluate.load_module``.
        """
        from pg_lightning.evaluate import load_module

        return load_module(path)

    def _batch_rule(self, whole_episodes: bool | None) -> bool:
        """Resolve ``whole_episodes`` for this estimator and env; refuse combinations that cannot be unbiased or end."""
        estimator = self.estimator
        if whole_episodes is None:
            whole_episodes = not estimator.needs_value
        if not whole_episodes and not estimator.needs_value:
            raise ValueError(
                f"whole_episodes=false needs a value function to bootstrap the episodes a batch cuts, and estimator "
                f"{estimator.name!r} has none (its gradient would be biased): leave whole_episodes unset"
            )
        if whole_episodes and self.env.time_limit is None:
            raise ValueError(
                f"env.max_episode_steps=null: {self.env.id} has no time limit, and a whole-episode batch ends only "
                "when its episodes do; set env.max_episode_steps to a positive integer"
            )
        if estimator.needs_other_envs and not estimator.needs_value and self.env.num_envs < 2:
            reason = f"baseline={estimator.baseline}" if estimator.baseline != "none" else "normalize=true"
            raise ValueError(
                f"env.num_envs=1: estimator {estimator.name!r} ({reason}) takes its statistics for each env from the "
                "other envs, so that they do not depend on its actions; set env.num_envs to 2 or more"
            )
        return whole_episodes

    def _check_recurrent(self) -> None:
        """Refuse, in one line, what a policy with memory cannot do here."""
        if not is_recurrent(self.policy):
            return
        if self.off_policy.reuses_data and self.off_policy.minibatch_unit == "steps":
            raise ValueError(
                "off_policy.minibatch_unit=steps cannot be combined with a recurrent policy: a minibatch of single "
                "steps has no sequence to replay the policy's state over; use off_policy.minibatch_unit=envs"
            )
        if self.estimator.baseline == "optimal":
            raise ValueError(
                "estimator.baseline=optimal cannot be combined with a recurrent policy: its per-parameter baseline "
                "takes each step's score on its own (torch.func per step), and a recurrent step's score depends on "
                "the steps before it; use baseline=average or value"
            )

    def _check_off_policy(self) -> None:
        kind = self.off_policy.kind
        if not self.off_policy.reuses_data:
            return
        if self.estimator.baseline == "optimal":
            raise ValueError(
                f"off_policy.kind={kind} cannot be combined with estimator.baseline=optimal "
                "(the per-parameter baseline has no importance-weighted form here); use baseline=average or value"
            )
        if self.off_policy.minibatch_unit == "envs" and self.off_policy.minibatches > self.env.num_envs:
            raise ValueError(
                f"off_policy.minibatches={self.off_policy.minibatches} is more than env.num_envs={self.env.num_envs} "
                "(a minibatch is a group of envs, so that trajectories stay whole); for the per-step kinds "
                "off_policy.minibatch_unit=steps draws minibatches of steps instead"
            )
        if self.off_policy.minibatch_unit == "steps" and self.off_policy.minibatches > self.env.num_envs * self.steps_per_env:
            raise ValueError(
                f"off_policy.minibatches={self.off_policy.minibatches} is more than the batch's "
                f"env.num_envs x steps_per_env = {self.env.num_envs * self.steps_per_env} steps"
            )

    def setup(self, stage: str) -> None:
        if self._trainer is not None:
            check_gradient_clipping(self.trainer.gradient_clip_val, isinstance(self.optimizer_factory, NaturalGradient))
        if stage == "fit" and self._trainer is not None and self.trainer.limit_val_batches != 0:
            # During training the Evaluation callback evaluates, on its own schedule (iterations, not
            # Lightning epochs); the validation loop is for trainer.validate. teardown() gives it back.
            self._limit_val_batches = self.trainer.limit_val_batches
            self.trainer.limit_val_batches = 0
        if stage == "validate":
            set_torch_threads(self.torch_threads)
            return
        # Envs are created here, not in __init__, so the module stays picklable (ddp_spawn) and the
        # rank is known (docs/architecture.md, traps 2 and 5).
        if self.collector is None:
            rank = self.global_rank
            trainer = self._trainer  # None when setup() is called by hand, outside a Trainer
            self.reduction = reduction_for(trainer.world_size if trainer is not None else 1)
            set_torch_threads(self.torch_threads)
            self.collector = RolloutCollector(
                self.env.make(),
                self.steps_per_env,
                gamma=self.estimator.gamma,
                seed=self.seed + rank * self.env.num_envs,
                name=self.env.id,
                whole_episodes=self.whole_episodes,
            )
            # seed_everything gives every rank the same torch stream: give each rank its own.
            torch.manual_seed(self.seed + 1_000_003 * rank)

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self._limit_val_batches is not None:
            self.trainer.limit_val_batches, self._limit_val_batches = self._limit_val_batches, None
        if self.collector is not None:
            self.collector.close()
            self.collector = None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RolloutDataset(self.collect_batch), batch_size=None, num_workers=0)

    def collect_batch(self) -> RolloutBatch:
        """One on-policy batch from this rank's envs, with the current weights."""
        assert self.collector is not None, "setup() creates the collector"
        observing = self.normalizer_updates == "step" and isinstance(self.policy, NormalizedObservations)
        return self.collector.collect(self.policy, observe=self.policy.observe if observing else None)

    def val_dataloader(self) -> DataLoader:
        """One item, the eval envs' seed: ``trainer.validate`` runs one deterministic evaluation."""
        return DataLoader([self.eval_seed], batch_size=None)

    def validation_step(self, seed: int, batch_idx: int) -> None:
        """Returns of ``eval_episodes`` deterministic episodes (the mode of π), logged as ``eval/return_mean``
        and ``eval/return_std``: ``trainer.validate(module, ckpt_path=...)`` scores a checkpoint."""
        envs = self.env.make(num_envs=self.eval_episodes)
        try:
            returns = evaluate_policy(self.policy, envs, seed=int(seed))
        finally:
            envs.close()
        self.log_dict({"eval/return_mean": float(returns.mean()), "eval/return_std": float(returns.std())},
                      batch_size=len(returns))

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """The policy's optimizer and V_φ's; when V_φ shares the policy's steps, one optimizer over both (as
        CleanRL's PPO: the policy optimizer's settings, V_φ's parameters as a second group with its own lr)."""
        if self._value_shares_steps:
            assert self.value_fn is not None and self.estimator.value is not None
            groups = [{"params": list(self.policy.parameters())},
                      {"params": list(self.value_fn.parameters()), "lr": self.estimator.value.lr}]
            return [self.optimizer_factory(groups)]
        optimizers = [self.optimizer_factory(self.policy.parameters())]
        if self.value_fn is not None:
            assert self.estimator.value is not None
            optimizers.append(value_optimizer(self.value_fn, self.estimator.value))
        return optimizers

    @property
    def _value_shares_steps(self) -> bool:
        """V_φ's loss joins each policy step (``estimator.value.shared_step_coef``) instead of a fit of its own."""
        return self.value_fn is not None and self.estimator.value is not None and bool(self.estimator.value.shared_step_coef)

    def training_step(self, batch: RolloutBatch, batch_idx: int) -> None:
        """One iteration after collecting ``batch``: the policy update, then V_φ's fit, then the statistics of the
        observations and rewards take the batch in, then the metrics. With ``normalizer_updates=step`` the
        statistics took it in at every step: training reads the inputs and rewards as they were then."""
        if self.normalizer_updates == "batch":
            self._train(batch)
            self._update_normalizers(batch)
            if self.reward_scaler is not None:
                self.reward_scaler.update(batch.rew, batch.valid, batch.done, self.reduction)
        else:
            with inputs_normalized(self.policy, self.value_fn):
                self._train(self._as_acted(batch))

    def _as_acted(self, batch: RolloutBatch) -> RolloutBatch:
        """``normalizer_updates=step``: the batch with the observations as the policy's normaliser gave them at
        each step, the rewards scaled per step, and the statistics merged over ranks (``normalization.py``)."""
        changes = {}
        if isinstance(self.policy, NormalizedObservations):
            self.policy.rewind()  # this rank's per-step statistics give way to the whole batch's, over every rank
            self._update_normalizers(batch)  # V_φ's too: unused while it passes its inputs through, but kept equal
            changes["obs"] = self.policy.acted_inputs(batch.obs)
        if self.reward_scaler is not None:
            changes["return_before"] = self.reward_scaler.scale(batch.return_before)
            changes["rew"] = self.reward_scaler.scale_per_step(batch.rew, batch.valid, batch.done, self.reduction)
        return dataclasses.replace(batch, **changes)

    def _train(self, batch: RolloutBatch) -> None:
        """The policy update, then V_φ's fit, then the metrics."""
        policy_step, value_step = self._guarded_steps()
        if self.anneal_lr:
            self._anneal_learning_rates()
        values = self._values(batch)  # [T + 1, B], V_φ before this batch's fit
        metrics = self._gradient_variance(batch)
        shared_coef = self.estimator.value.shared_step_coef if self.estimator.value is not None else None
        result = update_policy(self.policy, self._kept_batches(batch, values), self.estimator, self.off_policy,
                               policy_step, self.reduction, self._precondition(), self.entropy_coef,
                               value_loss=self._minibatch_value_loss if shared_coef is not None else None,
                               value_coef=shared_coef or 0.0)
        metrics.update(result.metrics)
        if self.value_fn is not None:
            assert self.estimator.value is not None and values is not None
            if value_step is None:  # V_φ shared the policy's steps
                metrics["diag/explained_variance"] = explained_variance(result.estimate.value_targets, values[:-1],
                                                                        batch.valid)
            else:
                inputs = value_inputs(self.policy, batch)[:-1]  # with memory: h_t of the policy just updated
                metrics.update(fit_value(self.value_fn, inputs, result.estimate.value_targets, batch.valid,
                                         values[:-1], self.estimator.value.steps, value_step,
                                         self.estimator.value.minibatch_size))
        self._log_iteration(batch, result.estimate.mask, result.loss, result.entropy, metrics)

    def _update_normalizers(self, batch: RolloutBatch) -> None:
        """The batch's observations join the running statistics of the networks that normalise theirs (none
        without ``normalize_observations``), after the update that used the old ones."""
        obs = batch.obs[:-1][batch.valid]
        for model in (self.policy, self.value_fn):
            if isinstance(model, NormalizedObservations):
                model.update_normalizer(obs, self.reduction)

    def _guarded_steps(self) -> tuple[GuardedStep, GuardedStep | None]:
        """The policy's optimizer step (its loss scaled by the world size, see ``GuardedStep``) and V_φ's; or,
        when V_φ shares the policy's steps, one step of both (V_φ's own: None)."""
        optimizers = self._optimizer_list()
        if self._value_shares_steps:
            both = nn.ModuleList([self.policy, self.value_fn])  # a view for the gradient checks and the clipping
            return GuardedStep(optimizers[0], both, self.manual_backward, self.reduction, self.skips,
                               loss_scale=self.reduction.world_size, ends_streak=True,
                               max_grad_norm=self.max_grad_norm), None
        policy_step = GuardedStep(optimizers[0], self.policy, self.manual_backward, self.reduction, self.skips,
                                  loss_scale=self.reduction.world_size, ends_streak=True,
                                  max_grad_norm=self.max_grad_norm)
        if self.value_fn is None:
            return policy_step, None
        return policy_step, GuardedStep(optimizers[1], self.value_fn, self.manual_backward, self.reduction, self.skips,
                                        max_grad_norm=self.max_grad_norm)

    def _optimizer_list(self) -> list:
        """Lightning's optimizers of this module as a list (``optimizers()`` returns one bare when there is one)."""
        optimizers = self.optimizers()
        return optimizers if isinstance(optimizers, list) else [optimizers]

    def _minibatch_value_loss(self, data: RolloutBatch, part: EstimatorOutput) -> torch.Tensor:
        """L_V on a minibatch's steps, for the step V_φ shares with the policy (λ-return or Q̂ targets)."""
        assert self.value_fn is not None and part.value_targets is not None
        return value_loss(self.value_fn, value_inputs(self.policy, data)[:-1], part.value_targets, part.mask)

    def _anneal_learning_rates(self) -> None:
        """lr = lr₀ · (1 - env_steps / total_env_steps) for every optimizer, from the env steps so far (so a
        resumed run continues the same schedule); lr₀ is kept in each param group as ``initial_lr``."""
        assert self.total_env_steps is not None
        fraction = max(1.0 - self.env_steps / self.total_env_steps, 0.0)
        for optimizer in self._optimizer_list():
            for group in optimizer.optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
                group["lr"] = group["initial_lr"] * fraction

    def _kept_batches(self, batch: RolloutBatch, values: torch.Tensor | None) -> list:
        """``(batch, V_φ(obs))`` of every batch this iteration learns from, oldest first: on-policy only ``batch``;
        with importance-sampled reuse also the ``reuse_batches`` before it."""
        if not self.off_policy.reuses_data:
            return [(self._scaled(batch), values)]
        self.replay.append(batch)
        past = [(self._scaled(old), self._values(old)) for old in list(self.replay)[:-1]]
        return past + [(self._scaled(batch), values)]

    def _scaled(self, batch: RolloutBatch) -> RolloutBatch:
        """The batch with the rewards the estimator sees: divided by the reward scale, when it is on (per-step
        statistics scaled them already, in ``_as_acted``)."""
        if self.reward_scaler is None or self.normalizer_updates == "step":
            return batch
        return dataclasses.replace(batch, rew=self.reward_scaler.scale(batch.rew),
                                   return_before=self.reward_scaler.scale(batch.return_before))

    def _precondition(self) -> Precondition | None:
        """The natural gradient's rewrite of the policy's gradient, with this run's cross-process mean."""
        if not isinstance(self.optimizer_factory, NaturalGradient):
            return None
        natural_gradient = self.optimizer_factory
        reduce = partial(self.trainer.strategy.reduce, reduce_op="mean")
        return lambda batch, loss: natural_gradient.precondition(self.policy, batch, loss, reduce)

    def _gradient_variance(self, batch: RolloutBatch) -> dict:
        """``diag/grad_var`` and ``diag/grad_snr`` from sub-batches of envs, when ``grad_variance_groups`` is set."""
        if self.grad_variance_groups is None:
            return {}
        estimates = sub_batch_gradients(self.policy, batch, self.estimator, self.value_fn, self.grad_variance_groups)
        return {f"diag/{k}": v for k, v in gradient_statistics(estimates).items()}

    def _values(self, batch: RolloutBatch) -> torch.Tensor | None:
        if self.value_fn is None:
            return None
        with torch.no_grad():
            return self.value_fn(value_inputs(self.policy, batch))

    def _position(self) -> str:
        return f"iteration {self.iterations + 1}, env step {self.env_steps}"

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.total_env_steps is not None and self.env_steps >= self.total_env_steps:
            self.trainer.should_stop = True
        if self.max_iterations is not None and self.iterations >= self.max_iterations:
            self.trainer.should_stop = True

    def _log_iteration(
        self, batch: RolloutBatch, mask: torch.Tensor, loss: torch.Tensor, entropy: torch.Tensor, extra: dict
    ) -> None:
        """Log this iteration's metrics; episode statistics are reduced over ranks as (sum, count)."""
        assert self.collector is not None
        returns, lengths = self.collector.episodes.pop()
        local = torch.tensor(
            [batch.env_steps, sum(returns), len(returns), sum(lengths), int(mask.sum())],  # taken, used or not
            dtype=torch.float64,
            device=self.device,
        )
        env_steps, return_sum, episodes, length_sum, used = self.trainer.strategy.reduce(local, reduce_op="sum").tolist()
        self.env_steps += int(env_steps)
        self.iterations += 1
        if episodes > 0:
            self.train_return_mean = return_sum / episodes
        now = time.perf_counter()
        steps_per_s = env_steps / (now - self._last_step_time) if self._last_step_time is not None else math.nan
        self._last_step_time = now
        metrics = {
            "rollout/episodes": episodes,
            "rollout/episode_length": length_sum / episodes if episodes else math.nan,
            "rollout/used_fraction": used / max(env_steps, 1.0),
            "loss/policy": loss.detach(),
            "diag/entropy": entropy.detach(),
            "perf/steps_per_s": steps_per_s,
            "diag/skipped_updates": float(self.skips.total),
            **extra,
        }
        metrics["rollout/return_mean"] = self.train_return_mean
        metrics["rollout/env_steps"] = float(self.env_steps)
        self._log_to_loggers(metrics)

    def _log_to_loggers(self, metrics: dict[str, float | torch.Tensor]) -> None:
        """Hand this iteration's (already reduced) metrics to the trainer's loggers, from rank 0.

        Not through ``self.log``: its per-call bookkeeping is costly next to a small batch (trap 13; measured in
        ``benchmarks/README.md``). The metrics are reduced over ranks already and need none of its epoch
        aggregation. The step is Lightning's
        ``global_step``, as for the evaluation's metrics (docs/architecture.md, trap 13).
        """
        if self._trainer is None or not self.trainer.is_global_zero or not self.trainer.loggers:
            return
        values = {key: float(value) for key, value in metrics.items()}
        for logger in self.trainer.loggers:
            logger.log_metrics(values, step=self.trainer.global_step)
            logger.save()  # as Lightning does after each logged step: metrics.csv is current after every iteration

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.normalizer_updates == "step" and isinstance(self.policy, NormalizedObservations):
            # Mid-batch (an env error): the statistics of the batches trained on, not this rank's collected steps.
            for name, value in zip(("mean", "var", "count"), self.policy.settled_statistics()):
                checkpoint["state_dict"][f"policy.normalizer.{name}"] = value
        checkpoint["pg_lightning"] = {
            "env_steps": self.env_steps,
            "iterations": self.iterations,
            "skipped_updates": self.skips.total,
            "train_return_mean": self.train_return_mean,
            "replay": [vars(batch) for batch in self.replay],
            "collector": self.collector.state_dict() if self.collector is not None else None,
            "torch_rng": torch.get_rng_state(),  # action sampling and minibatch order continue the same stream
            "reward_returns": self.reward_scaler.returns if self.reward_scaler is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        counters = checkpoint.get("pg_lightning", {})
        self.env_steps = counters.get("env_steps", 0)
        self.iterations = counters.get("iterations", 0)
        self.skips.total = counters.get("skipped_updates", 0)
        self.train_return_mean = counters.get("train_return_mean", math.nan)
        self.replay.clear()
        self.replay.extend(RolloutBatch(**fields) for fields in counters.get("replay", []))
        # Called after setup(): the fresh collector and the seeded stream are replaced by the saved ones. Rank 0
        # saves the checkpoint, so with several processes the other ranks' envs and streams are not in it:
        # then every rank keeps fresh envs and its own seed.
        single_process = self._trainer is None or self._trainer.world_size == 1
        if single_process and self.collector is not None and counters.get("collector") is not None:
            self.collector.load_state_dict(counters["collector"])
        if single_process and counters.get("torch_rng") is not None:
            torch.set_rng_state(counters["torch_rng"])
        if single_process and self.reward_scaler is not None and counters.get("reward_returns") is not None:
            self.reward_scaler.returns = counters["reward_returns"]


def _check_per_step_statistics(normalize_observations: bool, scale_rewards: bool, off_policy: OffPolicy | None) -> None:
    """Refuse, in one line, ``normalizer_updates=step`` where it would do nothing or go wrong."""
    if not normalize_observations and not scale_rewards:
        raise ValueError("normalizer_updates=step with normalize_observations=false and scale_rewards=false: there "
                         "are no statistics to update; set one of them to true or leave normalizer_updates=batch")
    if off_policy is not None and off_policy.reuse_batches:
        raise ValueError(
            f"normalizer_updates=step cannot be combined with off_policy.reuse_batches={off_policy.reuse_batches}: "
            "a past batch's inputs were normalised with statistics that have moved on since; set "
            "off_policy.reuse_batches=0 or normalizer_updates=batch"
        )


def _check_natural_gradient_settings(
    max_grad_norm: float | None, anneal_lr: bool, off_policy: OffPolicy | None, estimator: Estimator | None
) -> None:
    """One line naming every setting that ``optimizer=natural_gradient`` cannot take, and the fix of each: its step
    is F⁻¹g of the on-policy batch sized to the KL radius (``optimizer.max_kl``), so nothing may rescale it, reuse
    old data through it, or add V_φ's loss to the gradient it preconditions."""
    conflicts = []  # (setting, fix)
    if max_grad_norm is not None:
        conflicts.append((f"max_grad_norm={max_grad_norm}", "max_grad_norm=null"))
    if anneal_lr:
        conflicts.append(("anneal_lr=true", "anneal_lr=false"))
    if off_policy is not None and off_policy.reuses_data:
        conflicts.append((f"off_policy.kind={off_policy.kind}", "off_policy=none"))
    if estimator is not None and estimator.value is not None and estimator.value.shared_step_coef:
        conflicts.append((f"estimator.value.shared_step_coef={estimator.value.shared_step_coef}",
                          "estimator.value.shared_step_coef=null (e.g. estimator=gae, not gae_shared_step)"))
    if conflicts:
        settings = [setting for setting, _ in conflicts]
        named = settings[0] if len(settings) == 1 else ", ".join(settings[:-1]) + " and " + settings[-1]
        raise ValueError(
            f"{named} cannot be combined with optimizer=natural_gradient: its step is the on-policy batch's "
            f"gradient preconditioned by F⁻¹ and sized to the KL radius (optimizer.max_kl), which rescaling, reused "
            f"data or V_φ's loss in the same step would undo; set {' '.join(fix for _, fix in conflicts)}"
        )
