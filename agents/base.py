"""The plug-in interface every pruning agent implements (the registry that names them: :mod:`agents.registry`).

Algorithms know the environment ONLY through the API of the env they are handed;
nothing here imports ``pruning_env``. Which API that is, each algorithm class says in
:attr:`Algorithm.env_api`, so that a caller builds the right view without knowing the
algorithm by name:

==================  ========================================================================
``"parallel"``      a PettingZoo ``ParallelEnv`` (``reset``/``step``/``state``/spaces): every
                    layer agent acts at every step (QMIX, VDN, IQL, the baselines)
``"sequential"``    a Gymnasium env that decides ONE layer per step (``Box`` observation,
                    ``Box`` action of shape (1,)), e.g.
                    ``pruning_env.SequentialPruningEnv(parallel_env)`` (AMC)
==================  ========================================================================

:meth:`Algorithm.budget_overrides` gives the config overrides that fit an algorithm's
exploration schedule to a search budget, again without a name check. An algorithm owns
its env for its whole life and runs one episode per call:

=====================  ====================================================================
``train_episode()``    one exploring episode on ``env``, then learning; returns an
                       :class:`EpisodeLog`. The base's: runs the ``_train_episode()`` hook,
                       then counts the episode (``episodes_done``, ``env_steps``)
``evaluate()``         one greedy episode, no learning (``evaluate`` does not count as a
                       training episode and leaves the learner untouched)
``state_dict()``       everything needed to resume EXACTLY: networks, optimisers, replay
                       buffer, counters, RNG states (python, numpy, torch); the base's
                       holds counters and RNG states, a subclass extends it (``super()``)
``load_state_dict()``  restores it; ``state_dict`` holds only tensors and plain python
                       values, so ``torch.save``/``torch.load(weights_only=True)`` work
=====================  ====================================================================

Seeding: all randomness of an algorithm comes from ``self.rngs`` (a python
``random.Random``, a numpy ``Generator`` and a torch ``Generator``, all seeded from
``seed``), networks are initialised under ``seeded_torch(seed)``, and the env is reset
with ``env.reset(seed=seed)`` on the first episode and ``env.reset()`` afterwards (see
:meth:`Algorithm.reset_env`). Same seed, same env => identical results on CPU.

Team reward: every agent of the pruning env gets the same reward; for generality the
team reward of a step is the MEAN over agents of their rewards (BenchMARL convention; an
epymarl-style sum would be ``n_agents`` times larger) and ``episode_return`` is its sum
over the episode.

Metrics: ``EpisodeLog.metrics`` go to TensorBoard, keys ending in ``loss`` under
``losses/`` and every other key under ``train/``; so name losses ``..._loss`` (``td_loss``,
``actor_loss``) and nothing else (``epsilon``, ``grad_norm``, ``best_return``).

Adding an algorithm (one new file, then run it by name)::

    # my_algos.py
    import dataclasses
    from agents import Algorithm, EpisodeLog, config_field, register

    @dataclasses.dataclass
    class GreedyConfig:
        action: int = config_field(0, min=0)   # the valid values, checked before any work
        \"\"\"Action index every agent always takes.\"\"\"

    @register("always")
    class Always(Algorithm):
        config_cls = GreedyConfig      # env_api = "parallel" is inherited

        def _train_episode(self) -> EpisodeLog:  # train_episode() calls it and counts the episode
            log, _ = self.play_episode(lambda obs, infos: {a: self.config.action for a in obs})
            return log

        def evaluate(self) -> EpisodeLog:
            return self.play_episode(lambda obs, infos: {a: self.config.action for a in obs})[0]

        # no state of its own: the base's state_dict/load_state_dict are complete

    # anywhere:
    algo = make_algorithm("my_algos:always", env, seed=0, action=2)   # "module:name" imports
    log = algo.train_episode()                                        # my_algos first

A new QMIX mixer is one file too: subclass :class:`agents.qmix.Mixer`, decorate it with
``@register_mixer("my_mixer")`` and run ``make_algorithm("qmix", env, seed=0,
mixer="my_mixer")`` (see :mod:`agents.qmix`).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import inspect
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, final, get_args

import gymnasium as gym
import numpy as np
import torch
from pettingzoo import ParallelEnv

__all__ = [
    "ENV_APIS",
    "Algorithm",
    "EnvAPI",
    "EpisodeLog",
    "EpisodeTrace",
    "RandomStreams",
    "check_budget",
    "check_env_api",
    "config_field",
    "seeded_torch",
    "split_observation",
]

MAX_EPISODE_STEPS = 100_000
"""Safety net: an episode that has not ended after this many steps is a bug in the env."""

EnvAPI = Literal["parallel", "sequential"]
"""The env APIs an algorithm can ask for (see :attr:`Algorithm.env_api`)."""
ENV_APIS: tuple[str, ...] = get_args(EnvAPI)
"""``("parallel", "sequential")``."""


@dataclass
class EpisodeLog:
    """What one episode produced, for logging and for picking the best pruning plan."""

    episode_return: float
    """Team return: sum over steps of the mean-over-agents reward."""
    length: int
    """Number of env steps in the episode."""
    actions: list[dict[str, Any]]
    """Per step, the action of every agent that acted (``{"layer_0": 3, ...}``); ints for
    discrete action spaces. A sequential algorithm (AMC) has one entry per step, named by
    the layer it decided (a float keep ratio)."""
    final_info: dict[str, Any]
    """The infos dict of the first agent at the last step (the pruning env puts the
    accuracy/MACs ratios and the plan there)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Scalars computed on the way, for TensorBoard. Naming rule: the caller logs a key that
    ends in ``loss`` under ``losses/`` and every other key under ``train/``, so training
    losses end in ``loss`` (``td_loss``, ``actor_loss``, ``critic_loss``) and nothing else
    does (diagnostics such as ``epsilon``, ``buffer_episodes``, ``gradient_steps``,
    ``q_mean``, ``noise_sigma``, ``best_return``)."""


@dataclass
class EpisodeTrace:
    """Raw per-step data of one parallel-env episode (T steps), for learners.

    ``obs``/``infos``/``states`` have T+1 entries (entry 0 is what ``reset`` returned,
    entry t+1 what step t returned); the rest have T entries. ``states`` is empty unless
    requested.
    """

    obs: list[dict[str, Any]] = field(default_factory=list)
    infos: list[dict[str, dict]] = field(default_factory=list)
    states: list[np.ndarray] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    team_rewards: list[float] = field(default_factory=list)
    terminated: list[bool] = field(default_factory=list)
    """True when the step ended the episode by termination (no bootstrapping)."""
    truncated: list[bool] = field(default_factory=list)
    """True when the step ended the episode by truncation only (bootstrap from the next state)."""


class RandomStreams:
    """The three random generators an algorithm may use, seeded from one seed.

    ``py``: ``random.Random``; ``np``: ``numpy.random.Generator`` (PCG64); ``torch``: a
    CPU ``torch.Generator``. Draw only from these (never from global RNGs) so that an
    algorithm's results depend on its seed alone and resume exactly.
    """

    def __init__(self, seed: int) -> None:
        self.py = random.Random(seed)
        self.np = np.random.default_rng(seed)
        self.torch = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {
            "python": self.py.getstate(),
            "numpy": self.np.bit_generator.state,
            "torch": self.torch.get_state(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        version, internal, gauss = d["python"]
        self.py.setstate((version, tuple(internal), gauss))
        self.np.bit_generator.state = d["numpy"]
        self.torch.set_state(d["torch"])


@contextlib.contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """Run the block with torch's global CPU RNG seeded to ``seed``, restoring it afterwards.

    Use it around network construction: ``nn.Linear`` & co. initialise from the global
    RNG, and this keeps their initialisation a function of the algorithm's seed without
    disturbing anyone else's random stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def split_observation(obs: Any, info: dict | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Return ``(observation as float32 vector, action mask or None)`` for one agent.

    Accepts the PettingZoo conventions for masks: ``obs = {"observation": ..., "action_mask": ...}``
    or ``info["action_mask"]``. The mask is a bool vector of length n_actions.
    """
    mask = None
    if isinstance(obs, dict):
        mask = obs.get("action_mask")
        obs = obs["observation"]
    if mask is None and info:
        mask = info.get("action_mask")
    vec = np.asarray(obs, dtype=np.float32).reshape(-1)
    return vec, (None if mask is None else np.asarray(mask, dtype=bool).reshape(-1))


class Algorithm(abc.ABC):
    """Base class of every pruning agent (MARL learner, single-agent learner or baseline).

    Subclasses set ``config_cls`` (a dataclass with a one-line docstring per field),
    implement the abstract :meth:`_train_episode` and :meth:`evaluate` and register themselves
    with :func:`register`; one that wants a sequential (one layer per step) Gymnasium env sets
    ``env_api = "sequential"``, one with an exploration schedule overrides :meth:`budget_overrides`.
    :meth:`train_episode` (the base's, not overridable) runs :meth:`_train_episode` and counts the
    episode. ``state_dict``/``load_state_dict`` here are concrete (name, seed, config, counters,
    RNG states); a subclass with state of its own extends both with ``super()``.

    Attributes available to subclasses:
        env: the env, in the API :attr:`env_api` names (checked by the constructor).
        config: the config dataclass instance.
        seed: the integer seed.
        device: the torch device for networks.
        rngs: :class:`RandomStreams` seeded from ``seed``.
        episodes_done: training episodes finished (not ``evaluate``); kept by :meth:`train_episode`.
        env_steps: env steps of finished training episodes; kept by :meth:`train_episode`.
    """

    name: ClassVar[str] = ""
    """Registry name, set by :func:`register`."""
    config_cls: ClassVar[type]
    """The config dataclass of this algorithm."""
    env_api: ClassVar[EnvAPI] = "parallel"
    """The env API the constructor wants, so that callers build the right view without a
    name check: ``"parallel"``, a PettingZoo ``ParallelEnv`` whose agents (the layers) all
    act at every step; ``"sequential"``, a Gymnasium env that decides one layer per step
    (``Box`` observation, ``Box`` action of shape (1,)), e.g.
    ``pruning_env.SequentialPruningEnv(parallel_env)``. A sequential env may expose
    ``possible_agents`` (the layer names, in decision order) to name the actions in
    :attr:`EpisodeLog.actions`."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "train_episode" in vars(cls):
            raise TypeError(f"{cls.__name__} overrides train_episode(); implement _train_episode() instead (same "
                            "signature, returns the EpisodeLog, without counting episodes_done/env_steps): "
                            "Algorithm.train_episode() runs it and counts the episode")

    def __init__(
        self,
        env: Any,
        config: Any | None = None,
        *,
        seed: int,
        device: str | torch.device = "cpu",
    ) -> None:
        if config is None:
            config = self.default_config()
        if not isinstance(config, self.config_cls):
            raise TypeError(
                f"{type(self).__name__} expects a {self.config_cls.__name__}, got {type(config).__name__}"
            )
        check_env_api(env, self.env_api, self.name or type(self).__name__)
        self.env = env
        self.config = config
        self.seed = int(seed)
        self.device = torch.device(device)
        self.rngs = RandomStreams(self.seed)
        self.episodes_done = 0
        self.env_steps = 0
        self._env_resets = 0
        self._env_seeded_by_me = False

    # ------------------------------------------------------------------ interface
    @classmethod
    def default_config(cls, **overrides: Any) -> Any:
        """The default config of this algorithm with ``overrides`` applied."""
        return cls.config_cls(**overrides)

    @classmethod
    def budget_overrides(cls, plans: int, episode_length: int) -> dict[str, Any]:
        """Config overrides that fit this algorithm's exploration schedule to a search budget.

        The budget is ``plans`` measured pruning plans; each env step measures at most
        one new plan, and an episode of the parallel env is ``episode_length`` steps (a
        run has about ``plans / episode_length`` episodes). The defaults of the config
        classes assume one fixed run length; these overrides scale the schedule instead
        (e.g. epsilon annealed over half the budget). The keys are config fields: pass
        them to :func:`make_algorithm` and let explicit user options win over them.
        Default: ``{}`` (nothing to fit).
        """
        check_budget(plans, episode_length)
        return {}

    @classmethod
    def option_names(cls) -> tuple[frozenset[str], frozenset[str]]:
        """The options a caller may set: ``(config fields, keyword-only constructor options)`` (``seed`` and
        ``device`` are set separately); :func:`agents.make_algorithm` and ``--algo-config`` checks read it."""
        fields = frozenset(f.name for f in dataclasses.fields(cls.config_cls))
        init = frozenset(p.name for p in inspect.signature(cls.__init__).parameters.values()
                         if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("seed", "device"))
        return fields, init

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Raise ``ValueError`` (or ``TypeError``) for a config this algorithm cannot run although every field is
        inside the limits it declares (:func:`config_field`), e.g. keyword arguments a plug-in does not take.
        Called before any work by whoever builds the algorithm from a user's settings. Default: nothing."""
        return None

    @final
    def train_episode(self) -> EpisodeLog:
        """Run ONE exploring training episode and learn from it (:meth:`_train_episode`), then count it:
        ``episodes_done += 1``, ``env_steps += log.length`` (the search layer reads ``episodes_done``). Not to be
        overridden (refused at class definition), nor the counters touched by the hook (refused at the first
        episode); an episode whose hook raises is not counted."""
        before = (self.episodes_done, self.env_steps)
        log = self._train_episode()
        who = type(self).__name__
        if not isinstance(log, EpisodeLog):
            raise TypeError(f"{who}._train_episode() must return an EpisodeLog, got {type(log).__name__}")
        if (self.episodes_done, self.env_steps) != before:
            raise RuntimeError(f"{who}._train_episode() changed episodes_done/env_steps (from {before} to "
                               f"{(self.episodes_done, self.env_steps)}); Algorithm.train_episode() counts the "
                               "episode and its steps itself: remove the subclass's own counting")
        self.episodes_done += 1
        self.env_steps += log.length
        return log

    @abc.abstractmethod
    def _train_episode(self) -> EpisodeLog:
        """The hook of :meth:`train_episode`: one exploring episode on ``env``, its learning, its log. Meanwhile
        ``episodes_done``/``env_steps`` count the episodes/steps BEFORE this one (``episodes_done`` = its index)."""

    @abc.abstractmethod
    def evaluate(self) -> EpisodeLog:
        """Run one greedy (deterministic-policy) episode; no learning, no exploration."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; here name, seed, config, counters and RNG states. A subclass
        with state of its own (networks, buffers...) extends it: ``d = super().state_dict(); d[...] = ...``."""
        return {
            "algorithm": self.name,
            "seed": self.seed,
            "config": dataclasses.asdict(self.config),
            "episodes_done": self.episodes_done,
            "env_steps": self.env_steps,
            "env_resets": self._env_resets,
            "rngs": self.rngs.state_dict(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; a subclass extending it calls ``super().load_state_dict(d)``."""
        if d.get("algorithm", self.name) != self.name:
            raise ValueError(f"state_dict of algorithm {d['algorithm']!r} given to {self.name!r}")
        self.seed = int(d["seed"])
        self.episodes_done = int(d["episodes_done"])
        self.env_steps = int(d["env_steps"])
        self._env_resets = int(d["env_resets"])
        self.rngs.load_state_dict(d["rngs"])

    def upcoming_actions(self, episodes: int, steps: int) -> list[list[dict[str, Any]]]:
        """The joint actions (``steps`` per episode) of the next ``episodes`` training episodes, when they are known
        before those episodes are played, i.e. do not depend on observations; ``[]`` (the default) when not.

        A hint for callers that measure an episode's pruning plans ahead on parallel workers: it must not change
        the algorithm's state (draw from copies of :attr:`rngs`), and a wrong hint costs time, never results.
        """
        return []

    def upcoming_policies(self, episodes: int) -> list[Callable[[], Callable[[dict[str, Any], dict[str, dict]],
                                                                             dict[str, Any]]]]:
        """For the next training episodes (up to ``episodes``) whose policy is fixed now (one policy snapshot,
        exploration from per-episode random streams), a factory of each one's exact ``policy(obs, infos) ->
        actions``; ``[]`` (the default) when there is none. Like :meth:`upcoming_actions` a hint for measuring plans
        ahead: calling a factory or its policy must not change the algorithm, and a wrong hint costs time only.
        """
        return []

    # ------------------------------------------------------------------ helpers
    def next_reset_seed(self) -> int | None:
        """The ``seed`` argument for the next ``env.reset``.

        ``self.seed`` for the very first episode, ``None`` afterwards. An algorithm
        restored with :meth:`load_state_dict` re-seeds the env once at its first reset
        with a seed derived from ``(seed, resets so far)``: a resumed run is then
        reproducible, and bit-identical to the uninterrupted one whenever the env's
        episodes do not depend on its RNG history (the env's own state is not part of
        the algorithm's checkpoint).
        """
        if self._env_seeded_by_me:
            reset_seed = None
        elif self._env_resets == 0:
            reset_seed = self.seed
        else:
            reset_seed = int(np.random.SeedSequence([self.seed, self._env_resets]).generate_state(1)[0])
        self._env_seeded_by_me = True
        self._env_resets += 1
        return reset_seed

    def reset_env(self) -> tuple[Any, Any]:
        """``env.reset`` following the seeding rule of :meth:`next_reset_seed`.

        Returns what the env's ``reset`` returns: ``(obs dict, infos dict)`` for a
        ParallelEnv, ``(obs, info)`` for a Gymnasium env.
        """
        return self.env.reset(seed=self.next_reset_seed())

    def play_episode(
        self,
        policy: Callable[[dict[str, Any], dict[str, dict]], dict[str, Any]],
        *,
        record_state: bool = False,
    ) -> tuple[EpisodeLog, EpisodeTrace]:
        """Run one episode of the parallel env (``env_api = "parallel"``) with ``policy(obs, infos) -> actions``.

        ``policy`` gets the observation and info dicts of the live agents and returns an
        action for each of them. With ``record_state`` the global ``env.state()`` is
        recorded after reset and after every step. Counters are NOT updated here.
        """
        env = self.env
        obs, infos = self.reset_env()
        trace = EpisodeTrace(obs=[obs], infos=[infos])
        if record_state:
            trace.states.append(np.asarray(env.state(), dtype=np.float32).reshape(-1))
        for _ in range(MAX_EPISODE_STEPS):
            actions = policy(obs, infos)
            obs, rewards, terminations, truncations, infos = env.step(actions)
            team_reward = float(np.mean([float(r) for r in rewards.values()])) if rewards else 0.0
            done = not env.agents or all(
                terminations.get(a, False) or truncations.get(a, False) for a in rewards
            )
            terminated = bool(terminations) and all(terminations.values())
            trace.actions.append(dict(actions))
            trace.team_rewards.append(team_reward)
            trace.terminated.append(done and terminated)
            trace.truncated.append(done and not terminated)
            trace.obs.append(obs)
            trace.infos.append(infos)
            if record_state:
                trace.states.append(np.asarray(env.state(), dtype=np.float32).reshape(-1))
            if done:
                break
        else:
            raise RuntimeError(f"episode did not end within {MAX_EPISODE_STEPS} steps")
        log = EpisodeLog(
            episode_return=float(sum(trace.team_rewards)),
            length=len(trace.actions),
            actions=[{a: _plain(v) for a, v in step.items()} for step in trace.actions],
            final_info=_first_agent_info(infos, env),
        )
        return log, trace


def config_field(default: Any, **limits: Any) -> Any:
    """A config dataclass field whose valid values are declared with it, in its metadata.

    ``limits`` take the keys of the pruning env's config options: ``min`` / ``max`` (with
    ``min_exclusive`` / ``max_exclusive``) for a number or every element of a tuple of numbers,
    ``choices`` (a list, or a callable returning it). Whoever builds an algorithm from a user's settings
    checks them before any work (``pruning_env.search.check_algo_config`` does, with the one rule every
    config of the package follows), so a negative learning rate is refused naming the setting instead of
    failing inside the optimiser.
    """
    return dataclasses.field(default=default, metadata=limits)


def check_budget(plans: int, episode_length: int) -> None:
    """Raise ``ValueError`` unless both budget numbers are positive integers."""
    for name, value in (("plans", plans), ("episode_length", episode_length)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_env_api(env: Any, api: str, who: str) -> None:
    """Raise ``TypeError`` unless ``env`` is of the API ``api`` (see :attr:`Algorithm.env_api`).

    The message says how to get the right one: the usual mistake is handing the parallel
    pruning env to a sequential algorithm or its sequential view to a parallel one.
    """
    if api == "parallel":
        if isinstance(env, gym.Env):
            raise TypeError(
                f"{who} wants a PettingZoo ParallelEnv (env_api='parallel'), got the Gymnasium env "
                f"{type(env).__name__}; pass the parallel env itself"
            )
        if not (hasattr(env, "possible_agents") and callable(getattr(env, "step", None))):
            raise TypeError(f"{who} wants a PettingZoo ParallelEnv (env_api='parallel'), got {type(env).__name__}")
    elif api == "sequential":
        if isinstance(env, ParallelEnv):
            raise TypeError(
                f"{who} wants a Gymnasium env that decides one layer per step (env_api='sequential'), got the "
                f"PettingZoo ParallelEnv {type(env).__name__}; wrap it: pruning_env.SequentialPruningEnv(env)"
            )
        spaces_ok = isinstance(getattr(env, "observation_space", None), gym.spaces.Space) and isinstance(
            getattr(env, "action_space", None), gym.spaces.Space
        )
        if not (spaces_ok and callable(getattr(env, "step", None)) and callable(getattr(env, "reset", None))):
            raise TypeError(
                f"{who} wants a Gymnasium env (env_api='sequential') with observation_space/action_space, "
                f"got {type(env).__name__}"
            )
    else:
        raise ValueError(f"unknown env_api {api!r}; known: {', '.join(ENV_APIS)}")


def _plain(action: Any) -> Any:
    """numpy scalar/array action -> python int/float (EpisodeLog holds plain values)."""
    arr = np.asarray(action)
    if arr.size == 1:
        return arr.item()
    return arr.tolist()


def _first_agent_info(infos: dict[str, dict], env: ParallelEnv) -> dict[str, Any]:
    for agent in getattr(env, "possible_agents", []):
        if agent in infos:
            return dict(infos[agent])
    return dict(next(iter(infos.values()), {}))
