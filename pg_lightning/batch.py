"""The one data structure every other module agrees on: a time-major rollout batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


# Fields of shape [B]; every other field is time-major, [T, B, ...].
PER_ENV_FIELDS = ("return_before", "length_before", "steps_taken", "policy_state")


@dataclass
class RolloutBatch:
    """Experience from ``T`` steps of ``B`` parallel environments, time-major.

    ==================  ===================  ===============================================================
    field               shape                meaning
    ==================  ===================  ===============================================================
    ``obs``             ``[T + 1, B, *o]``   ``obs[t]`` is the input of step ``t``; ``obs[T]`` is the
                                             observation after the last step (a bootstrap point)
    ``act``             ``[T, B, *a]``       the sampled action, *before* any clipping to the env's bounds
    ``rew``             ``[T, B]``           reward of step ``t`` (0 on reset steps)
    ``terminated``      ``[T, B]`` bool      the MDP ended at step ``t`` (value after it is 0)
    ``truncated``       ``[T, B]`` bool      a time limit cut the episode at step ``t`` (it could go on)
    ``valid``           ``[T, B]`` bool      False on gymnasium's NEXT_STEP reset steps: the env ignored the
                                             action, so the step is no transition and is masked everywhere
    ``logp_behavior``   ``[T, B]``           log π_behaviour(a_t|s_t) of the policy that collected the step
    ``return_before``   ``[B]``              Σ_k γ^k r_k of the episode running at step 0, over the steps it
                                             had before this batch (0 for an episode that starts here)
    ``length_before``   ``[B]`` int64        how many steps that episode had before this batch
    ``steps_taken``     ``[B]`` int64        env steps each env took for this batch: its ``valid`` steps and
                                             the steps of episodes the batch does not use (an env waiting
                                             for the others in a whole-episode batch); None: ``valid``'s
    ``first``           ``[T + 1, B]`` bool  ``obs[t]`` is an episode's first observation (a recurrent
                                             policy's state is reset before step ``t``; ``first[T]`` for
                                             the bootstrap point); None: not recorded
    ``policy_state``    ``[B, S]``           a recurrent policy's state before step 0 (None: memoryless)
    ``action_mask``     ``[T, B, n]`` bool   the actions the env allowed at step ``t`` (its ``action_mask``
                                             info; ``n`` = Σ nvec for MultiDiscrete); None: no masks
    ==================  ===================  ===============================================================

    ``return_before`` is discounted with the ``gamma`` the collector was given, so that REINFORCE can
    weight an episode that began in an earlier batch by its full return R(τ).
    """

    obs: torch.Tensor
    act: torch.Tensor
    rew: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    valid: torch.Tensor
    logp_behavior: torch.Tensor
    return_before: torch.Tensor
    length_before: torch.Tensor
    steps_taken: torch.Tensor | None = None
    first: torch.Tensor | None = None
    policy_state: torch.Tensor | None = None
    action_mask: torch.Tensor | None = None

    @property
    def done(self) -> torch.Tensor:
        """``[T, B]`` bool: the episode ended at step ``t``, by termination or truncation."""
        return self.terminated | self.truncated

    @property
    def num_steps(self) -> int:
        """``T``, the number of time steps (including masked reset steps)."""
        return self.rew.shape[0]

    @property
    def num_envs(self) -> int:
        """``B``, the number of parallel environments."""
        return self.rew.shape[1]

    @property
    def env_steps(self) -> int:
        """Env steps taken for this batch (what a budget counts): used or not, every step but the reset steps."""
        return int(self.valid.sum() if self.steps_taken is None else self.steps_taken.sum())

    @property
    def used_steps(self) -> int:
        """Steps of the batch's episodes (``valid``), the ones an estimator may use."""
        return int(self.valid.sum())

    def select_envs(self, index: torch.Tensor | slice) -> RolloutBatch:
        """The batch restricted to the envs (columns) ``index``."""
        return RolloutBatch(
            **{
                name: value if value is None else value[index] if name in PER_ENV_FIELDS else value[:, index]
                for name, value in vars(self).items()
            }
        )
