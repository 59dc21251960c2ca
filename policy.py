"""
The Drifting Policy (paper Sec. 5.3, Tab. 7): one-step action-chunk generation for control.

Diffusion Policy (Chi et al., 2023) predicts a chunk of future actions from a window of past
observations with a 100-step denoiser. The Drifting Policy keeps that protocol and replaces the
denoiser by a one-step generator f(noise | observations), trained with field.drift_loss on the
normalized raw action chunks (no feature space): 1 network evaluation per chunk.

The lesson that runs here (`python policy.py`, CPU, minutes): a point robot reaches a goal past
an obstacle; the scripted expert goes left or right of it at random, per episode. The mean of
the two paths runs into the obstacle, so plain regression (behaviour cloning) fails where a
generative policy picks a side. Three policies on the same demonstrations and the same MLP:
  drifting   one step, field.drift_loss on the chunks                         (1 evaluation)
  regression the mean chunk, MSE                                               (1 evaluation)
  diffusion  DDPM noise prediction, 100 steps, the Diffusion Policy objective (100 evaluations)
Success rate over rollouts and seeds, CPU milliseconds per chunk, and a figure of rollouts.

For users with the benchmark's data: `read_replay` reads the Diffusion Policy replay-buffer
format (zarr: data/obs, data/action, meta/episode_ends), and `pusht_rollouts` scores a policy
on PushT through the gym-pusht package (success: coverage > 0.95, as Diffusion Policy scores
it). Those need `pip install -r requirements-policy.txt`; the benchmark itself was not run here.

    python policy.py                       # the lesson: table + figure (8 min, 2 CPU cores)
    python policy.py --seeds 0 --rollouts 50 --steps 500      # a quick look
Paper: Generative Modeling via Drifting, arXiv:2602.04770 (v2), Sec. 5.3.
"""
import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

import field
from models import MLP

# ------------------------------------------------------------------------------------------
# The task: a point robot, a goal past an obstacle, an expert of two modes
# ------------------------------------------------------------------------------------------
START, GOAL, CENTER = (0.0, -1.0), (0.0, 1.0), (0.0, 0.0)
RADIUS, REACH, SPEED, MAX_STEPS = 0.3, 0.1, 0.1, 60      # obstacle, goal tolerance, |a| cap
JITTER = torch.tensor([0.02, 0.1])      # the start: (0, -1) + uniform +-(0.01, 0.05)
OBS_STEPS, HORIZON, ACT_STEPS = 2, 8, 4     # Diffusion Policy's To, Tp, Ta (theirs: 2, 16, 8)


def step_env(pos, action):
    """pos (N, 2), action (N, 2) -> the next positions: each coordinate of a move capped at
    SPEED (the robot's top speed)."""
    return pos + action.clamp(-SPEED, SPEED)


def status(pos):
    """pos (N, 2) -> (collided, reached) bool (N,): inside the obstacle, within REACH of the
    goal."""
    collided = (pos - pos.new_tensor(CENTER)).norm(dim=1) < RADIUS
    return collided, (pos - pos.new_tensor(GOAL)).norm(dim=1) < REACH


def expert(n, generator):
    """n demonstrations of the scripted expert -> list of (positions (T+1, 2), actions (T, 2)).
    Each episode picks a side at random (left or right of the obstacle, 50/50), heads for the
    waypoint beside it at 0.08 per step, then for the goal; small Gaussian noise on every
    action. The two modes are equally likely, so their mean goes straight into the obstacle."""
    demos = []
    for _ in range(n):
        side = 1.0 if torch.rand(1, generator=generator).item() < 0.5 else -1.0
        pos = torch.tensor(START) + (torch.rand(2, generator=generator) - 0.5) * JITTER
        way, goal, path, acts = torch.tensor([0.55 * side, 0.0]), torch.tensor(GOAL), [pos], []
        target = way
        for _ in range(MAX_STEPS):
            if (pos - way).norm() < 0.1:
                target = goal
            d = target - pos
            a = d / d.norm().clamp_min(1e-6) * min(0.08, d.norm().item())
            a = a + 0.005 * torch.randn(2, generator=generator)
            pos = step_env(pos[None], a[None])[0]
            path.append(pos), acts.append(a)
            if status(pos[None])[1].item():
                break
        demos.append((torch.stack(path), torch.stack(acts)))
    return demos


