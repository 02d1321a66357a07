"""Small tabular MDPs whose objective J(θ) and expected gradient estimates can be computed exactly.

They let tests compare the mean of many sampled gradient estimates with the exact value (lecture §2:
∇J = E[Σ_t ∇ log π(a_t|s_t) · R(τ)]). Observations are one-hot states, so a policy with
``hidden_sizes=[]`` is a tabular softmax.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from pg_lightning.distributions import mask_actions


class TabularMDP(gym.Env):
    """A finite MDP with a fixed horizon.

    Args:
        transitions: ``[S, A, S]`` probabilities P(s'|s, a).
        rewards: ``[S, A]`` mean reward r(s, a); the sampled reward adds N(0, ``reward_noise``²).
        terminal: ``[S]`` bool, states that end the episode on arrival.
        horizon: the episode *terminates* after this many steps (the end of a finite-horizon MDP,
            not a time-limit cut), so J is exactly the finite sum of lecture §1.
        start_state: the initial state.
        action_mask: ``[S, A]`` bool, the actions allowed in each state (None: all). The env gives its row as
            ``info["action_mask"]`` at every reset and step and raises on a disallowed action.
    """

    metadata: dict = {"render_modes": []}

    def __init__(
        self,
        transitions: np.ndarray,
        rewards: np.ndarray,
        terminal: np.ndarray,
        horizon: int,
        start_state: int = 0,
        reward_noise: float = 0.0,
        action_mask: np.ndarray | None = None,
    ):
        self.transitions = np.asarray(transitions, dtype=np.float64)
        self.rewards = np.asarray(rewards, dtype=np.float64)
        self.terminal = np.asarray(terminal, dtype=bool)
        self.horizon = horizon
        self.start_state = start_state
        self.reward_noise = reward_noise
        self.action_mask = None if action_mask is None else np.asarray(action_mask, dtype=bool)
        num_states, num_actions, _ = self.transitions.shape
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(num_states,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(num_actions)
        self.state, self.t = start_state, 0

    def _obs(self) -> np.ndarray:
        obs = np.zeros(self.observation_space.shape, dtype=np.float32)
        obs[self.state] = 1.0
        return obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.state, self.t = self.start_state, 0
        return self._obs(), self._info()

    def _info(self) -> dict:
        return {} if self.action_mask is None else {"action_mask": self.action_mask[self.state].copy()}

    def step(self, action):
        s, a = self.state, int(action)
        if self.action_mask is not None and not self.action_mask[s, a]:
            raise ValueError(f"action {a} is not allowed in state {s}")
        reward = self.rewards[s, a] + self.reward_noise * self.np_random.standard_normal()
        cumulative = np.cumsum(self.transitions[s, a])
        self.state = min(int(np.searchsorted(cumulative, self.np_random.random(), side="right")), len(cumulative) - 1)
        self.t += 1
        terminated = bool(self.terminal[self.state]) or self.t >= self.horizon
        return self._obs(), float(reward), terminated, False, self._info()

    def tensors(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(P [S, A, S], r [S, A], alive [S])`` as tensors; ``alive`` = 1 for non-terminal states."""
        return (
            torch.as_tensor(self.transitions, dtype=dtype),
            torch.as_tensor(self.rewards, dtype=dtype),
            torch.as_tensor(~self.terminal, dtype=dtype),
        )


def policy_table(policy: nn.Module, num_states: int, action_mask: np.ndarray | None = None) -> torch.Tensor:
    """``[S, A]`` π(a|s) of ``policy`` at the one-hot observations, differentiable in θ; with ``action_mask``
    ``[S, A]`` π restricted to the allowed actions (``distributions.mask_actions``)."""
    mask = None if action_mask is None else torch.as_tensor(action_mask, dtype=torch.bool)
    return mask_actions(policy(torch.eye(num_states)), mask).probs.double()


def exact_objective(policy: nn.Module, mdp: TabularMDP, gamma: float = 1.0) -> torch.Tensor:
    """J(θ) = E[Σ_{t<H} γ^t r_t] by propagating the state distribution d_t; differentiable in θ.

        J = Σ_t γ^t Σ_s d_t(s) Σ_a π(a|s) r(s, a),   d_{t+1}(s') = Σ_{s,a} d_t(s) π(a|s) P(s'|s,a) alive(s')
    """
    P, r, alive = mdp.tensors()
    pi = policy_table(policy, len(alive), mdp.action_mask)
    d = torch.zeros(len(alive), dtype=torch.float64)
    d[mdp.start_state] = 1.0
    J = torch.zeros((), dtype=torch.float64)
    for t in range(mdp.horizon):
        J = J + gamma**t * (d[:, None] * pi * r).sum()
        d = torch.einsum("s,sa,sax->x", d, pi, P) * alive
    return J


def exact_reward_to_go_surrogate(policy: nn.Module, mdp: TabularMDP, gamma: float) -> torch.Tensor:
    """A scalar whose gradient is E[Σ_t ∇ log π(a_t|s_t) · Q_t], Q_t = Σ_{t'≥t} γ^{t'-t} r_t'.

    That is the exact mean of the reward-to-go estimator (lecture §5.1): Σ_t Σ_s d_t(s) Σ_a ∇π(a|s) Q_t(s,a)
    with d_t and Q_t held constant. For γ = 1 it equals ∇J; for γ < 1 it is the usual discounted
    reward-to-go gradient, which differs from ∇ of the discounted J (no γ^t factor on step t).
    """
    P, r, alive = mdp.tensors()
    pi = policy_table(policy, len(alive), mdp.action_mask)
    frozen = pi.detach()
    # Backward: Q_t(s, a) = r(s, a) + γ Σ_s' P(s'|s,a) alive(s') V_{t+1}(s'),  V_t(s) = Σ_a π(a|s) Q_t(s, a).
    q = []
    v_next = torch.zeros(len(alive), dtype=torch.float64)
    for _ in range(mdp.horizon):
        q_t = r + gamma * torch.einsum("sax,x->sa", P, alive * v_next)
        q.append(q_t)
        v_next = (frozen * q_t).sum(-1)
    q.reverse()
    d = torch.zeros(len(alive), dtype=torch.float64)
    d[mdp.start_state] = 1.0
    surrogate = torch.zeros((), dtype=torch.float64)
    for t in range(mdp.horizon):
        surrogate = surrogate + (d[:, None] * pi * q[t]).sum()
        d = torch.einsum("s,sa,sax->x", d, frozen, P) * alive
    return surrogate


def bandit(means: list[float], reward_noise: float = 1.0) -> TabularMDP:
    """A one-step multi-armed bandit: arm a pays N(means[a], reward_noise²)."""
    num_actions = len(means)
    transitions = np.zeros((2, num_actions, 2))
    transitions[:, :, 1] = 1.0
    rewards = np.zeros((2, num_actions))
    rewards[0] = means
    return TabularMDP(transitions, rewards, terminal=np.array([False, True]), horizon=1, reward_noise=reward_noise)


def chain(length: int = 4, horizon: int = 4, p_right: float = 0.7, reward_noise: float = 0.5) -> TabularMDP:
    """A stochastic chain: states 0 … length-1, the last one a terminal goal.

    Action 1 moves right with probability ``p_right`` (else stays) and pays 0.5; action 0 moves left
    (or stays at 0) and pays 1. Reaching the goal pays 3 more (in expectation). Episodes end at the goal
    or after ``horizon`` steps, so their length depends on the policy. Returns are positive, as in
    CartPole, which is where baselines matter (lecture §5.2).
    """
    transitions = np.zeros((length, 2, length))
    rewards = np.zeros((length, 2))
    for s in range(length):
        transitions[s, 0, max(s - 1, 0)] = 1.0
        right = min(s + 1, length - 1)
        transitions[s, 1, right] += p_right
        transitions[s, 1, s] += 1.0 - p_right
        rewards[s, 0] = 1.0
        rewards[s, 1] = 0.5 + 3.0 * p_right * (right == length - 1 and s != length - 1)
    terminal = np.zeros(length, dtype=bool)
    terminal[-1] = True
    return TabularMDP(transitions, rewards, terminal, horizon=horizon, reward_noise=reward_noise)


def masked_chain(horizon: int = 4, reward_noise: float = 0.5) -> TabularMDP:
    """A chain of 4 states (the last a terminal goal) with three actions, not all allowed everywhere.

    Action 0 moves left and pays 1; action 1 moves right with probability 0.7 and pays 0.5 (3 more on reaching the
    goal); action 2 jumps two states right with probability 0.5 (else stays) and pays 0.2. Not allowed: moving
    left in state 0 and jumping in state 1, so the policy's choice is restricted differently in each state.
    """
    length, p_right, p_jump = 4, 0.7, 0.5
    transitions = np.zeros((length, 3, length))
    rewards = np.zeros((length, 3))
    for s in range(length):
        transitions[s, 0, max(s - 1, 0)] = 1.0
        right, jump = min(s + 1, length - 1), min(s + 2, length - 1)
        transitions[s, 1, right] += p_right
        transitions[s, 1, s] += 1.0 - p_right
        transitions[s, 2, jump] += p_jump
        transitions[s, 2, s] += 1.0 - p_jump
        rewards[s] = [1.0, 0.5 + 3.0 * p_right * (right == length - 1 != s), 0.2 + 3.0 * p_jump * (jump == length - 1 != s)]
    terminal = np.zeros(length, dtype=bool)
    terminal[-1] = True
    allowed = np.ones((length, 3), dtype=bool)
    allowed[0, 0] = allowed[1, 2] = False
    return TabularMDP(transitions, rewards, terminal, horizon=horizon, reward_noise=reward_noise, action_mask=allowed)


def random_length(horizon: int = 30, reward_noise: float = 0.5) -> TabularMDP:
    """Three states, three actions, episodes of random length (about 7 steps under a uniform policy).

    State 2 is terminal. Every action can end the episode (10–30% per step) and each changes that chance,
    so the actions decide how long an episode lasts, which is what a batch rule that selects on episode
    ends would get wrong. Rewards are positive and depend on state and action. ``horizon`` caps the length.
    """
    transitions = np.array(
        [
            [[0.6, 0.3, 0.1], [0.2, 0.6, 0.2], [0.45, 0.45, 0.1]],
            [[0.5, 0.45, 0.05], [0.3, 0.5, 0.2], [0.1, 0.6, 0.3]],
            [[0.0, 0.0, 1.0]] * 3,
        ]
    )
    rewards = np.array([[1.0, 2.0, 0.5], [0.5, 1.5, 3.0], [0.0, 0.0, 0.0]])
    terminal = np.array([False, False, True])
    return TabularMDP(transitions, rewards, terminal, horizon=horizon, reward_noise=reward_noise)


class CueMemory(gym.Env):
    """A POMDP that needs memory (lecture §3.3): a cue c ∈ {0, 1} is shown at t = 0 only, then a blank for
    ``horizon - 1`` steps; the last step's action pays 1 if it names the cue, every other action pays 0.

    Observations are one-hot over {cue 0, cue 1, blank}. A memoryless policy sees a blank at the last step and
    cannot beat J = 1/2; a policy with memory can reach 1. Episodes terminate after ``horizon`` steps.
    """

    metadata: dict = {"render_modes": []}

    def __init__(self, horizon: int = 3):
        self.horizon = horizon
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(3,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.cue, self.t = 0, 0

    def _obs(self) -> np.ndarray:
        obs = np.zeros(3, dtype=np.float32)
        obs[self.cue if self.t == 0 else 2] = 1.0
        return obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.cue, self.t = int(self.np_random.integers(2)), 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        last = self.t >= self.horizon
        reward = float(last and int(action) == self.cue)
        return self._obs(), reward, last, False, {}

    def observations(self, cue: int) -> torch.Tensor:
        """``[horizon, 1, 3]``: the observations of an episode with cue ``cue`` (they do not depend on the actions)."""
        obs = torch.zeros(self.horizon, 1, 3)
        obs[0, 0, cue] = 1.0
        obs[1:, 0, 2] = 1.0
        return obs


def exact_cue_objective(policy: nn.Module, env: CueMemory) -> torch.Tensor:
    """J(θ) = ½ Σ_c π_θ(a_{H-1} = c | o_0 = c, blanks): exact for a recurrent policy whose state is a function
    of the observations alone (``recurrent.RecurrentPolicy``); differentiable in θ."""
    total = torch.zeros((), dtype=torch.float64)
    for cue in (0, 1):
        obs = env.observations(cue)
        first = torch.zeros(env.horizon, 1, dtype=torch.bool)
        first[0] = True
        probs = policy(obs, policy.initial_state(1), first).probs.double()  # [H, 1, 2]
        total = total + 0.5 * probs[-1, 0, cue]
    return total
