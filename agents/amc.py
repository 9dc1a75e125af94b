"""AMC-style single-agent pruning search (He et al. 2018) with Tianshou 2.0's DDPG.

One agent walks the layers one per step on a Gymnasium SEQUENTIAL env handed in by the
caller (``env_api = "sequential"``): per-layer state vector in, ``Box(low, high, (1,))``
action (a ratio) out, one terminal reward. For the pruning env that is
``pruning_env.SequentialPruningEnv(parallel_env)``::

    seq_env = pruning_env.SequentialPruningEnv(pruning_env.make("pruning_env/Tiny-v1"))
    algo = make_algorithm("amc", seq_env, seed=0, **AMCAgent.budget_overrides(plans=400, episode_length=4))

As in AMC (``amc_search.py`` / ``lib/agent.py``):

* warm-up episodes of uniformly random actions fill the replay buffer, no learning;
* afterwards actions are the actor's output plus truncated-normal noise (truncated to
  the action bounds) whose sigma decays by ``noise_decay`` per episode;
* every transition of an episode is stored with the same reward, the episode's return
  (AMC's terminal reward: views whose intermediate rewards are 0 give exactly that,
  and for per-step objective differences the sum is the final objective's gain); when
  learning, a moving-average baseline of the sampled rewards is subtracted from the
  TD targets (AMC: ``b += 0.5 * (mean(batch rewards) - b)``, then ``r - b``);
* ``updates_per_step`` DDPG updates per env step of the episode, after it ends;
* ``gamma = 1`` and soft target updates with ``tau = 0.01``.

Tianshou does the learning: :class:`tianshou.algorithm.DDPG` (subclassed only to
subtract the baseline from its targets) with its ``ContinuousDeterministicPolicy``,
actor/critic networks and ``ReplayBuffer``; only the episode loop is ours (Tianshou's
collector/trainer drive fixed step budgets, not one episode per call).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch

from agents.base import Algorithm, EpisodeLog, check_budget, config_field, seeded_torch
from agents.registry import register

if TYPE_CHECKING:
    from tianshou.data import ReplayBuffer

__all__ = ["AMCAgent", "AMCConfig", "truncated_normal"]


@dataclass
class AMCConfig:
    """Hyper-parameters of the AMC-style DDPG agent (AMC's values unless noted)."""

    actor_hidden: tuple[int, ...] = config_field((300, 300), min=1)
    """Hidden layer widths of the actor MLP."""
    critic_hidden: tuple[int, ...] = config_field((300, 300), min=1)
    """Hidden layer widths of the critic MLP (input: state and action concatenated)."""
    actor_lr: float = config_field(1e-4, min=0, min_exclusive=True)
    """Adam learning rate of the actor."""
    critic_lr: float = config_field(1e-3, min=0, min_exclusive=True)
    """Adam learning rate of the critic."""
    tau: float = config_field(0.01, min=0, max=1, min_exclusive=True)
    """Soft target-update rate of actor and critic."""
    gamma: float = config_field(1.0, min=0, max=1)
    """Discount factor (AMC uses 1: the terminal reward matters equally for every layer)."""
    batch_size: int = config_field(64, min=1)
    """Transitions per DDPG update."""
    buffer_size: int = config_field(2000, min=1)
    """Replay capacity in transitions (AMC: 100 per layer)."""
    warmup_episodes: int = config_field(20, min=0)
    """Episodes of uniformly random actions before learning (short runs; AMC: 100 of 800)."""
    updates_per_step: int = config_field(1, min=0)
    """DDPG updates per env step of each post-warm-up episode."""
    noise_sigma: float = config_field(0.5, min=0)
    """Initial sigma of the truncated-normal exploration noise (in action units)."""
    noise_decay: float = config_field(0.95, min=0, max=1)
    """Per-episode decay factor of the noise sigma after warm-up."""
    baseline_alpha: float = config_field(0.5, min=0, max=1)
    """Step size of the moving-average reward baseline: b += alpha * (mean sampled reward - b)."""


def truncated_normal(
    rng: np.random.Generator, mean: np.ndarray, sigma: float, low: np.ndarray, high: np.ndarray
) -> np.ndarray:
    """Sample N(mean, sigma^2) truncated to [low, high], elementwise (rejection, clip after 100 tries)."""
    mean = np.asarray(mean, dtype=np.float64)
    out = np.empty_like(mean)
    for i in np.ndindex(mean.shape):
        for _ in range(100):
            x = rng.normal(mean[i], sigma)
            if low[i] <= x <= high[i]:
                break
        out[i] = np.clip(x, low[i], high[i])
    return out


@functools.cache
def _baseline_ddpg_class() -> type:
    """Tianshou's DDPG with AMC's moving-average reward baseline (built lazily: Tianshou is slow to import)."""
    from tianshou.algorithm import DDPG

    class BaselineDDPG(DDPG):
        """DDPG whose TD targets use ``reward - b``; ``b`` is a moving average of sampled rewards."""

        def __init__(self, *, baseline_alpha: float, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.baseline_alpha = baseline_alpha
            self.reward_baseline: float | None = None

        def _preprocess_batch(self, batch: Any, buffer: Any, indices: np.ndarray) -> Any:
            batch = super()._preprocess_batch(batch, buffer, indices)  # returns = r + gamma (1 - d) Q'
            batch_mean = float(np.mean(batch.rew))
            if self.reward_baseline is None:
                self.reward_baseline = batch_mean
            else:
                self.reward_baseline += self.baseline_alpha * (batch_mean - self.reward_baseline)
            batch.returns = batch.returns - self.reward_baseline
            return batch

    return BaselineDDPG


_BUFFER_KEYS = ("obs", "act", "rew", "terminated", "truncated", "done", "obs_next")


def _buffer_state(buf: ReplayBuffer) -> dict[str, Any]:
    """Tianshou ReplayBuffer -> tensors and plain values (exact: data, ring position, sampler RNG)."""
    name, keys, pos, has_gauss, cached = buf._random_state.get_state()
    return {
        "data": {k: torch.from_numpy(np.array(buf._meta[k])) for k in _BUFFER_KEYS} if len(buf) else {},
        "insertion_idx": int(buf._insertion_idx),
        "size": int(buf._size),
        "last_index": int(buf.last_index[0]),
        "ep_return": float(buf._ep_return),
        "ep_len": int(buf._ep_len),
        "ep_start_idx": int(buf._ep_start_idx),
        "random_state": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }


def _load_buffer_state(buf: ReplayBuffer, d: dict[str, Any]) -> None:
    from tianshou.data import Batch

    buf.reset()
    data = {k: v.numpy() for k, v in d["data"].items()}
    if data:
        # One throw-away add lets Tianshou allocate its storage exactly as in the original.
        buf.add(Batch(**{k: data[k][0] for k in _BUFFER_KEYS if k != "done"}, info={}))
        for k in _BUFFER_KEYS:
            buf._meta[k][:] = data[k]
    buf._insertion_idx = d["insertion_idx"]
    buf._size = d["size"]
    buf.last_index[0] = d["last_index"]
    buf._ep_return = d["ep_return"]
    buf._ep_len = d["ep_len"]
    buf._ep_start_idx = d["ep_start_idx"]
    name, keys, pos, has_gauss, cached = d["random_state"]
    buf._random_state.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


@register("amc")
class AMCAgent(Algorithm):
    """AMC: DDPG over the layers of the network, one layer per step (single agent).

    ``env`` is a Gymnasium env that decides one layer per step, with a flat ``Box``
    observation and a ``Box`` action of shape (1,), e.g.
    ``pruning_env.SequentialPruningEnv(parallel_env)``; a PettingZoo ParallelEnv is
    refused with a hint to wrap it. ``EpisodeLog.actions[t]`` is
    ``{possible_agents[t % L]: a_t}`` when the env has a ``possible_agents`` attribute
    (the L layer names, which a view walks in that order, once per parallel step), else
    ``{"step_<t>": a_t}``.
    """

    config_cls = AMCConfig
    env_api = "sequential"

    def __init__(
        self,
        env: gym.Env,
        config: AMCConfig | None = None,
        *,
        seed: int,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(env, config, seed=seed, device=device)  # checks that env is a sequential Gymnasium env
        from tianshou.algorithm.modelfree.ddpg import ContinuousDeterministicPolicy
        from tianshou.algorithm.optim import AdamOptimizerFactory
        from tianshou.data import ReplayBuffer
        from tianshou.utils.net.common import Net
        from tianshou.utils.net.continuous import ContinuousActorDeterministic, ContinuousCritic

        cfg: AMCConfig = self.config
        obs_space, act_space = env.observation_space, env.action_space
        if not (isinstance(act_space, gym.spaces.Box) and act_space.shape == (1,)):
            raise ValueError(f"AMC needs a Box action space of shape (1,), got {act_space}")
        if not isinstance(obs_space, gym.spaces.Box):
            raise ValueError(f"AMC needs a Box observation space, got {obs_space}")
        self.low = act_space.low.astype(np.float64)
        self.high = act_space.high.astype(np.float64)
        self.step_names: list[str] = list(getattr(env, "possible_agents", None) or [])
        obs_shape, act_shape = obs_space.shape, act_space.shape

        with seeded_torch(self.seed):
            actor = ContinuousActorDeterministic(
                preprocess_net=Net(state_shape=obs_shape, hidden_sizes=cfg.actor_hidden),
                action_shape=act_shape,
                max_action=1.0,
            )
            critic = ContinuousCritic(
                preprocess_net=Net(
                    state_shape=obs_shape, action_shape=act_shape, hidden_sizes=cfg.critic_hidden, concat=True
                )
            )
        self.policy = ContinuousDeterministicPolicy(
            actor=actor.to(self.device),
            exploration_noise=None,  # ours: truncated normal from self.rngs
            action_space=act_space,
            observation_space=obs_space,
        )
        self.ddpg = _baseline_ddpg_class()(
            baseline_alpha=cfg.baseline_alpha,
            policy=self.policy,
            policy_optim=AdamOptimizerFactory(lr=cfg.actor_lr),
            critic=critic.to(self.device),
            critic_optim=AdamOptimizerFactory(lr=cfg.critic_lr),
            tau=cfg.tau,
            gamma=cfg.gamma,
        )
        self.buffer = ReplayBuffer(cfg.buffer_size, random_seed=int(self.rngs.np.integers(2**31)))

    @classmethod
    def budget_overrides(cls, plans: int, episode_length: int) -> dict[str, Any]:
        """Warm up for 1/8 of the expected episodes: ``warmup_episodes = max(1, round(plans / episode_length / 8))``.

        One AMC episode decides every layer once, which is one episode of the parallel
        env (``episode_length`` steps, at most one new plan each), so the budget holds
        about ``plans / episode_length`` AMC episodes (the AMC paper warms up for 100 of 800).
        """
        check_budget(plans, episode_length)
        return {"warmup_episodes": max(1, round(plans / episode_length / 8))}

    # ------------------------------------------------------------------ acting
    def noise_sigma(self) -> float:
        """Exploration sigma for the next training episode (0 during warm-up: actions are uniform)."""
        cfg = self.config
        if self.episodes_done < cfg.warmup_episodes:
            return 0.0
        return cfg.noise_sigma * cfg.noise_decay ** (self.episodes_done - cfg.warmup_episodes)

    def _actor_action(self, obs: np.ndarray) -> np.ndarray:
        """Deterministic action in env units, shape (1,)."""
        from tianshou.data import Batch

        with torch.no_grad():
            raw = self.policy(Batch(obs=np.asarray(obs, dtype=np.float32)[None], info={})).act
        return self.policy.map_action(raw.cpu().numpy())[0].astype(np.float64)

    def _run(self, mode: str) -> tuple[EpisodeLog, list[tuple]]:
        """One episode on the sequential env; mode is "warmup", "explore" or "greedy"."""
        rng, sigma = self.rngs.np, self.noise_sigma()
        obs, info = self.reset_env()
        steps: list[tuple] = []
        actions: list[dict[str, float]] = []
        ret = 0.0
        while True:
            if mode == "warmup":
                act = rng.uniform(self.low, self.high)
            elif mode == "explore":
                act = truncated_normal(rng, self._actor_action(obs), sigma, self.low, self.high)
            else:
                act = self._actor_action(obs)
            act = act.astype(np.float32)
            next_obs, reward, terminated, truncated, info = self.env.step(act)
            t = len(steps)
            name = self.step_names[t % len(self.step_names)] if self.step_names else f"step_{t}"
            actions.append({name: float(act[0])})
            steps.append((obs, act, float(reward), bool(terminated), bool(truncated), next_obs))
            ret += float(reward)
            obs = next_obs
            if terminated or truncated:
                break
        log = EpisodeLog(episode_return=ret, length=len(steps), actions=actions, final_info=dict(info))
        return log, steps

    # ------------------------------------------------------------------ interface
    def _train_episode(self) -> EpisodeLog:
        from tianshou.data import Batch
        from tianshou.utils.torch_utils import policy_within_training_step

        cfg = self.config
        warmup = self.episodes_done < cfg.warmup_episodes
        sigma = self.noise_sigma()
        log, steps = self._run("warmup" if warmup else "explore")

        episode_reward = log.episode_return
        for obs, act, _, terminated, truncated, next_obs in steps:
            self.buffer.add(
                Batch(
                    obs=np.asarray(obs, dtype=np.float32),
                    act=self.policy.map_action_inverse(act).astype(np.float32),
                    rew=episode_reward,
                    terminated=terminated,
                    truncated=truncated,
                    obs_next=np.asarray(next_obs, dtype=np.float32),
                    info={},
                )
            )

        losses: list[tuple[float, float]] = []
        if not warmup and len(self.buffer) >= cfg.batch_size:
            with policy_within_training_step(self.policy):
                for _ in range(cfg.updates_per_step * log.length):
                    stats = self.ddpg.update(buffer=self.buffer, sample_size=cfg.batch_size)
                    losses.append((stats.actor_loss, stats.critic_loss))
        # Diagnostics (go to train/); only the losses end in "loss" (go to losses/).
        log.metrics.update(warmup=float(warmup), noise_sigma=sigma)
        if self.ddpg.reward_baseline is not None:
            log.metrics["reward_baseline"] = float(self.ddpg.reward_baseline)
        if losses:
            log.metrics["actor_loss"] = float(np.mean([a for a, _ in losses]))
            log.metrics["critic_loss"] = float(np.mean([c for _, c in losses]))
        return log

    def evaluate(self) -> EpisodeLog:
        return self._run("greedy")[0]

    def state_dict(self) -> dict[str, Any]:
        d = super().state_dict()
        d.update(
            ddpg=self.ddpg.state_dict(),
            buffer=_buffer_state(self.buffer),
            reward_baseline=self.ddpg.reward_baseline,
        )
        return copy.deepcopy(d)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        d = copy.deepcopy(d)
        super().load_state_dict(d)
        self.ddpg.load_state_dict(d["ddpg"])
        _load_buffer_state(self.buffer, d["buffer"])
        self.ddpg.reward_baseline = None if d["reward_baseline"] is None else float(d["reward_baseline"])