def windows(episodes, obs_steps=OBS_STEPS, horizon=HORIZON, pad="zero"):
    """Episodes [(observations (T, D_o), actions (T, D_a))] -> the training pairs of every
    step t, as Diffusion Policy's SequenceSampler cuts them: the observations t-obs_steps+1
    .. t flattened (N, obs_steps * D_o), the first repeated before the episode starts; the
    actions t .. t+horizon-1 (N, horizon * D_a), past the episode's end zeros (pad="zero":
    the lesson's velocities, the robot stays) or the last one repeated ("edge": position
    targets, Diffusion Policy's choice)."""
    obs, chunks = [], []
    for o, a in episodes:
        first, last = o[:1].expand(obs_steps - 1, -1), a[-1:].expand(horizon, -1)
        o = torch.cat([first, o])
        a = torch.cat([a, torch.zeros_like(last) if pad == "zero" else last])
        for t in range(len(o) - obs_steps + 1):
            obs.append(o[t:t + obs_steps].flatten())
            chunks.append(a[t:t + horizon].flatten())
    return torch.stack(obs), torch.stack(chunks)


# ------------------------------------------------------------------------------------------
# The three policies: one network size, three objectives
# ------------------------------------------------------------------------------------------
A, O, E = HORIZON * 2, OBS_STEPS * 2, 16      # chunk, observations, time-embedding sizes


def network(seed):
    """The MLP all three policies use (models.MLP, the toy's): input [z (A) | observations (O)
    | time embedding (E)] -> a chunk (A). The drifting policy's z is noise, the regression's
    zeros, the diffusion policy's the noisy chunk with its step's embedding."""
    torch.manual_seed(seed)
    return MLP(noise_dim=A + O + E, hidden=256, depth=3, out_dim=A)


def inputs(z, obs, t_emb=None):
    return torch.cat([z, obs, obs.new_zeros(len(obs), E) if t_emb is None else t_emb], 1)


def drifting_loss(net, obs, chunks, gen_per_obs=16, generator=None):
    """The Drifting Policy's loss on a batch of (observations, demonstrated chunk) pairs: each
    observation is a drift-loss row, with gen_per_obs chunks generated for it and its one
    demonstrated chunk as the positive (field.drift_loss: (B, G, A) against (B, 1, A)).
    NOTE: the design question of issue 31. Each observation has ONE demonstrated chunk, so
    a row has one positive; the official image recipe's row is a class with its N_pos
    images. We keep a row per observation (the public port phamtrongthang123/drifting_policy
    does the same) rather than pooling the chunks of nearby observations (a k-NN estimate of
    p(chunk | obs) with a bandwidth to choose): the conditional distribution is learned
    across rows, as a regression's mean is; where two modes share an observation, rows of
    both kinds pull the generated samples each toward the nearer mode (the kernel weights
    the attraction by distance), and the repulsion among a row's own samples keeps them from
    collapsing on one. No extra regression term: without one the policy already picks a side
    (docs/policy.md: 63% of rollouts reach the goal, regression 3%)."""
    B = len(obs)
    z = torch.randn(B * gen_per_obs, A, generator=generator)
    gen = net(inputs(z, obs.repeat_interleave(gen_per_obs, 0)))      # (B G, A)
    loss, _ = field.drift_loss(gen.view(B, gen_per_obs, A), chunks[:, None])
    return loss.mean()


def regression_loss(net, obs, chunks, generator=None):
    """Behaviour cloning: the chunk's mean squared error (the mean of the modes)."""
    return F.mse_loss(net(inputs(torch.zeros(len(obs), A), obs)), chunks)


DIFFUSION_STEPS = 100


