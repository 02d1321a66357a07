"""Recurrent policies (lecture §3.3): the state through the rollout, its replay in training, resume, the exact
gradient on a POMDP that needs memory, and every update kind with ``policy=gru``."""

from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from test_configs import compose_with
from test_reliability import training_rows
from test_train import run_train_py
from torch import nn
from torch.distributions import Categorical

from pg_lightning import estimators as E
from pg_lightning.analysis import estimate_gradient
from pg_lightning.envs import VectorEnvFactory
from pg_lightning.mdps import CueMemory, exact_cue_objective
from pg_lightning.recurrent import RecurrentPolicy, action_distribution, recurrent_policy
from pg_lightning.rollout import RolloutCollector
from pg_lightning.run import ConfigError, train

MASKED = VectorEnvFactory("CartPole-v1", num_envs=4, observation_indices=[0, 2])


def masked_collector(steps_per_env: int, whole_episodes: bool = False) -> RolloutCollector:
    return RolloutCollector(MASKED.make(), steps_per_env=steps_per_env, seed=0, whole_episodes=whole_episodes)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("whole_episodes", [False, True])
def test_replayed_log_probs_equal_the_collected_ones_with_resets_inside_the_batch(cell, whole_episodes):
    envs = MASKED.make()
    torch.manual_seed(0)
    policy = recurrent_policy(envs.single_observation_space, envs.single_action_space, cell=cell, hidden_size=16)
    collector = masked_collector(60, whole_episodes)
    collector.collect(policy)
    batch = collector.collect(policy)  # the second batch: cut mid-episode, it starts from a carried state
    assert batch.first[1:-1].any(), "episodes start inside the batch"
    if not whole_episodes:
        assert batch.policy_state.abs().sum() > 0, "the state carried into step 0 is not the initial one"
    valid = batch.valid
    replayed = action_distribution(policy, batch).log_prob(batch.act)
    torch.testing.assert_close(replayed[valid], batch.logp_behavior[valid], rtol=1e-5, atol=1e-5)
    # The check can fail: a replay without the resets (or from the initial state) gives other log-probs.
    no_resets = policy(batch.obs[:-1], batch.policy_state, torch.zeros_like(batch.first[:-1])).log_prob(batch.act)
    assert not torch.allclose(no_resets[valid], batch.logp_behavior[valid], atol=1e-4)


