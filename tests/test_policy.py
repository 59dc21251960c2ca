"""Tests of policy.py: the Drifting Policy (Sec. 5.3) and its lesson, the replay-buffer reader,
the PushT environment."""
import importlib.util

import numpy as np
import pytest
import torch

import field
import policy


def data(n_demos=40, seed=0):
    demos = policy.expert(n_demos, torch.Generator().manual_seed(seed))
    obs, chunks = policy.windows([(path[:-1], acts) for path, acts in demos])
    return demos, obs, chunks / policy.SPEED


def test_the_expert_is_bimodal_and_its_mean_collides():
    """The scripted expert goes left and right of the obstacle (both sides, each about half),
    every demonstration reaches the goal without touching it; the mean of the two modes' first
    chunks points straight at the obstacle, and rolling out that mean collides."""
    demos, obs, chunks = data()
    sides = [np.sign(path[len(path) // 2, 0].item()) for path, _ in demos]
    assert 0.3 < sides.count(1.0) / len(sides) < 0.7 and set(sides) == {-1.0, 1.0}
    for path, _ in demos:
        collided, reached = policy.status(path)
        assert not collided.any() and reached[-1]
    first = chunks[obs[:, 1] < -0.95]          # pairs at the start (y near -1)
    assert first.view(-1, policy.HORIZON, 2)[:, :, 0].mean().abs() < 0.2


def test_windows_cut_like_the_sequence_sampler():
    """Step t's pair: the observations t-1, t (t = 0: the first twice) and the actions t ..
    t+H-1, zeros (or the last one, pad="edge") past the end."""
    o = torch.arange(6.).view(3, 2)
    a = torch.arange(10., 16.).view(3, 2)
    obs, chunks = policy.windows([(o, a)], obs_steps=2, horizon=4)
    assert torch.equal(obs[0], torch.tensor([0., 1., 0., 1.]))
    assert torch.equal(obs[2], torch.tensor([2., 3., 4., 5.]))
    assert torch.equal(chunks[1], torch.tensor([12., 13., 14., 15., 0., 0., 0., 0.]))
    edge = policy.windows([(o, a)], obs_steps=2, horizon=4, pad="edge")[1]
    assert torch.equal(edge[2], torch.tensor([14., 15.] * 4))


def test_one_step_sampling_shapes_and_seeds():
    """act: (N, O) observations -> (N, H, 2) chunks within the speed cap's scale; the same
    generator seed gives the same chunks, another seed others (drifting and diffusion draw
    noise; regression is deterministic)."""
    net = policy.network(0)
    obs = torch.randn(5, policy.O)
    for kind in ("drifting", "diffusion"):
        a, b, c = (policy.act(kind, net, obs, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
        assert a.shape == (5, policy.HORIZON, 2) and torch.equal(a, b) and not torch.equal(a, c)
    r = policy.act("regression", net, obs)
    assert r.shape == (5, policy.HORIZON, 2) and torch.equal(r, policy.act("regression", net, obs))


def test_the_policy_loss_is_field_drift_loss_on_its_rows():
    """drifting_loss = field.drift_loss's mean over rows, a row per observation: its G
    generated chunks (the network on G noises and that observation) against its one
    demonstrated chunk."""
    _, obs, chunks = data(10)
    net, G = policy.network(0), 4
    obs, chunks = obs[:6], chunks[:6]
    loss = policy.drifting_loss(net, obs, chunks, G, torch.Generator().manual_seed(3))
    z = torch.randn(6 * G, policy.A, generator=torch.Generator().manual_seed(3))
    gen = torch.stack([net(policy.inputs(z[i * G:(i + 1) * G], obs[i].expand(G, -1)))
                       for i in range(6)])                       # (6, G, A), row by row
    ref = field.drift_loss(gen, chunks[:, None])[0].mean()
    assert torch.allclose(loss, ref, rtol=1e-5), (loss, ref)


def test_a_short_training_beats_the_untrained_policy():
    """600 steps of the drifting policy (64 observations x 8 generated chunks per step, lr
    3e-3) on 40 demonstrations: a quarter or more of 100 rollouts reach the goal past the
    obstacle (seen 0.53; 1000 steps at lr 1e-3 reached all 100), the untrained policy none."""
    _, obs, chunks = data()
    untrained = policy.rollouts("drifting", policy.network(0), 100, seed=0)[0].float().mean()
    net = policy.train("drifting", obs, chunks, steps=600, batch=64, lr=3e-3, gen_per_obs=8)
    ok = policy.rollouts("drifting", net, 100, seed=0)[0].float().mean()
    assert untrained == 0 and ok >= 0.25, (untrained, ok)


@pytest.mark.skipif(importlib.util.find_spec("zarr") is None, reason="zarr: requirements-policy.txt")
def test_replay_buffer_reader(tmp_path):
    """A replay buffer written in Diffusion Policy's layout (zarr: data/obs, data/action,
    meta/episode_ends) reads back as its episodes; one whose ends do not cover the steps is
    refused naming the file."""
    import zarr
    obs, action = np.random.rand(7, 3).astype(np.float32), np.random.rand(7, 2).astype(np.float32)
    root = zarr.open_group(str(tmp_path / "replay.zarr"), mode="w")
    root.create_group("data"), root.create_group("meta")
    root["data/obs"], root["data/action"] = obs, action
    root["meta/episode_ends"] = np.array([3, 7])
    episodes = policy.read_replay(str(tmp_path / "replay.zarr"))
    assert [len(o) for o, _ in episodes] == [3, 4]
    assert np.array_equal(episodes[1][0].numpy(), obs[3:]) and np.array_equal(
        episodes[0][1].numpy(), action[:3])
    root["meta/episode_ends"] = np.array([3, 6])
    with pytest.raises(ValueError, match="replay.zarr"):
        policy.read_replay(str(tmp_path / "replay.zarr"))


@pytest.mark.skipif(importlib.util.find_spec("gym_pusht") is None,
                    reason="gym-pusht: requirements-policy.txt")
def test_pusht_environment_steps():
    """A few real PushT steps through gym-pusht under a policy that pushes toward the centre:
    a score in [0, 1] per episode, as Diffusion Policy's max-coverage score."""
    policy_fn = lambda window: torch.full((8, 2), 256.0)
    scores, mean = policy.pusht_rollouts(policy_fn, n=2, max_steps=16)
    assert scores.shape == (2,) and ((0 <= scores) & (scores <= 1)).all() and mean == scores.mean()
