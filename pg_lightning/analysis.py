"""The analysis API: a batch and the gradient estimate it gives, outside any training run.

``collect`` and ``estimate_gradient`` take the same code paths as training (``RolloutCollector``;
``gradient.policy_loss`` or ``off_policy.importance_loss``) and need neither Lightning nor Hydra: they are
what the tests, the variance tool and a notebook use to look at an estimator.
"""

from __future__ import annotations

import math

import gymnasium as gym
import torch
from gymnasium.vector import VectorEnv
from torch import nn

from pg_lightning.batch import RolloutBatch
from pg_lightning.distributed import LOCAL, Reduction
from pg_lightning.envs import VectorEnvFactory
from pg_lightning.estimators import Estimator
from pg_lightning.gradient import policy_loss
from pg_lightning.off_policy import OffPolicy, importance_loss
from pg_lightning.recurrent import value_inputs
from pg_lightning.rollout import RolloutCollector
from pg_lightning.threads import DEFAULT_TORCH_THREADS, using_threads
from pg_lightning.validation import positive_int, require


def collect(
    policy: nn.Module,
    env: str | VectorEnvFactory | gym.Env | VectorEnv,
    *,
    num_steps: int | None = None,
    num_episodes: int | None = None,
    seed: int | None = None,
    gamma: float = 0.99,
    whole_episodes: bool = True,
    torch_threads: int | None = DEFAULT_TORCH_THREADS,
) -> RolloutBatch:
    """Collect a batch with ``policy``: the same code path as training (``RolloutCollector``).

    Args:
        policy: ``obs -> Distribution``.
        env: a registered gymnasium id, a ``VectorEnvFactory``, an env or a vector env (reset here).
        num_steps: collect at least this many steps: with ``whole_episodes`` (the default, what training
            uses without a value function) each env collects whole episodes until it has
            ``ceil(num_steps / num_envs)`` steps of them; otherwise exactly that many steps of each env, the
            last episodes cut by the batch end.
        num_episodes: collect exactly this many complete episodes, each from a reset. An id or factory
            is built with one env per episode. With a given vector env of B envs, env b contributes its
            first ``num_episodes // B`` (+1 for the first ``num_episodes % B`` envs) episodes: a choice
            fixed in advance, so that short episodes are not favoured. Every other step is marked invalid.
        seed: seed of the envs' reset.
        gamma: discount for ``RolloutBatch.return_before`` (0 with whole episodes: they all start in the batch).
        whole_episodes: the batch rule of ``num_steps`` (``RolloutCollector``).
        torch_threads: torch's CPU threads during the call (``threads.py``), restored after it; ``None``: as set.

    Exactly one of ``num_steps`` and ``num_episodes`` must be given.
    """
    if (num_steps is None) == (num_episodes is None):
        raise ValueError("collect: give exactly one of num_steps and num_episodes")
    with using_threads(torch_threads):
        return _collect(policy, env, num_steps, num_episodes, seed, gamma, whole_episodes)