def cosine_schedule(T=DIFFUSION_STEPS):
    """Diffusion Policy's squaredcos_cap_v2 betas (Nichol & Dhariwal) -> (beta, alpha_bar)."""
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    beta = torch.tensor([min(1 - f(t + 1) / f(t), 0.999) for t in range(T)])
    return beta, torch.cumprod(1 - beta, 0)


def time_embedding(t):
    """Diffusion step t (N,) -> (N, E) sinusoidal features."""
    freqs = torch.exp(-math.log(1e4) * torch.arange(E // 2) / (E // 2))
    ang = t.float()[:, None] * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], 1)


def diffusion_loss(net, obs, chunks, generator=None):
    """DDPM (Ho et al.) as Diffusion Policy trains it: a random step t, x_t = sqrt(abar_t) x_0 +
    sqrt(1 - abar_t) eps, the network predicts eps (MSE)."""
    _, abar = cosine_schedule()
    t = torch.randint(0, DIFFUSION_STEPS, (len(obs),), generator=generator)
    eps = torch.randn(chunks.shape, generator=generator)
    x_t = abar[t, None].sqrt() * chunks + (1 - abar[t, None]).sqrt() * eps
    return F.mse_loss(net(inputs(x_t, obs, time_embedding(t))), eps)


LOSSES = {"drifting": drifting_loss, "regression": regression_loss, "diffusion": diffusion_loss}


@torch.no_grad()
def act(kind, net, obs, generator=None):
    """Observations (N, O) -> action chunks (N, HORIZON, 2) in world units, and the network
    evaluations it took: drifting 1 (noise in, chunk out), regression 1, diffusion 100 (DDPM
    ancestral sampling, the predicted clean chunk clipped to [-1, 1] as Diffusion Policy's
    scheduler does)."""
    N = len(obs)
    if kind == "regression":
        x = net(inputs(torch.zeros(N, A), obs))
    elif kind == "drifting":
        x = net(inputs(torch.randn(N, A, generator=generator), obs))
    else:
        beta, abar = cosine_schedule()
        x = torch.randn(N, A, generator=generator)
        for t in reversed(range(DIFFUSION_STEPS)):
            eps = net(inputs(x, obs, time_embedding(torch.full((N,), t))))
            x0 = ((x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()).clamp(-1, 1)
            prev = abar[t - 1] if t > 0 else torch.tensor(1.0)
            mean = (prev.sqrt() * beta[t] * x0 + (1 - beta[t]).sqrt() * (1 - prev) * x) / (
                1 - abar[t])
            var = beta[t] * (1 - prev) / (1 - abar[t])
            x = mean + (var.sqrt() * torch.randn(N, A, generator=generator) if t > 0 else 0)
    return x.view(N, HORIZON, 2) * SPEED


# ------------------------------------------------------------------------------------------
# Training and rollouts
# ------------------------------------------------------------------------------------------
def train(kind, obs, chunks, steps=2000, batch=256, lr=1e-3, seed=0, gen_per_obs=16,
          progress=None):
    """One policy on the (observations, chunks) pairs: Adam, `batch` pairs per step (the
    drifting policy: gen_per_obs chunks generated for each). -> the network, in eval mode."""
    net, g = network(seed), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    extra = dict(gen_per_obs=gen_per_obs) if kind == "drifting" else {}
    for _ in range(steps):
        idx = torch.randint(0, len(obs), (batch,), generator=g)
        loss = LOSSES[kind](net, obs[idx], chunks[idx], generator=g, **extra)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress.update(1)
    return net.eval()


@torch.no_grad()
def rollouts(kind, net, n=200, seed=0):
    """n episodes at once from jittered starts: every ACT_STEPS steps the policy predicts a
    chunk from the last OBS_STEPS positions and its first ACT_STEPS actions run (receding
    horizon, as Diffusion Policy). An episode ends in the obstacle (a failure) or at the goal
    (a success); MAX_STEPS is the time limit. -> (success (n,) bool, paths (n, T+1, 2))."""
    g = torch.Generator().manual_seed(10_000 + seed)
    pos = torch.tensor(START) + (torch.rand(n, 2, generator=g) - 0.5) * JITTER
    prev, paths = pos.clone(), [pos]
    alive, success = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    for t in range(0, MAX_STEPS, ACT_STEPS):
        chunk = act(kind, net, torch.cat([prev, pos], 1), g)          # (n, HORIZON, 2)
        for k in range(ACT_STEPS):
            prev, new = pos, step_env(pos, chunk[:, k])
            pos = torch.where(alive[:, None], new, pos)              # ended episodes stay
            collided, reached = status(pos)
            success |= alive & reached
            alive &= ~collided & ~reached
            paths.append(pos)
    return success, torch.stack(paths, 1)


def ms_per_chunk(kind, net, calls=20):
    """CPU milliseconds for one observation's chunk (batch 1), the median of `calls`."""
    obs, times = torch.zeros(1, O), []
    for _ in range(calls + 2):
        t0 = time.perf_counter()
        act(kind, net, obs)
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times[2:])[calls // 2]


def figure(path, demos, paths):
    """Rollouts of each policy beside the demonstrations: {name: (paths (n, T, 2), success
    (n,))} -> one PNG, a panel each; green: reached the goal, red: did not."""
    import matplotlib
    matplotlib.use("Agg")                                            # files only, no window
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 1 + len(paths), figsize=(3 * (1 + len(paths)), 3.4))
    panels = [("expert demonstrations", [p for p, _ in demos], [True] * len(demos))]
    panels += [(name, list(p), list(ok)) for name, (p, ok) in paths.items()]
    for ax, (name, ps, oks) in zip(axes, panels):
        ax.add_patch(plt.Circle(CENTER, RADIUS, color="0.6"))
        for p, ok in zip(ps, oks):
            ax.plot(p[:, 0], p[:, 1], color="tab:green" if ok else "tab:red", lw=0.6, alpha=0.5)
        ax.plot(*GOAL, "k*", ms=10)
        ax.set(xlim=(-1, 1), ylim=(-1.2, 1.2), aspect="equal", xticks=[], yticks=[],
               title=f"{name}\n{sum(map(bool, oks)) / len(oks):.0%} reached")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# The benchmark's data and environment, for users who have them (requirements-policy.txt)
