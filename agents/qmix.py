"""QMIX, VDN and IQL: one value-decomposition learner with a pluggable mixer.

Reference: Rashid et al. 2018 (QMIX), Sunehag et al. 2018 (VDN); settings follow pymarl
/ pymarl2 (the QMIX paper and its reference code, pymarl) except the defaults marked "short runs", which are
sized for pruning episodes of 1-5 steps and tens to hundreds of training episodes.

Pieces, top to bottom:

* :class:`QMIXConfig` - every hyper-parameter, one docstring each.
* :class:`AgentNetwork` - the Q network shared by all agents; its input is the agent's
  observation with a one-hot agent id appended. MLP by default, GRU optional.
* Mixers - ``Q_tot = mixer(Q_1..Q_n, s)``. Registered by name with
  :func:`register_mixer`: ``"qmix"`` (monotonic hypernetwork mixer), ``"vdn"`` (sum),
  ``"none"`` (identity: IQL, every agent does its own TD on the team reward).
* :class:`~agents.replay.EpisodeReplayBuffer` - whole episodes, padded and masked when batched.
* :class:`QMIX` - the learner (registered as ``"qmix"``); :class:`VDN` (``"vdn"``) and
  :class:`IQL` (``"iql"``) are the same learner with another default mixer.

A new mixer is one file::

    import torch
    from agents.qmix import Mixer, register_mixer

    @register_mixer("max")
    class MaxMixer(Mixer):
        out_dim = 1
        def forward(self, agent_qs, states):        # (B, T, n), (B, T, S) -> (B, T, 1)
            return agent_qs.max(dim=-1, keepdim=True).values

    algo = make_algorithm("qmix", env, seed=0, mixer="max")
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from pettingzoo import ParallelEnv
from torch import nn

from agents.base import Algorithm, EpisodeLog, check_budget, config_field, seeded_torch, split_observation
from agents.registry import register
from agents.replay import EpisodeReplayBuffer, lambda_returns

__all__ = [
    "IQL",
    "QMIX",
    "VDN",
    "AgentNetwork",
    "EpisodeReplayBuffer",
    "IndependentMixer",
    "Mixer",
    "QMIXConfig",
    "QMixer",
    "VDNMixer",
    "explore_action",
    "lambda_returns",
    "list_mixers",
    "register_mixer",
]


_Policy = Callable[[dict[str, Any], dict[str, dict]], dict[str, int]]  # (obs, infos) -> actions


@dataclass
class QMIXConfig:
    """Hyper-parameters of the QMIX/VDN/IQL learner."""

    mixer: str = config_field("qmix", choices=lambda: list_mixers())
    """Registered mixer: "qmix" (monotonic hypernetwork mixer), "vdn" (sum) or "none" (IQL)."""
    mixer_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the mixer's constructor (for plug-in mixers)."""
    agent_net: Literal["mlp", "gru"] = config_field("mlp", choices=["mlp", "gru"])
    """Shared agent network: "mlp" (3 layers) or "gru" (Linear-ReLU-GRUCell-Linear, recurrent over the episode)."""
    hidden_dim: int = config_field(64, min=1)
    """Hidden width of the agent network."""
    agent_id: bool = True
    """Append a one-hot agent id to each agent's observation (parameter sharing needs it)."""
    mixing_embed_dim: int = config_field(32, min=1)
    """Width of the QMIX mixing layer (w1 is n_agents x mixing_embed_dim)."""
    hypernet_hidden_dim: int = config_field(64, min=1)
    """Hidden width of the 2-layer hypernetworks producing w1 and w2."""
    buffer_size: int = config_field(5000, min=1)
    """Replay capacity in EPISODES (oldest are overwritten)."""
    batch_size: int = config_field(32, min=1)
    """Episodes per gradient update (fewer while the buffer holds fewer)."""
    learning_starts: int = config_field(8, min=0)
    """Episodes in the buffer before learning starts (short runs; pymarl: batch_size)."""
    updates_per_episode: int = config_field(4, min=0)
    """Gradient updates after each training episode (short runs; pymarl: 1)."""
    gamma: float = config_field(0.99, min=0, max=1)
    """Discount factor."""
    td_lambda: float = config_field(0.0, min=0, max=1)
    """TD(lambda) targets when > 0 (pymarl2: 0.6); 0 gives one-step double-Q targets."""
    double_q: bool = True
    """Double-Q targets: argmax by the online net, value by the target net."""
    optimizer: Literal["adam", "rmsprop"] = config_field("adam", choices=["adam", "rmsprop"])
    """Optimiser: "adam" (pymarl2) or "rmsprop" (pymarl, alpha 0.99)."""
    lr: float = config_field(1e-3, min=0, min_exclusive=True)
    """Learning rate (pymarl2 Adam 1e-3; pymarl RMSprop 5e-4)."""
    optim_eps: float = config_field(1e-5, min=0)
    """Epsilon of the optimiser's denominator."""
    grad_clip: float = config_field(10.0, min=0, min_exclusive=True)
    """Max global gradient norm."""
    target_update_interval: int = config_field(20, min=1)
    """Hard target-network copy every this many training episodes (short runs; pymarl: 200)."""
    target_tau: float = config_field(0.0, min=0, max=1)
    """If > 0, soft (Polyak) target updates with this rate after every gradient step instead of hard copies."""
    eps_start: float = config_field(1.0, min=0, max=1)
    """Initial epsilon of epsilon-greedy exploration."""
    eps_end: float = config_field(0.05, min=0, max=1)
    """Final epsilon."""
    eps_anneal_steps: int = config_field(500, min=0)
    """Env steps over which epsilon decays linearly (short runs; pymarl: 50k)."""
    explore_radius: int = config_field(0, min=0)
    """Exploring agents pick uniformly among available actions (0, pymarl) or among those within this many
    indices of their greedy action (> 0: local exploration around the current allocation, for ordered action
    spaces such as a grid of pruning rates). Uniform stays the default: the comparison of radii is in the
    README's "Results" and ``benchmarks/results/exploration-0.5.md`` / ``exploration-0.3.md``."""
    episodes_per_snapshot: int = config_field(1, min=1)
    """Training episodes played with one policy snapshot before learning from them (pymarl's parallel runner). With
    > 1 each episode explores with its own random stream (seed, episode) at the snapshot's epsilon, so its policy is
    fixed in advance and parallel workers can measure the snapshot's episodes together (``upcoming_policies``); the
    updates of the snapshot (``updates_per_episode`` each) run after its last episode. 1: learn after every episode."""


