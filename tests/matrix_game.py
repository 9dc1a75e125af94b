"""Tiny cooperative games (PettingZoo ParallelEnvs) for testing the MARL learners of ``agents``.

A test helper, not part of any package (``agents`` must not ship test environments):
tests import it as ``from tests.matrix_game import MatrixGameEnv, TwoStepGameEnv``
(pytest puts the repository root on ``sys.path``; ``tests`` is a namespace package).

* :class:`MatrixGameEnv` - a one-shot cooperative matrix game, repeated ``n_steps``
  times per episode.
* :class:`TwoStepGameEnv` - the two-step game of the QMIX paper (Rashid et al. 2018,
  section 6.1): the first agent's first action picks which payoff matrix the second
  step plays. Only a learner that represents the non-additive joint value of the second
  matrix finds the optimum.

MatrixGameEnv
=============

Description
    ``n_agents`` agents each pick one of ``n_actions`` actions simultaneously; all get
    the same payoff ``payoff[a_0, ..., a_{n-1}]``. The game is played ``n_steps`` times
    per episode (a repeated one-shot game: the step index is the only state).
    The default payoff is ``prod_i (1 + a_i)``, monotonic but not additive; for 2 agents
    with 3 actions::

                 a_1=0  a_1=1  a_1=2
        a_0=0  [   1,     2,     3  ]
        a_0=1  [   2,     4,     6  ]
        a_0=2  [   3,     6,     9  ]

    Every agent's payoff increases with its own action whatever the others do, so the
    optimum (all agents pick the last action) is reached by greedy per-agent choices:
    a monotonic mixer (QMIX) can represent the payoff, VDN's additive fit still has the
    right argmax. Pass e.g. ``payoff=[[5, 0, 0], [0, 2, 0], [0, 0, 8]]`` for a
    coordination game with a decoy equilibrium (0, 0) on which epsilon-greedy learners
    can get stuck (relative overgeneralisation).

Agents
    ``agent_0`` ... ``agent_{n-1}``, all present until the episode ends.

Observation Space
    ``Box(0, 1, (n_steps + 1,), float32)`` for every agent: one-hot of the step index t
    (index ``n_steps`` after the last step).

    =========  ================================  ======
    feature    meaning                           range
    =========  ================================  ======
    ``o[t]``   1 if the current step is t        {0, 1}
    =========  ================================  ======

    ``state()`` is the same one-hot vector; ``state_space`` the same Box.

Action Space
    ``Discrete(n_actions)`` for every agent.

Rewards
    Every agent gets ``payoff[joint action]`` each step (team reward).

Starting State
    Step 0. The game has no randomness; ``reset(seed=...)`` is accepted and ignored.

Episode End
    After ``n_steps`` steps, by termination (default) or by truncation
    (``end_by="truncation"``), or earlier by truncation when ``max_cycles`` is smaller.

Arguments
    ``n_agents=2``, ``n_actions=3``, ``payoff=None`` (array of shape
    ``(n_actions,) * n_agents``), ``n_steps=1``, ``end_by="termination"``,
    ``max_cycles=None``, ``render_mode=None``.

Infos
    Each agent's info after a step: ``{"joint_action": [a_0, ...], "payoff": float}``.

Version History
    v0: initial version.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
from gymnasium import spaces
from numpy.typing import ArrayLike
from pettingzoo import ParallelEnv

__all__ = ["MatrixGameEnv", "TwoStepGameEnv", "default_payoff", "parallel_env"]



def default_payoff(n_agents: int, n_actions: int) -> np.ndarray:
    """``payoff[a_0, ..., a_{n-1}] = prod_i (1 + a_i)``, shape ``(n_actions,) * n_agents``, float32."""
    factor = np.arange(1, n_actions + 1, dtype=np.float32)
    payoff = np.ones((n_actions,) * n_agents, dtype=np.float32)
    for i in range(n_agents):
        payoff = payoff * factor.reshape([-1 if j == i else 1 for j in range(n_agents)])
    return payoff


class MatrixGameEnv(ParallelEnv):
    """Cooperative repeated matrix game; see the module docstring for the full manual."""

    metadata: ClassVar[dict[str, Any]] = {"name": "matrix_game_v0", "render_modes": [], "is_parallelizable": True}

    def __init__(
        self,
        n_agents: int = 2,
        n_actions: int = 3,
        payoff: ArrayLike | None = None,
        n_steps: int = 1,
        end_by: Literal["termination", "truncation"] = "termination",
        max_cycles: int | None = None,
        render_mode: str | None = None,
    ) -> None:
        if n_agents < 1 or n_actions < 1 or n_steps < 1:
            raise ValueError("n_agents, n_actions and n_steps must be >= 1")
        if end_by not in ("termination", "truncation"):
            raise ValueError(f"end_by must be 'termination' or 'truncation', got {end_by!r}")
        if payoff is None:
            payoff = default_payoff(n_agents, n_actions)
        self.payoff = np.asarray(payoff, dtype=np.float32)
        if self.payoff.shape != (n_actions,) * n_agents:
            raise ValueError(f"payoff must have shape {(n_actions,) * n_agents}, got {self.payoff.shape}")
        self.n_steps = n_steps
        self.end_by = end_by
        self.max_cycles = max_cycles
        self.render_mode = render_mode
        self.possible_agents = [f"agent_{i}" for i in range(n_agents)]
        self.agents: list[str] = []
        box = spaces.Box(0.0, 1.0, (n_steps + 1,), np.float32)
        self.state_space = box
        self.observation_spaces = {a: box for a in self.possible_agents}
        self.action_spaces = {a: spaces.Discrete(n_actions) for a in self.possible_agents}
        self._t = 0

    # -- spaces (cached: the same object every call)
    def observation_space(self, agent: str) -> spaces.Box:
        return self.observation_spaces[agent]

    def action_space(self, agent: str) -> spaces.Discrete:
        return self.action_spaces[agent]

    # -- known solution
    @property
    def optimal_joint_action(self) -> tuple[int, ...]:
        """The joint action with the highest payoff (first one in case of ties)."""
        return tuple(int(i) for i in np.unravel_index(int(np.argmax(self.payoff)), self.payoff.shape))

    @property
    def optimal_return(self) -> float:
        """Best achievable episode return (``n_steps`` times the best payoff)."""
        return float(self.payoff.max()) * self.n_steps

    # -- dynamics
    def _one_hot(self) -> np.ndarray:
        vec = np.zeros(self.n_steps + 1, dtype=np.float32)
        vec[min(self._t, self.n_steps)] = 1.0
        return vec

    def state(self) -> np.ndarray:
        return self._one_hot()

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
        self._t = 0
        self.agents = list(self.possible_agents)
        obs = self._one_hot()
        return {a: obs.copy() for a in self.agents}, {a: {} for a in self.agents}

    def step(self, actions: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        if not self.agents:
            raise RuntimeError("step() called on a finished episode; call reset()")
        joint = tuple(int(actions[a]) for a in self.agents)
        reward = float(self.payoff[joint])
        self._t += 1
        finished = self._t >= self.n_steps
        cut = self.max_cycles is not None and self._t >= self.max_cycles
        terminated = finished and self.end_by == "termination"
        truncated = (finished and not terminated) or (cut and not terminated)
        obs = self._one_hot()
        agents = self.agents
        result = (
            {a: obs.copy() for a in agents},
            {a: reward for a in agents},
            {a: terminated for a in agents},
            {a: truncated for a in agents},
            {a: {"joint_action": list(joint), "payoff": reward} for a in agents},
        )
        if terminated or truncated:
            self.agents = []
        return result

    def render(self) -> None:
        return None

    def close(self) -> None:
        return None


def parallel_env(**kwargs: Any) -> MatrixGameEnv:
    """PettingZoo-style constructor (``matrix_game_v0.parallel_env()``)."""
    return MatrixGameEnv(**kwargs)


class TwoStepGameEnv(ParallelEnv):
    """The two-step cooperative game of the QMIX paper (Rashid et al. 2018, Fig. 3a, Table 1).

    Description
        Two agents, two actions each, two steps. Step 1 pays nothing; the action of
        ``agent_0`` alone chooses the second stage: action 0 leads to state 2A, action 1
        to 2B. Step 2 pays ``payoff_2a[a_0, a_1]`` or ``payoff_2b[a_0, a_1]``::

            2A: [[7, 7],     2B: [[0, 1],
                 [7, 7]]          [1, 8]]

        The optimum is 2B with joint action (1, 1): return 8. 2B's payoff is monotonic
        in each agent's action but not additive; under uniform exploration the
        least-squares additive fit (VDN) values 2B's best joint action at 6.5 and
        independent learners (IQL) value their best 2B action at the mean over the
        partner's actions, 4.5; both are below 7, so both pick 2A (return 7). QMIX's
        monotonic mixer represents 2B exactly and picks 2B.

    Agents
        ``agent_0``, ``agent_1``, both present until the episode ends.

    Observation Space
        ``Box(0, 1, (4,), float32)`` for both agents: one-hot of the state, in the order
        (first step, 2A, 2B, end). ``state()`` is the same vector; ``state_space`` the
        same Box.

    Action Space
        ``Discrete(2)`` for both agents.

    Rewards
        Team reward: 0 at step 1, the payoff of the chosen matrix at step 2.

    Starting State
        The first step. No randomness; ``reset(seed=...)`` is accepted and ignored.

    Episode End
        By termination after the second step.

    Arguments
        ``payoff_2a`` and ``payoff_2b`` (2 x 2 arrays, the defaults above),
        ``render_mode=None``.

    Infos
        After a step: ``{"joint_action": [a_0, a_1], "payoff": float, "stage": "1" | "2A" | "2B"}``
        (the stage the step was played in).
    """

    metadata: ClassVar[dict[str, Any]] = {"name": "two_step_game_v0", "render_modes": [], "is_parallelizable": True}
    STAGES: ClassVar[tuple[str, ...]] = ("1", "2A", "2B", "end")
    """Names of the four states, in the order of the one-hot observation."""

    def __init__(
        self,
        payoff_2a: ArrayLike = ((7.0, 7.0), (7.0, 7.0)),
        payoff_2b: ArrayLike = ((0.0, 1.0), (1.0, 8.0)),
        render_mode: str | None = None,
    ) -> None:
        self.payoffs = {
            "2A": np.asarray(payoff_2a, dtype=np.float32),
            "2B": np.asarray(payoff_2b, dtype=np.float32),
        }
        for stage, payoff in self.payoffs.items():
            if payoff.shape != (2, 2):
                raise ValueError(f"payoff_{stage.lower()} must have shape (2, 2), got {payoff.shape}")
        self.render_mode = render_mode
        self.possible_agents = ["agent_0", "agent_1"]
        self.agents: list[str] = []
        box = spaces.Box(0.0, 1.0, (len(self.STAGES),), np.float32)
        self.state_space = box
        self.observation_spaces = {a: box for a in self.possible_agents}
        self.action_spaces = {a: spaces.Discrete(2) for a in self.possible_agents}
        self._stage = "end"

    def observation_space(self, agent: str) -> spaces.Box:
        return self.observation_spaces[agent]

    def action_space(self, agent: str) -> spaces.Discrete:
        return self.action_spaces[agent]

    # -- known solution
    @property
    def optimal_stage(self) -> str:
        """The second stage with the higher best payoff ("2A" on ties)."""
        return "2B" if self.payoffs["2B"].max() > self.payoffs["2A"].max() else "2A"

    @property
    def optimal_joint_action(self) -> tuple[int, int]:
        """Best joint action of the optimal stage (first one in case of ties)."""
        payoff = self.payoffs[self.optimal_stage]
        a_0, a_1 = np.unravel_index(int(np.argmax(payoff)), payoff.shape)
        return int(a_0), int(a_1)

    @property
    def optimal_return(self) -> float:
        """Best achievable episode return."""
        return float(self.payoffs[self.optimal_stage].max())

    # -- dynamics
    def _one_hot(self) -> np.ndarray:
        vec = np.zeros(len(self.STAGES), dtype=np.float32)
        vec[self.STAGES.index(self._stage)] = 1.0
        return vec

    def state(self) -> np.ndarray:
        return self._one_hot()

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
        self._stage = "1"
        self.agents = list(self.possible_agents)
        obs = self._one_hot()
        return {a: obs.copy() for a in self.agents}, {a: {} for a in self.agents}

    def step(self, actions: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        if not self.agents:
            raise RuntimeError("step() called on a finished episode; call reset()")
        joint = [int(actions[a]) for a in self.agents]
        played = self._stage
        if played == "1":
            reward, self._stage = 0.0, ("2A" if joint[0] == 0 else "2B")
        else:
            reward, self._stage = float(self.payoffs[played][tuple(joint)]), "end"
        terminated = self._stage == "end"
        obs = self._one_hot()
        agents = self.agents
        result = (
            {a: obs.copy() for a in agents},
            {a: reward for a in agents},
            {a: terminated for a in agents},
            {a: False for a in agents},
            {a: {"joint_action": list(joint), "payoff": reward, "stage": played} for a in agents},
        )
        if terminated:
            self.agents = []
        return result

    def render(self) -> None:
        return None

    def close(self) -> None:
        return None