# ------------------------------------------------------------------------------------------
def read_replay(path, obs_key="data/obs", action_key="data/action"):
    """A Diffusion Policy replay buffer (a zarr folder: data/obs (N, D_o), data/action (N,
    D_a), meta/episode_ends (E,) cumulative) -> [(observations (T, D_o), actions (T, D_a))]
    per episode, float32. PushT's files keep data/state and data/keypoint instead of data/obs:
    pass obs_key. Errors name the file and the key."""
    import zarr                                                     # requirements-policy.txt
    try:
        root = zarr.open_group(path, mode="r")
        obs, action, ends = (np.asarray(root[k]) for k in (obs_key, action_key,
                                                            "meta/episode_ends"))
    except (KeyError, FileNotFoundError, ValueError) as e:
        raise ValueError(f"{path}: not a Diffusion Policy replay buffer with {obs_key}, "
                         f"{action_key} and meta/episode_ends ({e})") from e
    if len(obs) != len(action) or not (np.diff(ends, prepend=0) > 0).all() or (
            len(ends) and ends[-1] != len(action)):
        raise ValueError(f"{path}: {len(obs)} observations, {len(action)} actions and episode "
                         f"ends {ends[:3]}...{ends[-1:]}: they do not describe the same steps")
    starts = np.concatenate([[0], ends[:-1]]).astype(int)
    return [(torch.from_numpy(obs[s:e]).float(), torch.from_numpy(action[s:e]).float())
            for s, e in zip(starts, ends)]


