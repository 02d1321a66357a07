"""The tensor math of ``functional.py`` against plain Python loops written from the lecture's formulas."""

from __future__ import annotations

import pytest
import torch

from pg_lightning import functional as F
from pg_lightning.segments import masked_mean, segment_ids


def random_episode_data(num_steps: int, num_envs: int, seed: int):
    """Random rewards with terminations, truncations and NEXT_STEP reset steps after each end."""
    g = torch.Generator().manual_seed(seed)
    rew = torch.randn(num_steps, num_envs, generator=g)
    terminated = torch.rand(num_steps, num_envs, generator=g) < 0.15
    truncated = (torch.rand(num_steps, num_envs, generator=g) < 0.08) & ~terminated
    valid = torch.ones(num_steps, num_envs, dtype=torch.bool)
    valid[1:] = ~(terminated[:-1] | truncated[:-1])
    # A reset step is no transition: no reward, no end.
    rew, terminated, truncated = rew * valid, terminated & valid, truncated & valid
    return rew, terminated, truncated, valid


def loop_reward_to_go(rew, done, gamma):
    num_steps, num_envs = rew.shape
    out = torch.zeros_like(rew)
    for b in range(num_envs):
        for t in range(num_steps):
            total, discount = 0.0, 1.0
            for u in range(t, num_steps):
                total += discount * float(rew[u, b])
                discount *= gamma
                if done[u, b]:
                    break
            out[t, b] = total
    return out


def split_episodes(done, valid, b):
    """Lists of time indices, one per episode of env b (reset steps belong to none)."""
    episodes, current = [], []
    for t in range(done.shape[0]):
        if not valid[t, b]:
            continue
        current.append(t)
        if done[t, b]:
            episodes.append(current)
            current = []
    if current:
        episodes.append(current)
    return episodes


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reward_to_go_matches_loop(gamma, seed):
    rew, terminated, truncated, _ = random_episode_data(40, 5, seed)
    done = terminated | truncated
    torch.testing.assert_close(F.reward_to_go(rew, done, gamma), loop_reward_to_go(rew, done, gamma))


def test_reward_to_go_stops_at_termination_and_truncation_alike():
    rew = torch.tensor([[1.0], [2.0], [4.0], [8.0]])
    terminated = torch.tensor([[False], [True], [False], [False]])
    truncated = torch.tensor([[False], [False], [False], [True]])
    q = F.reward_to_go(rew, terminated | truncated, gamma=0.5)
    torch.testing.assert_close(q[:, 0], torch.tensor([1 + 0.5 * 2, 2.0, 4 + 0.5 * 8, 8.0]))


def test_ends_in_batch_marks_only_finished_episodes():
    done = torch.tensor([[False, False], [True, False], [False, False], [False, True], [False, False]])
    expected = torch.tensor([[True, True], [True, True], [False, True], [False, True], [False, False]])
    assert torch.equal(F.ends_in_batch(done), expected)


@pytest.mark.parametrize("gamma", [1.0, 0.95])
@pytest.mark.parametrize("seed", [3, 4])
def test_episode_returns_match_loop_with_carry_over(gamma, seed):
    rew, terminated, truncated, valid = random_episode_data(30, 4, seed)
    done = terminated | truncated
    return_before = torch.tensor([0.0, 2.5, -1.0, 7.0])
    length_before = torch.tensor([0, 3, 1, 10])
    got = F.episode_returns(rew, done, valid, gamma, return_before, length_before)
    for b in range(4):
        for i, steps in enumerate(split_episodes(done, valid, b)):
            if not done[steps[-1], b]:
                continue  # still running at the end of the batch: no full return to compare
            first_is_carried = i == 0 and valid[0, b]
            start = int(length_before[b]) if first_is_carried else 0
            total = float(return_before[b]) if first_is_carried else 0.0
            total += sum(gamma ** (start + k) * float(rew[t, b]) for k, t in enumerate(steps))
            for t in steps:
                assert got[t, b].item() == pytest.approx(total, rel=1e-5, abs=1e-5)


def test_pseudo_loss_gradient_is_hand_computed_reinforce():
    """Linear-softmax policy π(a|s) = softmax(W s)_a: ∇_W log π(a|s) = (e_a - π(·|s)) s^T.

    Two episodes (N = 2), returns R_1 = 3 and R_2 = -1, REINFORCE:
        ∇J ≈ (1/N) Σ_i Σ_t (e_{a_it} - π(·|s_it)) s_it^T R_i.
    """
    W = torch.tensor([[0.3, -0.2], [-0.1, 0.4], [0.05, 0.0]], requires_grad=True)
    obs = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 1.0]])  # three steps
    act = torch.tensor([0, 2, 1])
    returns = torch.tensor([3.0, 3.0, -1.0])  # steps 0-1 are episode 1, step 2 is episode 2
    logp = torch.distributions.Categorical(logits=obs @ W.T).log_prob(act)
    loss = F.pseudo_loss(logp, returns, torch.ones(3, dtype=torch.bool), num_episodes=2)
    (autodiff_grad,) = torch.autograd.grad(-loss, W)

    probs = torch.softmax(obs @ W.detach().T, dim=-1)
    by_hand = torch.zeros(3, 2)
    for t in range(3):
        e_a = torch.nn.functional.one_hot(act[t], 3).float()
        by_hand += torch.outer(e_a - probs[t], obs[t]) * returns[t]
    torch.testing.assert_close(autodiff_grad, by_hand / 2)


