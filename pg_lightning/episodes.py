"""Episode bookkeeping over batches ``[T, B]``: returns and lengths of the episodes that end, and the running
ones that continue into the next batch.

``EpisodeTracker`` does it once per batch with array operations (it runs on every batch of training);
``reference_episodes`` is the same bookkeeping written the obvious way, one step at a time, kept beside it so
that a test can hold the fast version to it (``tests/test_rollout.py``). Both assume gymnasium's NEXT_STEP
autoreset: the step after an episode's last step (``done``) is a reset step, ``valid`` False.
"""

from __future__ import annotations

import numpy as np
import torch

from pg_lightning.segments import segment_ids, segment_sum


class EpisodeTracker:
    """Episodes of ``num_envs`` envs across batches.

    Attributes:
        running_return: ``[B]`` undiscounted return so far of each env's running episode.
        discounted_return: ``[B]`` its discounted return so far Σ_k γ^k r_k (k from the episode's first step).
        length: ``[B]`` its steps so far.
        finished_returns, finished_lengths: the episodes that ended since the last ``pop``.
    """

    def __init__(self, num_envs: int, gamma: float):
        self.gamma = gamma
        self.running_return = np.zeros(num_envs)
        self.discounted_return = np.zeros(num_envs)
        self.length = np.zeros(num_envs, dtype=np.int64)
        self.finished_returns: list[float] = []
        self.finished_lengths: list[int] = []

    def pop(self) -> tuple[list[float], list[int]]:
        """Undiscounted returns and lengths of the episodes that ended since the last call."""
        returns, lengths = self.finished_returns, self.finished_lengths
        self.finished_returns, self.finished_lengths = [], []
        return returns, lengths

    def record_whole_episodes(self, rew: np.ndarray, valid: np.ndarray, done: np.ndarray) -> None:
        """Return and length of every episode of a whole-episode batch, env by env in time order.

        Each of the batch's segments is a whole episode (it starts and ends in the batch), so the episode
        statistics are segment sums.
        """
        ids = segment_ids(torch.from_numpy(valid), torch.from_numpy(done))
        num_episodes = int(ids.max()) + 1 if ids.numel() else 0
        returns = segment_sum(torch.from_numpy(rew).double(), ids, num_episodes)
        lengths = segment_sum(torch.ones(ids.shape, dtype=torch.long), ids, num_episodes)
        self.finished_returns.extend(returns.tolist())
        self.finished_lengths.extend(lengths.tolist())

    def track(self, rew: np.ndarray, valid: np.ndarray, done: np.ndarray) -> None:
        """Continue the running episodes through a batch ``[T, B]``; record those that ended in it.

        Once per batch, not per step, and without a pass over ``[T, B]`` for lengths: with NEXT_STEP autoreset
        the invalid steps are exactly the reset steps, the step after each ``done`` (step 0 when the previous
        batch ended with one). So an episode's length is the distance between its env's consecutive ends
        less that reset step, and its return a difference of running sums over time. Env b's first episode
        adds what it had before the batch (``running_return``, ``length``). The steps after env b's last end
        (its tail) run on into the next batch, which needs their discounted return-so-far Σ_k γ^k r_k, k
        counted from the episode's first step: the tail's own discounted sum, times γ^(steps before this
        batch) when the episode began earlier.
        """
        num_steps, num_envs = rew.shape
        envs = np.arange(num_envs)
        reset_at_0 = ~valid[0]
        # torch's cumsum over time is several times faster than numpy's on [T, B] (zero-copy views).
        cum_return = torch.from_numpy(rew).cumsum(0, dtype=torch.float64).numpy()  # [T, B]
        ended_env, ended_t = np.nonzero(done.T)  # env by env, in time order
        first = np.ones(len(ended_env), dtype=bool)
        first[1:] = ended_env[1:] != ended_env[:-1]
        previous = np.concatenate([[0], ended_t[:-1]])  # the env's previous end, where there is one
        returns = cum_return[ended_t, ended_env] - np.where(first, 0.0, cum_return[previous, ended_env])
        lengths = np.where(first, ended_t + 1 - reset_at_0[ended_env], ended_t - previous - 1)
        returns += np.where(first, self.running_return[ended_env], 0.0)
        lengths += np.where(first, self.length[ended_env], 0)
        self.finished_returns.extend(returns.tolist())
        self.finished_lengths.extend(lengths.tolist())
        # The tail: valid steps from tail_start (T or T + 1 when the last end is at T - 2 or T - 1: empty).
        last_done = np.full(num_envs, -1)
        last_done[ended_env] = ended_t  # ended_t increases within an env, so the last write is the last end
        any_done = last_done >= 0
        tail_start = np.where(any_done, last_done + 2, reset_at_0)
        tail_length = np.maximum(num_steps - tail_start, 0)
        tail_return = cum_return[-1] - np.where(any_done, cum_return[np.maximum(last_done, 0), envs], 0.0)
        # Σ_t γ^(t - tail_start) r_t in one gather: k = t - tail_start < 0 (before the tail) indexes the zeros
        # after γ^0 … γ^(T-1). A lookup, so no γ^-k overflow; int32 k halves the memory traffic. Rows before
        # the earliest tail start weigh nothing in any env and are skipped.
        powers = np.zeros(2 * num_steps + 2)
        powers[:num_steps] = self.gamma ** np.arange(num_steps, dtype=np.float64)
        from_row = min(int(tail_start.min()), num_steps)
        k = np.arange(from_row, num_steps, dtype=np.int32)[:, None] - tail_start.astype(np.int32)
        tail_discounted = np.einsum("tb,tb->b", powers[k], rew[from_row:])
        began_before = ~any_done
        self.discounted_return = np.where(
            began_before, self.discounted_return + self.gamma ** self.length * tail_discounted, tail_discounted
        )
        self.running_return = np.where(began_before, self.running_return, 0.0) + tail_return
        self.length = np.where(began_before, self.length, 0) + tail_length

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The running episodes, as tensors (a checkpoint's ``collector`` entry)."""
        arrays = {"ep_return": self.running_return, "ep_disc_return": self.discounted_return, "ep_length": self.length}
        return {name: torch.from_numpy(np.array(value)) for name, value in arrays.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.running_return, self.discounted_return = state["ep_return"].numpy(), state["ep_disc_return"].numpy()
        self.length = state["ep_length"].numpy()


def reference_episodes(
    batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]], gamma: float
) -> tuple[list[tuple[int, float, int]], list[tuple[np.ndarray, np.ndarray]]]:
    """``EpisodeTracker.track`` the slow, obvious way: one step at a time, over consecutive batches.

    Args:
        batches: ``(rew, valid, done)`` per batch, each ``[T, B]``.
    Returns:
        ``(env, return, length)`` of every episode that ended, in time order; and, before each batch, the
        running episodes' ``(discounted return so far, length so far)``, each ``[B]``.
    """
    num_envs = batches[0][0].shape[1]
    ret, disc, discount, length = np.zeros(num_envs), np.zeros(num_envs), np.ones(num_envs), np.zeros(num_envs, int)
    finished, carried = [], []
    for rew, valid, done in batches:
        carried.append((disc.copy(), length.copy()))
        for t in range(rew.shape[0]):
            r = rew[t] * valid[t]
            ret += r
            disc += discount * r
            discount *= np.where(valid[t], gamma, 1.0)
            length += valid[t]
            for b in np.flatnonzero(done[t]):
                finished.append((b, ret[b], length[b]))
                ret[b], disc[b], discount[b], length[b] = 0.0, 0.0, 1.0, 0
    return finished, carried