def _collect(policy, env, num_steps, num_episodes, seed, gamma, whole_episodes) -> RolloutBatch:
    envs = _as_vector_env(env, num_envs=num_episodes)
    if num_steps is not None:
        require("num_steps", num_steps, positive_int, "a positive integer")
        collector = RolloutCollector(envs, steps_per_env=1, gamma=gamma, seed=seed, whole_episodes=whole_episodes)
        return collector.collect(policy, num_steps=math.ceil(num_steps / envs.num_envs))
    collector = RolloutCollector(envs, steps_per_env=1, gamma=gamma, seed=seed)
    assert num_episodes is not None
    require("num_episodes", num_episodes, positive_int, "a positive integer")
    quota = torch.full((envs.num_envs,), num_episodes // envs.num_envs)
    quota[: num_episodes % envs.num_envs] += 1
    chunks, ended = [], torch.zeros(envs.num_envs, dtype=torch.long)
    while (ended < quota).any():
        chunks.append(collector.collect(policy, num_steps=_EPISODE_CHUNK))
        ended += (chunks[-1].done & chunks[-1].valid).sum(0).cpu()
    return _first_episodes(_concat_in_time(chunks), quota)


# Steps per collect call while gathering whole episodes.
_EPISODE_CHUNK = 16


def _as_vector_env(env: str | VectorEnvFactory | gym.Env | VectorEnv, num_envs: int | None) -> VectorEnv:
    if isinstance(env, VectorEnv):
        return env
    if isinstance(env, gym.Env):
        return gym.vector.SyncVectorEnv([lambda: env])
    factory = env if isinstance(env, VectorEnvFactory) else VectorEnvFactory(id=env)
    return factory.make(num_envs=num_envs)


def _concat_in_time(batches: list[RolloutBatch]) -> RolloutBatch:
    """Consecutive batches of the same envs as one: ``obs`` overlap by one step at each seam."""
    first = batches[0]
    return RolloutBatch(
        obs=torch.cat([b.obs[:-1] for b in batches] + [batches[-1].obs[-1:]]),
        act=torch.cat([b.act for b in batches]),
        rew=torch.cat([b.rew for b in batches]),
        terminated=torch.cat([b.terminated for b in batches]),
        truncated=torch.cat([b.truncated for b in batches]),
        valid=torch.cat([b.valid for b in batches]),
        logp_behavior=torch.cat([b.logp_behavior for b in batches]),
        return_before=first.return_before,
        length_before=first.length_before,
        steps_taken=sum(b.valid.sum(0) if b.steps_taken is None else b.steps_taken for b in batches),
        first=(None if any(b.first is None for b in batches)
               else torch.cat([b.first[:-1] for b in batches] + [batches[-1].first[-1:]])),
        policy_state=first.policy_state,  # a recurrent policy's state before the first batch
        action_mask=None if first.action_mask is None else torch.cat([b.action_mask for b in batches]),
    )


def _first_episodes(batch: RolloutBatch, quota: torch.Tensor) -> RolloutBatch:
    """Keep the first ``quota[b]`` episodes of each env b (all complete); mark every other step invalid."""
    starts = torch.ones_like(batch.valid)
    starts[1:] = ~batch.valid[:-1] | batch.done[:-1]
    episode_index = torch.cumsum((starts & batch.valid).long(), 0) - 1  # [T, B]: k-th episode of env b
    keep = batch.valid & (episode_index < quota.to(episode_index.device))
    return RolloutBatch(
        obs=batch.obs,
        act=batch.act,
        rew=batch.rew * keep,
        terminated=batch.terminated & keep,
        truncated=batch.truncated & keep,
        valid=keep,
        logp_behavior=batch.logp_behavior,
        return_before=torch.zeros_like(batch.return_before),
        length_before=torch.zeros_like(batch.length_before),
        steps_taken=batch.steps_taken,
        first=batch.first,
        policy_state=batch.policy_state,
        action_mask=batch.action_mask,
    )


def estimate_gradient(
    policy: nn.Module,
    batch: RolloutBatch,
    estimator: Estimator,
    value_fn: nn.Module | None = None,
    off_policy: OffPolicy | None = None,
    reduction: Reduction = LOCAL,
    torch_threads: int | None = DEFAULT_TORCH_THREADS,
) -> list[torch.Tensor]:
    """The estimate of ∇_θ J (ascent direction) that ``estimator`` gives on ``batch``: one tensor per parameter.

    Same code path as training: ``policy_loss``, or with an importance-sampled ``off_policy`` kind
    ``off_policy.importance_loss`` on the whole batch (the batch may come from another policy: its
    ``logp_behavior``). ``value_fn`` is V_φ for value-baseline estimators. With several processes and a
    ``reduction``, each rank returns its share; their sum over ranks is the whole batch's estimate.
    ``torch_threads``: torch's CPU threads during the call (``threads.py``), restored after it.
    """
    with using_threads(torch_threads):
        return _estimate_gradient(policy, batch, estimator, value_fn, off_policy, reduction)


def _estimate_gradient(policy, batch, estimator, value_fn, off_policy, reduction) -> list[torch.Tensor]:
    values = None
    if estimator.needs_value:
        if value_fn is None:
            raise ValueError(f"estimator {estimator.name!r} needs a value function: pass value_fn")
        with torch.no_grad():
            values = value_fn(value_inputs(policy, batch))
    params = [p for p in policy.parameters() if p.requires_grad]
    if off_policy is not None and off_policy.reuses_data:
        loss = importance_loss(policy, batch, estimator(batch, values, reduction), off_policy, reduction).loss
    else:
        loss = policy_loss(policy, batch, estimator, values, reduction).loss
    grads = torch.autograd.grad(-loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
