"""Many episodes of a surrogate env at once: :class:`SurrogateVectorEnv`, the many-runs path of surrogate mode.

Row ``i`` of every array it returns is the episode that :class:`~pruning_env.envs.surrogate.SurrogatePruningEnv`
(the PettingZoo env, same settings) gives for the same actions, value for value: observations, rewards, infos
and plans (``tests/test_surrogate_vector.py`` compares them). What is shared is computed once per call:

* the exact budget of every row in one search (:func:`~pruning_env.engine.budget.budget_keep_counts_batch`);
* the MACs of every row and the surrogate model's prediction of every row in one call each;
* the observations in one ``(N, L, F)`` assembly (:func:`~pruning_env.envs.features.assemble` and
  :func:`~pruning_env.envs.features.dsfp_matrix`, the PettingZoo env's own functions).

A layer's state is the set of filters it keeps; each set met is numbered once per layer, with its DSFP order and
statistics (:meth:`~pruning_env.envs.measure.StaticDsfp.layer`), and a row holds ``(L,)`` such numbers. The tables
are emptied at a ``reset`` once a layer has more than ``max_states`` sets (memory stays bounded).

Episodes run in lockstep (every episode has ``episode_length`` steps): ``reset``, then ``episode_length`` calls of
``step``, then ``reset`` again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces

from pruning_env.engine.budget import budget_keep_counts_batch
from pruning_env.engine.plan import PruningPlan, top_k_positions
from pruning_env.envs.features import GLOBAL_FEATURES, assemble, dsfp_matrix, dsfp_names, dynamic_columns
from pruning_env.envs.measure import Measurement, StaticDsfp
from pruning_env.envs.surrogate import SurrogateData, SurrogatePruningEnv
from pruning_env.training.proxy import Signals

__all__ = ["SurrogateVectorEnv"]


class SurrogateVectorEnv:
    """``num_envs`` episodes of one surrogate env, stepped together with arrays (no per-agent dicts).

    Args:
        env: a registered surrogate env id (``pruning_env/VGG16-CIFAR10-w0.25-Surrogate-v1``), a
            :class:`SurrogatePruningEnv` (it becomes this env's: it is reset, and must not be stepped elsewhere), or
            a surrogate data set (:class:`SurrogateData` or its ``.npz``).
        num_envs: N, the episodes stepped at once.
        max_states: filter sets remembered per layer before a ``reset`` empties the tables.
        **kwargs: the env's settings (``macs_target``, ``reward``, ``rates``...) when ``env`` is an id or data.

    Attributes:
        env: the PettingZoo env it batches (its ``config``, spaces, ``layer_names``...; do not step it).
        single_observation_space, single_action_space: one agent's spaces (the PettingZoo env's).
        observation_space: ``Box`` of shape ``(N, L, F)``; action_space: ``MultiDiscrete`` ``(N, L)`` (or ``Box``
            ``(N, L)`` of rates with ``continuous=True``).
    """

    def __init__(self, env: str | Path | SurrogateData | SurrogatePruningEnv, num_envs: int, *,
                 max_states: int = 8192, **kwargs: Any) -> None:
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be an int >= 1 (episodes stepped at once), got {num_envs!r}")
        if isinstance(max_states, bool) or not isinstance(max_states, (int, np.integer)) or max_states < 1:
            raise ValueError(f"max_states must be an int >= 1 (filter sets remembered per layer), got {max_states!r}")
        self.env = _surrogate_env(env, kwargs)
        env, cfg = self.env, self.env.config
        self.num_envs, self.max_states = int(num_envs), int(max_states)
        self._parts = parts = env.batch_parts()
        self._names, self._orig = env.layer_names, parts.widths
        self._static_dsfp = parts.static_dsfp
        self._rates = np.asarray(cfg.rates, dtype=np.float64)
        agent = env.possible_agents[0]
        self.single_observation_space = env.observation_space(agent)
        self.single_action_space = env.action_space(agent)
        n, layers, obs_dim = self.num_envs, len(self._names), self.single_observation_space.shape[0]
        self.observation_space = spaces.Box(0.0, 1.0, (n, layers, obs_dim), np.float32)
        if cfg.continuous:
            self.action_space: spaces.Space = spaces.Box(0.0, float(self._rates.max()), (n, layers), np.float32)
        else:
            self.action_space = spaces.MultiDiscrete(np.full((n, layers), len(self._rates)))
        full = parts.full
        self._full_measure = env.measure(full)
        obs, infos = env.reset()
        self._obs0 = np.stack([obs[a] for a in env.possible_agents])
        self._info0 = {k: np.full(n, infos[agent][k]) for k in Measurement.info_keys()}
        self._row_names = tuple(self._static_dsfp.layer(0, full.keep[self._names[0]])[1].row)
        self._states = [_LayerStates(self._static_dsfp, i, full.keep[name], self._row_names)
                        for i, name in enumerate(self._names)]
        self._begin()  # before the first reset: the unpruned network (state(), plan())
        self._done = True

    # ------------------------------------------------------------------ the vector API

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Start N episodes at the unpruned network: ``(obs (N, L, F) float32, infos)``; ``seed`` seeds
        :attr:`action_space` (the episodes themselves are deterministic)."""
        if seed is not None:
            self.action_space.seed(int(seed))
        for states in self._states:
            if len(states) > self.max_states:
                states.clear()
        self._begin()
        self._done = False
        n = self.num_envs
        infos = {k: v.copy() for k, v in self._info0.items()}
        infos["rate"] = np.zeros((n, len(self._names)))
        return np.repeat(self._obs0[None], n, axis=0), infos

    def _begin(self) -> None:
        """Every episode at the unpruned network, step 0."""
        n = self.num_envs
        self._sid = np.zeros((n, len(self._names)), dtype=np.int64)
        self._counts = np.tile(self._orig, (n, 1))
        self._measured = {k: np.full(n, v) for k, v in self._full_measure.info().items()}
        self._step = 0

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """One step of every episode.

        Args:
            actions: ``(N, L)``: each agent's action index (or rate, with ``continuous=True``) per episode.

        Returns:
            ``(obs, rewards, terminated, truncated, infos)``: obs ``(N, L, F)`` float32; rewards ``(N,)`` float64
            (the team reward, every agent's); terminated, truncated ``(N,)`` bool; infos ``{key: (N,)}`` of the
            PettingZoo env's info keys (shared by the agents) and ``rate``: ``(N, L)``.
        """
        if self._done:
            raise RuntimeError("the episodes are over (episode_length steps); call reset() before step()")
        rates = self._parse(actions)
        cfg = self.env.config
        final = self._step + 1 >= cfg.episode_length
        target = cfg.budget_target
        if target is None:
            counts = np.minimum(self._counts, cfg.rule.keep_counts_unchecked(self._orig, rates))
        else:
            counts = budget_keep_counts_batch(self.env.macs_model, cfg.rule, self._counts, rates,
                                              target * self.env.base_macs, final=final,
                                              max_rate=float(self._rates.max()))
        for i, states in enumerate(self._states):  # the lowest-scoring current filters pruned (narrow_plan's rule)
            rows = np.flatnonzero(counts[:, i] < self._counts[:, i])
            sids = self._sid[:, i]
            for r, k in zip(rows.tolist(), counts[rows, i].tolist()):
                sids[r] = states.narrowed(int(sids[r]), k)
        self._counts = counts
        self._step += 1
        before, self._measured = self._measured, self._measure(counts)
        rewards = self._measured["objective"] - before["objective"]
        done = self._step >= cfg.episode_length
        self._done = done
        n = self.num_envs
        infos = {k: v.copy() for k, v in self._measured.items()}  # the caller's: the env keeps its own
        infos["rate"] = 1.0 - counts / self._orig
        return (self._observations(), rewards, np.full(n, done), np.zeros(n, dtype=bool), infos)

    def state(self) -> np.ndarray:
        """``(N, S)`` float32: each episode's global state, as the PettingZoo env's ``state()``."""
        m, progress = self._measured, self._step / self.env.config.episode_length
        whole = {"macs_ratio": m["macs_ratio"][:, None], "params_ratio": m["params_ratio"][:, None],
                 "acc_ratio": np.minimum(1.0, m["acc_ratio"])[:, None], "progress": np.full((self.num_envs, 1),
                                                                                          progress)}
        glob = assemble(whole, GLOBAL_FEATURES)[:, 0]
        obs = self._observations()
        return np.concatenate([obs.reshape(self.num_envs, -1), glob], axis=1).astype(np.float32)

    def plan(self, i: int) -> PruningPlan:
        """The current plan of episode ``i`` (e.g. to measure it on the real env)."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.num_envs:
            raise IndexError(f"episode index must be an int in [0, {self.num_envs}), got {i!r}")
        full = self._parts.full
        return PruningPlan._trusted({n: s.kept[int(k)] for n, s, k in zip(self._names, self._states,
                                                                          self._sid[int(i)])}, full.widths)

    def close(self) -> None:
        self.env.close()

    @property
    def current_step(self) -> int:
        return self._step

    # ------------------------------------------------------------------ internals

    def _parse(self, actions: Any) -> np.ndarray:
        """``(N, L)`` float64 rates of ``actions``; ``ValueError`` naming what is wrong before any work."""
        a = np.asarray(actions)
        shape = (self.num_envs, len(self._names))
        if a.shape == (*shape, 1):
            a = a[..., 0]
        if a.shape != shape:
            raise ValueError(f"actions must be an (N, L) = {shape} array (one action per episode and agent), got "
                             f"shape {a.shape}")
        if self.env.config.continuous:
            high = self.single_action_space.high[0]
            if not np.issubdtype(a.dtype, np.number) or a.dtype == bool:
                raise ValueError(f"continuous actions must be rates in [0, {high:.3g}], got dtype {a.dtype}")
            bad = ~(np.isfinite(a) & (a >= 0) & (a <= high + 1e-6))  # the PettingZoo env's bound, float for float
            if bad.any():
                at = tuple(int(x) for x in np.argwhere(bad)[0])
                raise ValueError(f"continuous actions must be rates in [0, {high:.3g}]; {int(bad.sum())} are not, "
                                 f"the first {a[at]!r} at (episode, agent) {at}")
            return a.astype(np.float64)
        if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"actions must be ints in [0, {len(self._rates) - 1}] (indices into the rates "
                             f"{self._rates.tolist()}), got dtype {a.dtype}")
        if (a < 0).any() or (a >= len(self._rates)).any():
            raise ValueError(f"actions must be ints in [0, {len(self._rates) - 1}] (indices into the rates "
                             f"{self._rates.tolist()}), got values in [{a.min()}, {a.max()}]")
        return self._rates[a]

    def _measure(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        """The infos of every row, ``{info key: (N,)}``: MACs and the model's signals in one call each, the ratios
        and the objective by the env's own record (:meth:`~pruning_env.envs.measure.PlanMeter.record`)."""
        env, parts = self.env, self._parts
        macs, params = env.macs_model.predict_batch(counts)
        pruned = np.flatnonzero((counts != self._orig).any(axis=1))
        predicted = env.surrogate_model.predict(counts[pruned], macs[pruned], params[pruned])
        base, proxy = parts.base_signals, env.config.proxy.proxy
        signals = [base] * len(counts)
        for j, r in enumerate(pruned.tolist()):
            signals[r] = Signals(acc=float(predicted["acc"][j]), kl=float(predicted["kl"][j]),
                                 ce=float(predicted["ce"][j]))
        records = [parts.record(None, s.acc, s.quality(proxy, base), int(m), int(p))
                   for s, m, p in zip(signals, macs.tolist(), params.tolist())]
        infos = [r.info() for r in records]
        return {k: np.array([i[k] for i in infos]) for k in Measurement.info_keys()}

    def _observations(self) -> np.ndarray:
        env = self.env
        keep = self._counts / self._orig
        m = self._measured
        dynamic = dynamic_columns(keep, self._parts.input_layer, m["macs_ratio"], m["acc_ratio"],
                                  self._step / env.config.episode_length, env.config.budget_target)
        cols = [s.arrays(self._sid[:, i]) for i, s in enumerate(self._states)]
        mat = dsfp_matrix(*(np.stack([c[j] for c in cols], axis=1) for j in range(3)))
        dsfp = {name: mat[..., j] for j, name in enumerate(dsfp_names(self._row_names, len(self._rates)))}
        return assemble({**self._parts.static, **dynamic, **dsfp}, self._parts.feature_names)