def explore_action(rng: np.random.Generator, greedy: int, avail: np.ndarray, radius: int) -> int:
    """An exploring agent's action: uniform over the available ones (``radius`` 0) or over the available ones
    within ``radius`` indices of ``greedy`` (the greedy one included only when it is the only one)."""
    allowed = np.flatnonzero(avail)
    if radius > 0:
        near = allowed[(np.abs(allowed - greedy) <= radius) & (allowed != greedy)]
        if near.size:
            allowed = near
        elif avail[greedy]:
            return greedy
    return int(rng.choice(allowed))


# ---------------------------------------------------------------------- networks
class AgentNetwork(nn.Module):
    """Per-agent Q network, parameters shared across agents.

    ``forward(inputs (N, in_dim), hidden (N, H)) -> (q (N, n_actions), hidden (N, H))``
    with N = batch x agents. The MLP ignores and returns ``hidden`` unchanged.
    """

    def __init__(self, in_dim: int, n_actions: int, hidden_dim: int, kind: Literal["mlp", "gru"]) -> None:
        super().__init__()
        if kind not in ("mlp", "gru"):
            raise ValueError(f"agent_net must be 'mlp' or 'gru', got {kind!r}")
        self.kind = kind
        self.hidden_dim = hidden_dim
        self.fc_in = nn.Linear(in_dim, hidden_dim)
        self.core: nn.Module = (
            nn.GRUCell(hidden_dim, hidden_dim) if kind == "gru" else nn.Linear(hidden_dim, hidden_dim)
        )
        self.fc_out = nn.Linear(hidden_dim, n_actions)

    def init_hidden(self, n: int, device: torch.device) -> torch.Tensor:
        """Zero recurrent state, shape (n, hidden_dim)."""
        return torch.zeros(n, self.hidden_dim, device=device)

    def forward(self, inputs: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.fc_in(inputs))
        if self.kind == "gru":
            hidden = self.core(x, hidden)
            x = hidden
        else:
            x = F.relu(self.core(x))
        return self.fc_out(x), hidden