def pusht_rollouts(policy, n=50, seed=0, max_steps=300, obs_steps=2, act_steps=8):
    """PushT (gym-pusht's gym_pusht/PushT-v0, state observations) under `policy`: a function
    of the last obs_steps observations (1, obs_steps * 5) -> actions (k >= act_steps, 2), the
    first act_steps run. Scored as Diffusion Policy scores PushT: per episode the maximum over
    its steps of min(coverage / 0.95, 1) -> (scores (n,), their mean)."""
    import gymnasium as gym
    import gym_pusht  # noqa: F401 (registers gym_pusht/PushT-v0)
    env, scores = gym.make("gym_pusht/PushT-v0", obs_type="state"), []
    for episode in range(n):
        obs, _ = env.reset(seed=seed * 100_000 + episode)
        past, best, t = [obs] * obs_steps, 0.0, 0
        while t < max_steps:
            window = torch.from_numpy(np.concatenate(past[-obs_steps:])).float()[None]
            for a in policy(window)[:act_steps]:
                obs, _, terminated, truncated, info = env.step(np.asarray(a, np.float32))
                past, t = past + [obs], t + 1
                best = max(best, min(info["coverage"] / 0.95, 1.0))
                if terminated or truncated or t >= max_steps:
                    t = max_steps if terminated or truncated else t
                    break
        scores.append(best)
    env.close()
    return np.array(scores), float(np.mean(scores))


# ------------------------------------------------------------------------------------------
# The lesson: three policies, the same demonstrations and network
# ------------------------------------------------------------------------------------------
EVALUATIONS = {"drifting": 1, "regression": 1, "diffusion": DIFFUSION_STEPS}


def lesson(seeds=(0, 1, 2), n_rollouts=200, steps=2000, n_demos=100, figure_path=None):
    """Per seed: demonstrations of the expert, each policy trained on them, n_rollouts
    episodes. -> markdown lines: success rate (mean and each seed), network evaluations and
    CPU milliseconds per chunk; and the figure of the first seed's rollouts."""
    from tqdm import tqdm
    success, ms, shown = {k: [] for k in LOSSES}, {}, {}
    bar = tqdm(total=len(seeds) * len(LOSSES) * steps, desc="policy", mininterval=1.0)
    for seed in seeds:
        demos = expert(n_demos, torch.Generator().manual_seed(seed))
        obs, chunks = windows([(path[:-1], acts) for path, acts in demos])
        chunks = chunks / SPEED                                      # in [-1, 1]
        for kind in LOSSES:
            net = train(kind, obs, chunks, steps, seed=seed, progress=bar)
            ok, paths = rollouts(kind, net, n_rollouts, seed)
            success[kind].append(ok.float().mean().item())
            if seed == seeds[0]:
                ms[kind], shown[kind] = ms_per_chunk(kind, net), (paths[:60], ok[:60])
    bar.close()
    if figure_path:                 # the first seed's first 60 demonstrations, as drawn
        figure(figure_path, expert(min(60, n_demos), torch.Generator().manual_seed(seeds[0])),
               shown)
    lines = ["| policy | network evaluations per chunk | success (mean over seeds) | per seed "
             "| CPU ms per chunk |", "|---|---|---|---|---|"]
    for kind in LOSSES:
        s = success[kind]
        lines.append(f"| {kind} | {EVALUATIONS[kind]} | {np.mean(s):.2f} | "
                     f"{' '.join(f'{x:.2f}' for x in s)} | {ms[kind]:.2f} |")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rollouts", type=int, default=200, help="episodes per policy and seed")
    p.add_argument("--steps", type=int, default=2000, help="training steps per policy")
    p.add_argument("--demos", type=int, default=100, help="expert demonstrations per seed")
    p.add_argument("--figure", default="docs/policy.png", help="the rollouts' figure (PNG)")
    args = p.parse_args(argv)
    for k in ("rollouts", "steps", "demos"):
        if getattr(args, k) < 1:
            p.error(f"--{k} {getattr(args, k)}: must be >= 1")
    if not args.figure.endswith(".png"):
        p.error(f"--figure {args.figure}: a .png path")
    return args


if __name__ == "__main__":
    args = parse_args()
    t0 = time.time()
    lines = lesson(args.seeds, args.rollouts, args.steps, args.demos, args.figure)
    print("\n".join(lines))
    print(f"({time.time() - t0:.0f} s; figure: {args.figure})")