def test_pseudo_loss_ignores_masked_steps_and_detaches_weights():
    logp = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    weights = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    loss = F.pseudo_loss(logp, weights, torch.tensor([True, False, True]), num_episodes=1)
    loss.backward()
    assert loss.item() == pytest.approx(-(0.5 * 1.0 + 2.0 * 3.0))
    torch.testing.assert_close(logp.grad, torch.tensor([-1.0, 0.0, -3.0]))
    assert weights.grad is None


def test_masked_mean():
    values = torch.tensor([1.0, 100.0, 3.0])
    assert masked_mean(values, torch.tensor([True, False, True])).item() == pytest.approx(2.0)
    assert masked_mean(values, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_segment_ids_number_each_episode_part_once():
    valid = torch.tensor([[1, 1], [1, 1], [0, 1], [1, 1]]).bool()
    done = torch.tensor([[0, 0], [1, 0], [0, 1], [0, 0]]).bool()
    assert segment_ids(valid, done).tolist() == [[0, 2], [0, 2], [-1, 2], [1, 3]]


def test_other_envs_mean_matches_loop():
    rew, terminated, truncated, valid = random_episode_data(25, 3, seed=5)
    mask = valid & F.ends_in_batch(terminated | truncated)
    got = F.other_envs_mean(rew, mask)
    for b in range(3):
        others = [float(rew[u, c]) for u in range(25) for c in range(3) if mask[u, c] and c != b]
        assert got[b].item() == pytest.approx(sum(others) / len(others), abs=1e-5)
    # One env alone has no other env: no baseline.
    assert F.other_envs_mean(rew[:, :1], mask[:, :1]).tolist() == [0.0]


def loop_gae(rew, values, terminated, done, gamma, lam):
    num_steps, num_envs = rew.shape
    out = torch.zeros_like(rew)
    for b in range(num_envs):
        advantage = 0.0
        for t in reversed(range(num_steps)):
            if done[t, b]:
                advantage = 0.0
            bootstrap = 0.0 if terminated[t, b] else gamma * float(values[t + 1, b])
            delta = float(rew[t, b]) + bootstrap - float(values[t, b])
            advantage = delta + gamma * lam * advantage
            out[t, b] = advantage
    return out


@pytest.mark.parametrize("lam", [0.0, 0.9, 1.0])
def test_gae_matches_loop(lam):
    rew, terminated, truncated, _ = random_episode_data(30, 4, seed=6)
    values = torch.randn(31, 4, generator=torch.Generator().manual_seed(7))
    done = terminated | truncated
    torch.testing.assert_close(
        F.generalized_advantages(rew, values, terminated, done, 0.9, lam), loop_gae(rew, values, terminated, done, 0.9, lam)
    )


def test_value_targets_bootstrap_after_truncation_and_cut_but_not_after_termination():
    """λ = 1: A_t + V(s_t) is the reward-to-go, closed by γ V(next obs) unless the episode terminated."""
    gamma = 0.5
    rew = torch.tensor([[1.0, 1.0, 1.0]])  # one step, three envs
    values = torch.tensor([[0.0, 0.0, 0.0], [10.0, 10.0, 10.0]])  # V(obs[0]), V(obs[1])
    terminated = torch.tensor([[True, False, False]])
    truncated = torch.tensor([[False, True, False]])  # env 2: cut by the batch end
    advantages = F.generalized_advantages(rew, values, terminated, terminated | truncated, gamma, 1.0)
    assert advantages[0].tolist() == [1.0, 1.0 + gamma * 10.0, 1.0 + gamma * 10.0]


def test_optimal_baseline_uses_the_other_envs_trajectories():
    generator = torch.Generator().manual_seed(8)
    scores, returns = torch.randn(6, 4, generator=generator), torch.randn(6, generator=generator)
    envs = torch.tensor([0, 0, 1, 2, 2, 2])
    got = F.optimal_baseline(scores, returns, envs, num_envs=3)
    for i in range(6):
        others = [j for j in range(6) if envs[j] != envs[i]]
        g2 = scores[others] ** 2
        torch.testing.assert_close(got[i], (g2 * returns[others, None]).sum(0) / g2.sum(0))


def test_standardize_centres_on_the_other_envs_mean_and_scales_by_the_batch_std():
    generator = torch.Generator().manual_seed(9)
    values = 5.0 + 3.0 * torch.randn(6, 3, generator=generator)
    mask = torch.rand(6, 3, generator=generator) > 0.3
    out = F.standardize(values, mask)
    batch_std = values[mask].double().std(unbiased=False)
    for b in range(3):
        others = torch.cat([values[:, c][mask[:, c]] for c in range(3) if c != b]).double()
        expected = (values[:, b].double() - others.mean()) / (batch_std + 1e-8) * mask[:, b]
        torch.testing.assert_close(out[:, b], expected.float())
    assert (out[~mask] == 0).all()
    # One env alone: its own mean (mean 0, std 1 over its used steps).
    alone = F.standardize(values[:, :1], torch.ones(6, 1, dtype=torch.bool))
    assert alone.mean().abs() < 1e-6 and alone.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    # Every step equal (a return cap reached everywhere): weights 0, not 0/0.
    assert (F.standardize(torch.full((4, 2), 500.0), torch.ones(4, 2, dtype=torch.bool)) == 0).all()