class CountingPolicy(nn.Module):
    """A recurrent policy whose state counts the steps it has seen since its last reset; uniform actions."""

    recurrent = True

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []  # the state each step starts from, after the collector's resets

    def initial_state(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(batch_size, 1)

    def step(self, obs, state):
        self.seen.append(state[:, 0].clone())
        return Categorical(logits=torch.zeros(len(obs), 2)), state + 1


def test_the_state_is_reset_at_episode_starts_and_nowhere_else():
    """At the last step of every episode the state has counted exactly the episode's earlier steps, also for
    episodes that run across batch boundaries: a reset missed makes the count too high, one too many too low."""
    policy = CountingPolicy()
    collector = masked_collector(37)
    batches = [collector.collect(policy) for _ in range(4)]
    seen = torch.stack(policy.seen).numpy()  # [4 · 37, B]
    valid = np.concatenate([b.valid.numpy() for b in batches])
    done = np.concatenate([b.done.numpy() for b in batches])
    checked = 0
    for env in range(valid.shape[1]):
        length = 0
        for t in range(len(valid)):
            length += int(valid[t, env])
            if valid[t, env] and done[t, env]:
                assert seen[t, env] == length - 1, (env, t)
                length, checked = 0, checked + 1
    assert checked >= 20
    # The stored starts are the steps the state was reset before; a batch's last row (its bootstrap point) is the
    # next batch's first.
    first = np.concatenate([b.first[:-1].numpy() for b in batches])
    assert ((seen == 0) == first).all()
    for before, after in zip(batches, batches[1:]):
        assert torch.equal(before.first[-1], after.first[0])


def test_a_resumed_recurrent_run_continues_exactly_like_the_uninterrupted_one(tmp_path):
    """The collector's per-env state goes into the checkpoint: the iterations after a resume are the
    uninterrupted run's, number for number (GAE batches are cut mid-episode, so the state crosses the cut)."""
    # anneal_lr=false: the env config anneals over the budget, and the interrupted run's budget is another one.
    common = ["logger=csv", "stop_on_solve=false", "env=masked_cartpole", "policy=gru", "env.num_envs=4",
              "steps_per_env=64", "estimator=gae", "anneal_lr=false", "eval.num_episodes=2",
              "eval.every_n_iterations=1"]
    whole = train(compose_with(*common, "total_env_steps=1500"), tmp_path / "whole")
    part = train(compose_with(*common, "total_env_steps=700"), tmp_path / "part")
    resumed = train(compose_with(*common, "total_env_steps=1500", f"ckpt_path={tmp_path / 'part' / 'last.ckpt'}"),
                    tmp_path / "part")
    assert part["iterations"] < resumed["iterations"] == whole["iterations"] >= 6
    assert training_rows(tmp_path / "part" / "metrics.csv") == training_rows(tmp_path / "whole" / "metrics.csv")


# --- The exact gradient on a POMDP that needs memory ----------------------------------------------------------

EPISODES, PER_BATCH, Z = 16_000, 32, 4.0


class Forgetful(nn.Module):
    """The same network with its state reset at every step: what a rollout that does not carry it computes."""

    recurrent = True

    def __init__(self, policy: RecurrentPolicy):
        super().__init__()
        self.policy = policy

    def initial_state(self, batch_size):
        return self.policy.initial_state(batch_size)

    def step(self, obs, state):
        return self.policy.step(obs, self.policy.initial_state(len(obs)))

    def forward(self, obs, state, first):
        return self.policy(obs, state, torch.ones_like(first))


def cue_policy() -> RecurrentPolicy:
    policy = RecurrentPolicy(3, CueMemory().action_space, cell="gru", hidden_size=6, encoder_sizes=[])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # unit-scale weights (the head's init is near 0): the cue lives on in h and moves π
        for p in policy.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return policy


def cue_estimates(policy: nn.Module, estimator) -> torch.Tensor:
    """``[M, P]`` REINFORCE estimates of ∇J from batches of whole episodes, each collected by the training
    rollout (``RolloutCollector`` with whole episodes, what training uses without V_φ) and differentiated
    through the training loss (``estimate_gradient``)."""
    envs = gym.vector.SyncVectorEnv([CueMemory] * EPISODES)
    torch.manual_seed(5)
    batch = RolloutCollector(envs, steps_per_env=1, seed=5, whole_episodes=True).collect(policy)
    rows = []
    for i in range(EPISODES // PER_BATCH):
        part = batch.select_envs(slice(i * PER_BATCH, (i + 1) * PER_BATCH))
        rows.append(torch.cat([g.flatten() for g in estimate_gradient(policy, part, estimator)]))
    return torch.stack(rows).double()


def z_scores(estimates: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    return (estimates.mean(0) - exact).abs() / (estimates.std(0) / math.sqrt(len(estimates)) + 1e-12)


@pytest.fixture(scope="module")
def cue_exact():
    policy = cue_policy()
    objective = exact_cue_objective(policy, CueMemory())
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(objective, list(policy.parameters()))]).double()
    return policy, objective.item(), exact


@pytest.mark.parametrize("estimator", [E.reinforce(1.0), E.reward_to_go(1.0)], ids=["reinforce", "reward_to_go"])
def test_a_recurrent_policys_gradient_estimate_matches_the_exact_gradient_on_a_memory_pomdp(cue_exact, estimator):
    policy, objective, exact = cue_exact
    assert 0.6 < objective < 0.95, "the policy remembers the cue, imperfectly (a memoryless one has J = 1/2)"
    assert exact.abs().max() > 0.05
    z = z_scores(cue_estimates(policy, estimator), exact)
    assert (z <= Z).all(), z.tolist()


def test_a_rollout_that_does_not_carry_the_state_is_caught_as_biased(cue_exact):
    """Reset every step, the same parameters act as a memoryless policy: its estimates miss ∇J by many SE."""
    policy, _, exact = cue_exact
    z = z_scores(cue_estimates(Forgetful(policy), E.reinforce(1.0)), exact)
    assert z.max() > 3 * Z, z.tolist()


# --- V_φ with memory -------------------------------------------------------------------------------------------


class NamesCueZero(nn.Module):
    """A memoryless policy that names cue 0 (action 0) with probability ≈ 1."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([8.0, -8.0]))

    def forward(self, obs):
        return Categorical(logits=self.logits.expand(*obs.shape[:-1], 2))


def cue_values_after_training(policy: nn.Module) -> dict[int, float]:
    """Train V_φ (GAE's) through the module's own loop on CueMemory while the policy stays as it is (lr 0), then
    V_φ's mean over the blank steps of fresh episodes, by the episode's cue, read through ``module._values``."""
    import lightning as L

    from pg_lightning import PolicyGradientModule
    from pg_lightning.value import ValueFunctionConfig

    if "CueMemoryTest-v0" not in gym.registry:
        gym.register("CueMemoryTest-v0", entry_point=CueMemory)
    torch.manual_seed(0)
    module = PolicyGradientModule(VectorEnvFactory("CueMemoryTest-v0", num_envs=8), policy=policy,
                                  estimator=E.gae(0.99, 0.95, ValueFunctionConfig(lr=1e-2, steps=20)),
                                  optimizer=lambda params: torch.optim.SGD(params, lr=0.0), steps_per_env=30,
                                  max_iterations=40, whole_episodes=False)
    trainer = L.Trainer(max_epochs=-1, accelerator="cpu", logger=False, enable_model_summary=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module)
    batch = RolloutCollector(gym.vector.SyncVectorEnv([CueMemory] * 8), steps_per_env=60, seed=7).collect(module.policy)
    values = module._values(batch)[:-1]  # [T, B]
    blank = batch.valid & (batch.obs[:-1, :, 2] == 1)
    cue = torch.zeros_like(batch.valid, dtype=torch.long)
    for t in range(batch.num_steps):  # each step's episode cue: the first observation's
        start = batch.first[t] & (batch.obs[t, :, 2] == 0)
        cue[t] = torch.where(start, batch.obs[t, :, 1].long(), cue[t - 1] if t else cue[t])
    return {c: values[blank & (cue == c)].mean().item() for c in (0, 1)}


def test_v_phi_reads_the_policys_memory_where_the_return_depends_on_the_past():
    """The policy names cue 0, so after a blank the return is ≈ 1 if the cue was 0 and 0 if it was 1. V_φ on the
    recurrent policy's h_t learns both; V_φ on the observation (a memoryless policy's) cannot tell the blanks
    apart, so its two means are equal: the case that shows the check can fail."""
    policy = cue_policy()
    with torch.no_grad():
        policy.head.weight.zero_()
        policy.head.bias.copy_(torch.tensor([8.0, -8.0]))
    with_memory = cue_values_after_training(policy)
    assert with_memory[0] > 0.8 and with_memory[1] < 0.2, with_memory
    without_memory = cue_values_after_training(NamesCueZero())
    assert abs(without_memory[0] - without_memory[1]) < 1e-6, without_memory


# --- Every update kind, and what is refused -------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        ["estimator=reinforce"],
        ["estimator=gae", "off_policy=clipped", "off_policy.minibatches=2"],
        ["estimator=gae", "off_policy=trajectory"],
        ["estimator=value_baseline", "off_policy=none", "optimizer=natural_gradient", "anneal_lr=false"],
        ["estimator=gae", "policy=lstm", "off_policy=per_step", "off_policy.reuse_batches=1"],
    ],
    ids=["reinforce", "clipped", "trajectory", "natural_gradient", "lstm_per_step_reuse"],
)
def test_a_recurrent_policy_trains_with_every_update_kind(overrides, tmp_path):
    summary = train(compose_with("logger=csv", "stop_on_solve=false", "env=masked_cartpole", "policy=gru",
                                 "env.num_envs=4", "steps_per_env=64", "total_env_steps=1200", "eval.num_episodes=2",
                                 *overrides), tmp_path)
    assert summary["status"] == "finished" and summary["iterations"] >= 3
    assert math.isfinite(summary["eval_return_mean"])


@pytest.mark.slow
def test_a_recurrent_policy_trains_under_ddp_on_two_cpu_processes(tmp_path):
    """Each rank carries the state of its own envs; the gradients are averaged as for any policy. The env config's
    own estimator and update (gae_shared_step, clipped): what a user's DDP run of this command takes."""
    run_dir = tmp_path / "run"
    result = run_train_py("trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "logger=csv",
                          "env=masked_cartpole", "policy=gru", "env.num_envs=4", "steps_per_env=64",
                          "total_env_steps=1500", "stop_on_solve=false", "eval.num_episodes=2",
                          f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "finished" and summary["iterations"] >= 3
    assert summary["estimator"] == "gae_shared_step"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["estimator=gae", "off_policy=clipped", "off_policy.minibatch_unit=steps"],
         "off_policy.minibatch_unit=steps cannot be combined with a recurrent policy"),
        (["estimator=optimal_baseline", "off_policy=none"],
         "estimator.baseline=optimal cannot be combined with a recurrent policy"),
        (["policy.cell=rnn"], "policy.cell must be gru or lstm, got 'rnn'"),
    ],
)
def test_what_a_recurrent_policy_cannot_do_is_refused_in_one_line(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as info:
        train(compose_with("logger=none", "env=masked_cartpole", "policy=gru", *overrides), tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_recurrent_policy_takes_an_observation_width_or_an_encoder_not_both():
    space = gym.spaces.Discrete(2)
    encoder = nn.Linear(3, 5)
    encoder.out_features = 5
    assert RecurrentPolicy(None, space, encoder=encoder).cell.input_size == 5
    for obs_dim, given in ((3, encoder), (None, None)):
        with pytest.raises(ValueError, match=r"obs_dim \(for its MLP encoder\) or an encoder") as info:
            RecurrentPolicy(obs_dim, space, encoder=given)
        assert "\n" not in str(info.value)