class _LayerStates:
    """The filter sets one layer has been met with, numbered (0: all filters), with what a step needs of each:
    the pruning order of its filters and its DSFP row, component sums and removed masses."""

    def __init__(self, static_dsfp: StaticDsfp, layer: int, full: tuple[int, ...], row_names: tuple[str, ...]) -> None:
        self.static_dsfp, self.layer, self.full, self.row_names = static_dsfp, layer, full, row_names
        self.clear()

    def clear(self) -> None:
        self.kept: list[tuple[int, ...]] = []
        self.order: list[np.ndarray] = []
        self.index: dict[tuple[int, ...], int] = {}
        self.next: dict[tuple[int, int], int] = {}
        self._rows = np.empty((0, 0))
        self._sums = np.empty((0, 3))
        self._mass = np.empty((0, 0))
        self._add(self.full)

    def __len__(self) -> int:
        return len(self.kept)

    def _add(self, kept: tuple[int, ...]) -> int:
        order, stats, removed = self.static_dsfp.layer(self.layer, kept)
        sid = len(self.kept)
        if sid == len(self._rows):  # grow the arrays (doubling)
            cap = max(16, 2 * sid)
            self._rows = _grown(self._rows, cap, len(self.row_names))
            self._sums = _grown(self._sums, cap, 3)
            self._mass = _grown(self._mass, cap, len(removed))
        self._rows[sid] = [stats.row[n] for n in self.row_names]  # by name, as combine_dsfp reads them
        self._sums[sid] = stats.sums
        self._mass[sid] = removed
        self.kept.append(kept)
        self.order.append(order.numpy())
        self.index[kept] = sid
        return sid

    def narrowed(self, sid: int, k: int) -> int:
        """The state after keeping the ``k`` highest-ordered filters of state ``sid`` (``k`` below its count)."""
        key = (sid, k)
        hit = self.next.get(key)
        if hit is None:
            kept = self.kept[sid]
            new = tuple(np.asarray(kept, dtype=np.int64)[top_k_positions(self.order[sid], k)].tolist())
            hit = self.index.get(new)
            if hit is None:
                hit = self._add(new)
            self.next[key] = hit
        return hit

    def arrays(self, sids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rows (N, R), sums (N, 3), masses (N, K))`` of the states ``sids``."""
        return self._rows[sids], self._sums[sids], self._mass[sids]


def _grown(a: np.ndarray, rows: int, cols: int) -> np.ndarray:
    out = np.empty((rows, cols))
    if len(a):
        out[:len(a)] = a
    return out


def _surrogate_env(env: Any, kwargs: dict[str, Any]) -> SurrogatePruningEnv:
    if isinstance(env, SurrogatePruningEnv):
        if kwargs:
            raise TypeError(f"settings {sorted(kwargs)} given with an env that is already made; make the env with "
                            "them, or pass its id")
        return env
    if isinstance(env, SurrogateData) or (isinstance(env, (str, Path)) and str(env).endswith(".npz")):
        return SurrogatePruningEnv(env, **kwargs)
    if isinstance(env, str):
        from pruning_env.envs.registry import list_envs, make

        if "Surrogate" not in env:
            raise ValueError(f"SurrogateVectorEnv batches surrogate envs; {env!r} is not one (their ids contain "
                             f"'Surrogate': {[i for i in list_envs() if 'Surrogate' in i]})")
        made = make(env, **kwargs)
        if not isinstance(made, SurrogatePruningEnv):
            raise ValueError(f"{env!r} does not make a SurrogatePruningEnv")
        return made
    raise TypeError(f"env must be a surrogate env id, a SurrogatePruningEnv or a surrogate data set, got "
                    f"{type(env).__name__}")