# ---------------------------------------------------------------------- mixers
class Mixer(nn.Module):
    """Base class of mixers: ``forward(agent_qs (B, T, n_agents), states (B, T, state_dim)) -> (B, T, out_dim)``.

    ``out_dim`` is 1 for a joint value Q_tot; a mixer returning ``n_agents`` values
    (like ``"none"``) gives independent per-agent TD errors against the team reward.
    Constructor: ``(n_agents, state_dim, config: QMIXConfig, **config.mixer_kwargs)``.
    """

    out_dim: ClassVar[int | None] = 1
    """Output width; None means n_agents."""

    def __init__(self, n_agents: int, state_dim: int, config: QMIXConfig, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"{type(self).__name__} takes no mixer_kwargs, got {sorted(kwargs)}")
        self.n_agents = n_agents
        self.state_dim = state_dim

    def forward(self, agent_qs: torch.Tensor, states: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


_MIXERS: dict[str, type[Mixer]] = {}
M = TypeVar("M", bound=type[Mixer])


def register_mixer(name: str) -> Callable[[M], M]:
    """Class decorator: make a :class:`Mixer` subclass selectable as ``QMIXConfig.mixer = name``."""

    def decorator(cls: M) -> M:
        if name in _MIXERS and _MIXERS[name] is not cls:
            raise ValueError(f"mixer name {name!r} is already registered by {_MIXERS[name]!r}")
        _MIXERS[name] = cls
        return cls

    return decorator


def list_mixers() -> list[str]:
    """Registered mixer names, sorted."""
    return sorted(_MIXERS)


def _get_mixer(name: str) -> type[Mixer]:
    try:
        return _MIXERS[name]
    except KeyError:
        raise ValueError(f"unknown mixer {name!r}; known: {', '.join(list_mixers())}") from None


@register_mixer("qmix")
class QMixer(Mixer):
    """Monotonic mixing network whose weights come from hypernetworks on the state.

    ``w1 = |Hyper_w1(s)|`` (n x E), ``b1 = Hyper_b1(s)`` (E), ``h = ELU(Q . w1 + b1)``,
    ``w2 = |Hyper_w2(s)|`` (E x 1), ``V(s)`` = Linear-ReLU-Linear,
    ``Q_tot = h . w2 + V(s)``. Non-negative weights and monotone ELU make
    ``dQ_tot/dQ_i >= 0``, so per-agent argmaxes give the joint argmax.
    """

    def __init__(self, n_agents: int, state_dim: int, config: QMIXConfig, **kwargs: Any) -> None:
        super().__init__(n_agents, state_dim, config, **kwargs)
        embed, hyper = config.mixing_embed_dim, config.hypernet_hidden_dim
        self.embed_dim = embed
        self.hyper_w1 = nn.Sequential(nn.Linear(state_dim, hyper), nn.ReLU(), nn.Linear(hyper, n_agents * embed))
        self.hyper_b1 = nn.Linear(state_dim, embed)
        self.hyper_w2 = nn.Sequential(nn.Linear(state_dim, hyper), nn.ReLU(), nn.Linear(hyper, embed))
        self.v = nn.Sequential(nn.Linear(state_dim, embed), nn.ReLU(), nn.Linear(embed, 1))

    def forward(self, agent_qs: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        batch, time = agent_qs.shape[:2]
        s = states.reshape(-1, self.state_dim)                                   # (BT, S)
        qs = agent_qs.reshape(-1, 1, self.n_agents)                              # (BT, 1, n)
        w1 = self.hyper_w1(s).abs().view(-1, self.n_agents, self.embed_dim)      # (BT, n, E)
        b1 = self.hyper_b1(s).view(-1, 1, self.embed_dim)                        # (BT, 1, E)
        hidden = F.elu(torch.bmm(qs, w1) + b1)                                   # (BT, 1, E)
        w2 = self.hyper_w2(s).abs().view(-1, self.embed_dim, 1)                  # (BT, E, 1)
        v = self.v(s).view(-1, 1, 1)                                             # (BT, 1, 1)
        return (torch.bmm(hidden, w2) + v).view(batch, time, 1)


@register_mixer("vdn")
class VDNMixer(Mixer):
    """``Q_tot = sum_i Q_i`` (no parameters, ignores the state)."""

    def forward(self, agent_qs: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return agent_qs.sum(dim=-1, keepdim=True)


@register_mixer("none")
class IndependentMixer(Mixer):
    """Identity: every agent regresses its own Q on the team reward (IQL)."""

    out_dim = None

    def forward(self, agent_qs: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return agent_qs


# ---------------------------------------------------------------------- learner
@register("qmix")
class QMIX(Algorithm):
    """Value-decomposition MARL learner (QMIX by default; VDN/IQL through ``config.mixer``).

    Requirements on the env: identical ``Discrete(K)`` action spaces and identical
    flat ``Box`` observation spaces for all agents, all ``possible_agents`` acting at
    every step until the episode ends. The global state is ``env.state()``
    (``env.state_space``); an env without ``state_space`` gets the concatenated
    observations instead. Action masks are honoured when given as
    ``infos[agent]["action_mask"]`` or ``obs[agent]["action_mask"]``.
    """

    config_cls = QMIXConfig

    def __init__(
        self,
        env: ParallelEnv,
        config: QMIXConfig | None = None,
        *,
        seed: int,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(env, config, seed=seed, device=device)
        cfg: QMIXConfig = self.config
        self.agents: list[str] = list(env.possible_agents)
        self.n_agents = len(self.agents)
        act_spaces = [env.action_space(a) for a in self.agents]
        if not all(isinstance(s, spaces.Discrete) for s in act_spaces) or len({int(s.n) for s in act_spaces}) != 1:
            raise ValueError("QMIX needs identical Discrete action spaces for all agents")
        self.n_actions = int(act_spaces[0].n)
        obs_space = env.observation_space(self.agents[0])
        if isinstance(obs_space, spaces.Dict):
            obs_space = obs_space["observation"]
        self.obs_dim = int(np.prod(obs_space.shape))
        state_space = getattr(env, "state_space", None)
        self._concat_obs_state = state_space is None
        self.state_dim = self.obs_dim * self.n_agents if state_space is None else int(np.prod(state_space.shape))
        in_dim = self.obs_dim + (self.n_agents if cfg.agent_id else 0)

        with seeded_torch(self.seed):
            self.agent_net = AgentNetwork(in_dim, self.n_actions, cfg.hidden_dim, cfg.agent_net)
            self.mixer = _get_mixer(cfg.mixer)(self.n_agents, self.state_dim, cfg, **cfg.mixer_kwargs)
        self.agent_net.to(self.device)
        self.mixer.to(self.device)
        self.target_agent_net = copy.deepcopy(self.agent_net).requires_grad_(False)
        self.target_mixer = copy.deepcopy(self.mixer).requires_grad_(False)
        self.params = list(self.agent_net.parameters()) + list(self.mixer.parameters())
        if cfg.optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(self.params, lr=cfg.lr, eps=cfg.optim_eps)
        elif cfg.optimizer == "rmsprop":
            self.optimizer = torch.optim.RMSprop(self.params, lr=cfg.lr, alpha=0.99, eps=cfg.optim_eps)
        else:
            raise ValueError(f"optimizer must be 'adam' or 'rmsprop', got {cfg.optimizer!r}")
        if cfg.explore_radius < 0:
            raise ValueError(f"explore_radius must be >= 0 (0: uniform exploration), got {cfg.explore_radius}")
        self.buffer = EpisodeReplayBuffer(cfg.buffer_size)
        self.gradient_steps = 0
        self._agent_ids = torch.eye(self.n_agents, device=self.device)
        self._snapshot_eps = cfg.eps_start  # epsilon of the current policy snapshot (episodes_per_snapshot > 1)
        if cfg.episodes_per_snapshot < 1:
            raise ValueError(f"episodes_per_snapshot must be >= 1, got {cfg.episodes_per_snapshot}")

    @classmethod
    def check_config(cls, config: QMIXConfig) -> None:
        """The mixer must take ``mixer_kwargs``: built once on a one-agent problem (the global RNG untouched)."""
        mixer = _get_mixer(config.mixer)
        with seeded_torch(0):
            try:
                mixer(1, 1, config, **config.mixer_kwargs)
            except TypeError as exc:
                raise ValueError(f"mixer_kwargs {config.mixer_kwargs} do not fit the mixer {config.mixer!r}: {exc}") \
                    from None

    @classmethod
    def budget_overrides(cls, plans: int, episode_length: int) -> dict[str, Any]:
        """Anneal epsilon over half the budget: ``eps_anneal_steps = max(1, round(plans / 2))``.

        Epsilon decays per training env step and each step measures at most one new
        plan, so epsilon is at ``eps_end`` by the time half of the ``plans`` can have
        been measured, and the second half of the budget exploits (the same rule for
        QMIX, VDN and IQL).
        """
        check_budget(plans, episode_length)
        return {"eps_anneal_steps": max(1, round(0.5 * plans))}

    # ------------------------------------------------------------------ acting
    def epsilon(self, steps_ahead: int = 0) -> float:
        """The exploration rate ``steps_ahead`` training env steps after ``env_steps`` (linear in those steps;
        within an episode ``env_steps`` still counts the steps before it)."""
        cfg = self.config
        frac = min(1.0, (self.env_steps + steps_ahead) / max(1, cfg.eps_anneal_steps))
        return cfg.eps_start + frac * (cfg.eps_end - cfg.eps_start)

    def _agent_inputs(self, obs: torch.Tensor) -> torch.Tensor:
        """(..., n, obs_dim) -> (..., n, in_dim): append one-hot agent ids."""
        if not self.config.agent_id:
            return obs
        ids = self._agent_ids.expand(*obs.shape[:-2], self.n_agents, self.n_agents)
        return torch.cat([obs, ids], dim=-1)

    def _parse_step(self, obs: dict[str, Any], infos: dict[str, dict]) -> tuple[np.ndarray, np.ndarray]:
        """Observation dicts -> obs (n, obs_dim) float32, avail (n, n_actions) bool."""
        missing = [a for a in self.agents if a not in obs]
        if missing:
            raise RuntimeError(f"QMIX needs every agent at every step; missing {missing}")
        vecs, avail = [], np.ones((self.n_agents, self.n_actions), dtype=bool)
        for i, agent in enumerate(self.agents):
            vec, mask = split_observation(obs[agent], infos.get(agent))
            vecs.append(vec)
            if mask is not None:
                avail[i] = mask
        return np.stack(vecs), avail

    def _act(self, explore: bool, *, rng: np.random.Generator | None = None, eps: float | None = None,
             record: bool = True) -> _Policy:
        """A policy closure for :meth:`play_episode`; keeps the GRU state, the episode's step count (for
        :meth:`epsilon`) and (``record``) the Q stats. ``rng`` / ``eps``: an exploration stream and a fixed epsilon
        instead of ``rngs.np`` and :meth:`epsilon`."""
        hidden = self.agent_net.init_hidden(self.n_agents, self.device)
        taken = 0  # steps of this episode so far
        rng = self.rngs.np if rng is None else rng
        if record:
            self._step_q: list[float] = []

        def policy(obs: dict[str, Any], infos: dict[str, dict]) -> dict[str, int]:
            nonlocal hidden, taken
            obs_arr, avail = self._parse_step(obs, infos)
            with torch.no_grad():
                inputs = self._agent_inputs(torch.as_tensor(obs_arr, device=self.device))
                q, hidden = self.agent_net(inputs, hidden)                      # (n, A)
            q = q.cpu().numpy()
            q_masked = np.where(avail, q, -np.inf)
            actions = q_masked.argmax(axis=1)
            if explore:
                epsilon = self.epsilon(taken) if eps is None else eps
                for i in range(self.n_agents):
                    if rng.random() < epsilon:
                        actions[i] = explore_action(rng, int(actions[i]), avail[i], self.config.explore_radius)
                taken += 1
            if record:
                self._step_q.append(float(q[np.arange(self.n_agents), actions].mean()))
            return {agent: int(actions[i]) for i, agent in enumerate(self.agents)}

        return policy

    def _snapshot_policy(self, episode: int, record: bool) -> _Policy:
        """The exploring policy of training episode ``episode`` of the current snapshot (episodes_per_snapshot > 1)."""
        rng = np.random.default_rng([self.seed, episode])
        return self._act(True, rng=rng, eps=self._snapshot_eps, record=record)

    def upcoming_policies(self, episodes: int) -> list[Callable[[], _Policy]]:
        """Factories of the exact exploring policies of the next training episodes of the current snapshot (up to
        ``episodes``; none unless ``episodes_per_snapshot > 1``). They leave the learner untouched."""
        per = self.config.episodes_per_snapshot
        if per <= 1:
            return []
        start = self.episodes_done
        if start % per == 0:
            self._snapshot_eps = self.epsilon()  # the snapshot starts with the next episode
        end = min(start + episodes, (start // per + 1) * per)
        return [lambda i=i: self._snapshot_policy(i, record=False) for i in range(start, end)]

    def _run(self, explore: bool) -> tuple[EpisodeLog, dict[str, torch.Tensor]]:
        per = self.config.episodes_per_snapshot
        if explore and per > 1:
            if self.episodes_done % per == 0:
                self._snapshot_eps = self.epsilon()
            policy = self._snapshot_policy(self.episodes_done, record=True)
        else:
            policy = self._act(explore)
        log, trace = self.play_episode(policy, record_state=not self._concat_obs_state)
        parsed = [self._parse_step(o, i) if o else None for o, i in zip(trace.obs, trace.infos)]
        # The final obs dict may be empty in envs that drop finished agents: repeat the last one.
        for t in range(1, len(parsed)):
            if parsed[t] is None:
                parsed[t] = parsed[t - 1]
        obs = np.stack([p[0] for p in parsed])                                   # (T+1, n, d)
        avail = np.stack([p[1] for p in parsed])                                 # (T+1, n, A)
        if self._concat_obs_state:
            state = obs.reshape(obs.shape[0], -1)
        else:
            state = np.stack(trace.states)
        episode = {
            "obs": torch.as_tensor(obs, dtype=torch.float32),
            "state": torch.as_tensor(state, dtype=torch.float32),
            "avail": torch.as_tensor(avail, dtype=torch.bool),
            "actions": torch.as_tensor([[a[ag] for ag in self.agents] for a in trace.actions], dtype=torch.int64),
            "reward": torch.as_tensor(trace.team_rewards, dtype=torch.float32),
            "terminated": torch.as_tensor(trace.terminated, dtype=torch.float32),
        }
        log.metrics["q_mean"] = float(np.mean(self._step_q))
        return log, episode

    # ------------------------------------------------------------------ learning
    def _unroll(self, net: AgentNetwork, obs: torch.Tensor) -> torch.Tensor:
        """Q values for every agent, step and action: obs (B, T+1, n, d) -> (B, T+1, n, A)."""
        batch, steps = obs.shape[:2]
        inputs = self._agent_inputs(obs)
        if net.kind == "mlp":
            return net(inputs.reshape(batch * steps * self.n_agents, -1), torch.empty(0))[0].view(
                batch, steps, self.n_agents, self.n_actions
            )
        hidden = net.init_hidden(batch * self.n_agents, self.device)
        qs = []
        for t in range(steps):
            q, hidden = net(inputs[:, t].reshape(batch * self.n_agents, -1), hidden)
            qs.append(q.view(batch, self.n_agents, self.n_actions))
        return torch.stack(qs, dim=1)

    def _learn(self) -> dict[str, float]:
        cfg = self.config
        batch = {k: v.to(self.device) for k, v in self.buffer.sample(cfg.batch_size, self.rngs.np).items()}
        actions, mask, avail = batch["actions"], batch["mask"], batch["avail"]
        qs = self._unroll(self.agent_net, batch["obs"])                             # (B, T+1, n, A)
        chosen = qs[:, :-1].gather(-1, actions.unsqueeze(-1)).squeeze(-1)           # (B, T, n)
        with torch.no_grad():
            target_qs = self._unroll(self.target_agent_net, batch["obs"])[:, 1:]    # (B, T, n, A)
            picker = qs.detach()[:, 1:] if cfg.double_q else target_qs
            next_actions = picker.masked_fill(~avail[:, 1:], -torch.inf).argmax(-1, keepdim=True)
            target_next = target_qs.gather(-1, next_actions).squeeze(-1)            # (B, T, n)
            next_values = self.target_mixer(target_next, batch["state"][:, 1:])     # (B, T, k)
            targets = lambda_returns(
                batch["reward"], batch["terminated"], mask, next_values, cfg.gamma, cfg.td_lambda
            )
        q_tot = self.mixer(chosen, batch["state"][:, :-1])                           # (B, T, k)
        td = (q_tot - targets) * mask.unsqueeze(-1)
        loss = td.pow(2).sum() / (mask.sum() * q_tot.shape[-1])
        self.optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.gradient_steps += 1
        if cfg.target_tau > 0:
            self._soft_update(cfg.target_tau)
        n_valid = mask.sum() * q_tot.shape[-1]
        return {
            "td_loss": float(loss.detach()),
            "grad_norm": float(grad_norm),
            "q_taken_mean": float((q_tot.detach() * mask.unsqueeze(-1)).sum() / n_valid),
            "target_mean": float((targets * mask.unsqueeze(-1)).sum() / n_valid),
        }

    def _soft_update(self, tau: float) -> None:
        with torch.no_grad():
            for target, online in ((self.target_agent_net, self.agent_net), (self.target_mixer, self.mixer)):
                for tp, p in zip(target.parameters(), online.parameters()):
                    tp.lerp_(p, tau)

    def _hard_update(self) -> None:
        self.target_agent_net.load_state_dict(self.agent_net.state_dict())
        self.target_mixer.load_state_dict(self.mixer.state_dict())

    # ------------------------------------------------------------------ interface
    def _train_episode(self) -> EpisodeLog:
        cfg = self.config
        log, episode = self._run(explore=True)
        self.buffer.add(episode)
        done = self.episodes_done + 1  # this one included (train_episode counts it after this hook)
        stats: list[dict[str, float]] = []
        per = cfg.episodes_per_snapshot  # learning waits for the snapshot's last episode
        if len(self.buffer) >= cfg.learning_starts and done % per == 0:
            stats = [self._learn() for _ in range(cfg.updates_per_episode * per)]
        if cfg.target_tau <= 0 and done % cfg.target_update_interval == 0:
            self._hard_update()
        log.metrics["epsilon"] = self.epsilon(log.length)
        log.metrics["buffer_episodes"] = float(len(self.buffer))
        log.metrics["gradient_steps"] = float(self.gradient_steps)
        for key in stats[0] if stats else ():
            log.metrics[key] = float(np.mean([s[key] for s in stats]))
        return log

    def evaluate(self) -> EpisodeLog:
        return self._run(explore=False)[0]

    def state_dict(self) -> dict[str, Any]:
        d = super().state_dict()
        d.update(
            agent_net=self.agent_net.state_dict(),
            mixer=self.mixer.state_dict(),
            target_agent_net=self.target_agent_net.state_dict(),
            target_mixer=self.target_mixer.state_dict(),
            optimizer=self.optimizer.state_dict(),
            buffer=self.buffer.state_dict(),
            gradient_steps=self.gradient_steps,
            snapshot_epsilon=self._snapshot_eps,
        )
        return copy.deepcopy(d)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        d = copy.deepcopy(d)
        super().load_state_dict(d)
        self.agent_net.load_state_dict(d["agent_net"])
        self.mixer.load_state_dict(d["mixer"])
        self.target_agent_net.load_state_dict(d["target_agent_net"])
        self.target_mixer.load_state_dict(d["target_mixer"])
        self.optimizer.load_state_dict(d["optimizer"])
        self.buffer.load_state_dict(d["buffer"])
        self.gradient_steps = int(d["gradient_steps"])
        self._snapshot_eps = float(d.get("snapshot_epsilon", self.config.eps_start))


@register("vdn")
class VDN(QMIX):
    """VDN: the QMIX learner with ``Q_tot = sum_i Q_i`` (``mixer="vdn"``)."""

    @classmethod
    def default_config(cls, **overrides: Any) -> QMIXConfig:
        return QMIXConfig(**{"mixer": "vdn", **overrides})


@register("iql")
class IQL(QMIX):
    """Independent Q-learning: the QMIX learner without mixer, each agent TD-learns the team reward."""

    @classmethod
    def default_config(cls, **overrides: Any) -> QMIXConfig:
        return QMIXConfig(**{"mixer": "none", **overrides})
