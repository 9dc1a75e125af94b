"""The one search loop: an algorithm explores a pruning env until a budget of measured plans is spent.

``train_marl.py`` and ``benchmarks/marl.py`` both run :class:`Search`. The budget unit is
**plans measured**: distinct pruning plans whose accuracy the env measured for this search
(intermediate steps of an episode and greedy evaluations count; the unpruned network and
plans seen before do not). An episode is never cut, so a search may end up to
``episode_length - 1`` plans over its budget; the exact figure is reported.

Every plan measured is a point of the accuracy-vs-MACs picture (:func:`pareto_front`): the metrics of
its :class:`~pruning_env.envs.measure.Measurement` (:func:`search_point`), so a metric added to the
record is in every point. The *best plan* is the final plan of a training or greedy episode with the
highest validation objective (its metrics, episode, source and plan); :attr:`Search.top` keeps the
``keep_top`` best DISTINCT such plans, best first (the final selection's candidates,
:mod:`pruning_env.training.selection`). TensorBoard scalars use plans
measured as the global step, so algorithms with different episode lengths (AMC: one layer per step)
compare directly:
``charts/`` (return, objective, accuracy and MACs ratios, best objective), ``losses/``
(the algorithm's metrics whose names end in ``loss``), ``train/`` (its other metrics:
epsilon, buffer size, gradient steps, noise...) and ``eval/`` (greedy evaluations).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
from tqdm import tqdm

from pruning_env.core.config import SettingError, check_settings, option
from pruning_env.engine.plan import PruningPlan
from pruning_env.envs.env import FilterPruningEnv
from pruning_env.envs.measure import Measurement
from pruning_env.envs.views import SequentialPruningEnv

__all__ = ["Search", "SearchConfig", "algorithm_env", "algorithm_overrides", "check_algo_config", "pareto_front",
           "search_point"]


@dataclass
class SearchConfig:
    """The budget and rhythm of a search (shared by train_marl.py and benchmarks/marl.py)."""

    plans: int = option(300, "budget: distinct plans the env measures for the search (greedy evaluations "
                        "included, the unpruned network not)", min=1)
    episodes: int | None = option(None, "also stop after this many training episodes (none: the plan budget alone)",
                                      min=1)
    eval_every: int = option(10, "greedy evaluation every N training episodes (its plans count toward the budget)",
                             min=1)
    stall_episodes: int = option(100, "stop early after this many training episodes in a row without a new plan "
                                 "(e.g. DSFP-uniform has one plan per grid rate)", min=1)
    algo_config: str | None = option(None, "JSON of algorithm config overrides by algorithm (keyed by the name the "
                                     "run gives it, e.g. --algo), applied after the budget hints, e.g. "
                                     "'{\"qmix\": {\"lr\": 0.0005}}'; an entry for an algorithm the run does not "
                                     "run, an unknown setting or a value out of its range is refused before any work")

    def __post_init__(self) -> None:
        check_settings(self)
        self.algo_table()  # validates the JSON

    def overrides_for(self, algorithm: str) -> dict[str, Any]:
        """The ``algo_config`` entry of ``algorithm`` (``{}`` if none)."""
        return dict(self.algo_table().get(algorithm, {}))

    def algo_table(self) -> dict[str, dict[str, Any]]:
        """``algo_config`` parsed: ``{algorithm: {config field: value}}`` (``{}`` if none)."""
        if not self.algo_config:
            return {}
        try:
            table = json.loads(self.algo_config)
        except json.JSONDecodeError as exc:
            raise ValueError(f"algo_config is not valid JSON: {exc}") from None
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise ValueError("algo_config must be a JSON object {algorithm: {config field: value}}, "
                             "e.g. '{\"qmix\": {\"lr\": 0.0005}}'")
        for algo, fields in table.items():
            for key, value in fields.items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"--algo-config: {algo}.{key} must be a finite number, got {value}")
        return table


class _Algorithm(Protocol):
    """Everything the search layer reads of an algorithm: ``agents.Algorithm`` provides all of it (pruning_env
    does not import agents, so the contract is written here; ``tests/test_algorithms_api.py`` checks that the two
    agree). Every member is required and read directly, never with a default."""

    env_api: ClassVar[str]
    """The env the algorithm wants: ``"parallel"`` (the pruning env) or ``"sequential"`` (its
    :class:`SequentialPruningEnv` view); read on the class by :func:`algorithm_env`."""
    episodes_done: int
    """Training episodes finished, kept by ``train_episode`` (+1 per call); the prefetcher plans ahead from it."""
    config_cls: ClassVar[type]
    """The algorithm's config dataclass (its fields are the ``--algo-config`` keys; limits in their metadata);
    read on the class by :func:`check_algo_config`."""

    @classmethod
    def default_config(cls, **overrides: Any) -> Any:
        """A ``config_cls`` instance with ``overrides`` applied (raises ``TypeError`` on an unknown field)."""
        ...

    @classmethod
    def option_names(cls) -> tuple[frozenset[str], frozenset[str]]:
        """``(config fields, keyword-only constructor options)``: the keys an ``--algo-config`` entry may set."""
        ...

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Raise ``ValueError``/``TypeError`` for a config the algorithm cannot run that field limits allow."""
        ...

    @classmethod
    def budget_overrides(cls, plans: int, episode_length: int) -> dict[str, Any]:
        """Config overrides fitting the exploration schedule to a budget of ``plans`` (``{}``: nothing to fit)."""
        ...

    def train_episode(self) -> Any:
        """One exploring training episode, counted in ``episodes_done``; returns its ``EpisodeLog``."""
        ...

    def evaluate(self) -> Any:
        """One greedy episode, no learning; returns its ``EpisodeLog``."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly."""
        ...

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...

    def upcoming_actions(self, episodes: int, steps: int) -> list[list[dict[str, Any]]]:
        """The joint actions of the next ``episodes`` training episodes when known ahead, else ``[]`` (a hint for
        the prefetcher: it must leave the algorithm unchanged)."""
        ...

    def upcoming_policies(self, episodes: int) -> list[Callable[[], Callable[[dict[str, Any], dict[str, dict]],
                                                                             dict[str, Any]]]]:
        """Factories of the exact policies of the next training episodes when fixed now, else ``[]`` (a hint for
        the prefetcher, like :meth:`upcoming_actions`)."""
        ...


def algorithm_env(algorithm_cls: type[_Algorithm], env: FilterPruningEnv) -> Any:
    """The env ``algorithm_cls`` wants, by its ``env_api``: the parallel env, or the AMC-style sequential view."""
    api = algorithm_cls.env_api
    if api == "parallel":
        return env
    if api == "sequential":
        return SequentialPruningEnv(env)
    raise ValueError(f"{algorithm_cls.__name__}.env_api = {api!r}; the pruning env offers 'parallel' and 'sequential'")


def algorithm_overrides(algorithm_cls: type[_Algorithm], name: str, cfg: SearchConfig,
                        episode_length: int) -> dict[str, Any]:
    """Config overrides of an algorithm for a search: its own budget hints, then ``cfg.algo_config``.

    The ``algo_config`` entry is checked (:func:`_check_algorithm_config`): a ``ValueError`` naming
    ``--algo-config`` and the setting, instead of a ``TypeError`` or an optimiser's complaint later.
    """
    over = dict(algorithm_cls.budget_overrides(cfg.plans, episode_length))
    user = cfg.overrides_for(name)
    _check_algorithm_config(algorithm_cls, name, over, user)
    over.update(user)
    return over


def _check_algorithm_config(algorithm_cls: type[_Algorithm], name: str, hints: dict[str, Any],
                            user: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming ``--algo-config`` unless ``user`` (the ``algo_config`` entry of the algorithm
    ``name``) sets only its config's fields (or keyword options of its constructor) to valid values.

    The values are checked by the one rule of every config (:func:`~pruning_env.core.config.check_settings`: the
    right type, finite, inside the ``min``/``max``/``choices`` its fields declare) on the config the algorithm
    would be built with (``hints`` then ``user``), then by the class's own ``check_config`` (what field limits
    cannot say, e.g. a mixer's keyword arguments).
    """
    fields, init = algorithm_cls.option_names()
    unknown = sorted(set(user) - fields - init)
    if unknown:
        raise ValueError(f"--algo-config: {name} has no setting {', '.join(unknown)}; its settings: "
                         f"{', '.join(sorted(fields | init)) or 'none'}")
    try:
        config = algorithm_cls.default_config(**{k: v for k, v in {**hints, **user}.items() if k in fields})
        check_settings(config)
        algorithm_cls.check_config(config)
    except SettingError as exc:
        raise ValueError(f"--algo-config: {name}.{exc.name} {exc.reason}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--algo-config: {name}: {exc}") from None


def check_algo_config(cfg: SearchConfig, algorithms: dict[str, type[_Algorithm]], episode_length: int) -> None:
    """Before any work: every entry of ``cfg.algo_config`` names an algorithm of ``algorithms`` (``{name the run
    gives it: class}``, those the run runs) and passes :func:`_check_algorithm_config`; raises ``ValueError``."""
    unused = sorted(set(cfg.algo_table()) - set(algorithms))
    if unused:
        raise ValueError(f"--algo-config: {', '.join(map(repr, unused))} is not an algorithm this run runs, so its "
                         f"settings would be ignored; entries must name one of: {', '.join(algorithms)}")
    for name, cls in algorithms.items():
        algorithm_overrides(cls, name, cfg, episode_length)
def search_point(measurement: Measurement, order: int) -> dict[str, Any]:
    """A search point: the measurement's metrics (floats rounded to 6 digits, far below the measurement noise,
    to keep results files small; the exact counts as they are) and ``order``, its rank among the points."""
    values = {k: round(v, 6) if isinstance(v, float) else v for k, v in measurement.to_dict().items()}
    return {**values, "order": order}


def pareto_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plans not dominated in (higher ``acc_ratio``, lower ``macs_ratio``), sorted by MACs."""
    front: list[dict[str, Any]] = []
    for p in sorted(points, key=lambda q: (q["macs_ratio"], -q["acc_ratio"])):
        if not front or p["acc_ratio"] > front[-1]["acc_ratio"]:
            front.append(p)
    return front


class Search:
    """One algorithm searching one env, with best-plan tracking, logging and an exact, resumable state.

    Args:
        algorithm: built on ``env`` (or on its view, see :func:`algorithm_env`).
        env: the parallel pruning env the algorithm's episodes run on.
        cfg: budget and rhythm.
        writer: a TensorBoard ``SummaryWriter`` (optional).
        progress: show a progress bar (unit: plans).
        desc: the progress bar's label.
        keep_top: how many of the best distinct final plans :attr:`top` keeps (with their plans).
        prefetch: called with the algorithm before every training episode, e.g. a
            :class:`pruning_env.search.parallel.Prefetcher` measuring its next episodes' plans on parallel
            workers (a speed-up only: the search's results are the same without it).
    """

    def __init__(self, algorithm: _Algorithm, env: FilterPruningEnv, cfg: SearchConfig, *, writer: Any = None,
                 progress: bool = True, desc: str = "search", prefetch: Callable[[Any], None] | None = None,
                 keep_top: int = 1) -> None:
        if isinstance(keep_top, bool) or not isinstance(keep_top, int) or keep_top < 1:
            raise ValueError(f"keep_top must be an integer >= 1 (best plans kept), got {keep_top!r}")
        self.keep_top = keep_top
        self.algorithm, self.env, self.cfg = algorithm, env, cfg
        self.prefetch = prefetch
        self.writer, self.progress, self.desc = writer, progress, desc
        self.episodes = 0
        self.greedy_evaluations = 0
        self.stall = 0
        self.exhausted = False
        self.seconds = 0.0
        self.best: dict[str, Any] | None = None
        self.top: list[dict[str, Any]] = []  # the keep_top best distinct final plans, best first (with "plan")
        self.points: list[dict[str, Any]] = []  # every plan measured, in the order found
        self.curve: list[dict[str, Any]] = []  # one entry per episode (training or greedy)
        self.seen: set[str] = {m.plan.key() for m in env.measured_plans()}  # the unpruned network is no candidate

    # ------------------------------------------------------------------ state
    @property
    def plans_used(self) -> int:
        """Distinct plans measured for this search so far (the budget spent)."""
        return len(self.points)

    @property
    def done(self) -> bool:
        """Whether the budget (or the episode cap) is spent or the search stalled."""
        cap = self.cfg.episodes
        return self.exhausted or self.plans_used >= self.cfg.plans or (cap is not None and self.episodes >= cap)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (the algorithm's state included)."""
        return {"algorithm": self.algorithm.state_dict(), "episodes": self.episodes,
                "greedy_evaluations": self.greedy_evaluations, "stall": self.stall, "exhausted": self.exhausted,
                "seconds": self.seconds, "best": self.best, "top": self.top, "points": self.points, "curve": self.curve,
                "seen": sorted(self.seen)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.algorithm.load_state_dict(d["algorithm"])
        self.episodes, self.greedy_evaluations, self.stall = d["episodes"], d["greedy_evaluations"], d["stall"]
        self.exhausted, self.seconds, self.best = d["exhausted"], d["seconds"], d["best"]
        self.points, self.curve, self.seen = list(d["points"]), list(d["curve"]), set(d["seen"])
        # a state saved before the top plans were kept knows its best one only
        self.top = list(d.get("top", [self.best] if self.best is not None else []))[:self.keep_top]

    def result(self) -> dict[str, Any]:
        """The search's record: budget spent, best plan (with its plan dict), every point and the curve."""
        return {"plans_used": self.plans_used, "episodes": self.episodes,
                "greedy_evaluations": self.greedy_evaluations, "exhausted": self.exhausted,
                "seconds": round(self.seconds, 2), "best": self.best, "points": self.points, "curve": self.curve}

    # ------------------------------------------------------------------ loop
    def run(self, *, after_episode: Any = None) -> None:
        """Run training (and greedy) episodes until :attr:`done`; ``after_episode()`` is called after each
        finished training episode (e.g. to save :meth:`state_dict`: an interruption then resumes from there)."""
        bar = tqdm(total=self.cfg.plans, initial=min(self.plans_used, self.cfg.plans), desc=self.desc, unit="plan",
                   disable=not self.progress, file=sys.stderr)
        try:
            while not self.done:
                before = self.plans_used
                t0 = time.perf_counter()
                if self.prefetch is not None:
                    self.prefetch(self.algorithm)
                log = self.algorithm.train_episode()
                seconds = time.perf_counter() - t0
                self.episodes += 1
                self._record(log, "train", seconds)
                if self.episodes % self.cfg.eval_every == 0 and self.plans_used < self.cfg.plans:
                    t0 = time.perf_counter()
                    self._record(self.algorithm.evaluate(), "greedy", time.perf_counter() - t0)
                    self.greedy_evaluations += 1
                self.stall = self.stall + 1 if self.plans_used == before else 0
                if self.stall >= self.cfg.stall_episodes:
                    self.exhausted = True
                if after_episode is not None:
                    after_episode()
                bar.update(min(self.plans_used, self.cfg.plans) - bar.n)
                if self.best is not None:
                    bar.set_postfix(best=f"{self.best['objective']:.3f}", macs=f"{self.best['macs_ratio']:.2f}")
        finally:
            bar.close()
            if self.writer is not None:
                self.writer.flush()

    def _record(self, log: Any, source: str, seconds: float) -> None:
        env = self.env
        for m in env.measured_plans():
            if m.plan.key() not in self.seen:
                self.seen.add(m.plan.key())
                self.points.append(search_point(m, len(self.points)))
        self.seconds += seconds
        final = env.measure(env.plan)  # the episode's final plan (cached: costs nothing)
        cand: dict[str, Any] = {**final.to_dict(), "episode": self.episodes, "source": source,
                                "plans_used": self.plans_used}
        if self.best is None or cand["objective"] > self.best["objective"]:
            self.best = {**cand, "plan": env.plan.to_dict()}
        self._keep_top(cand, env.plan.key(), env.plan.to_dict())
        entry = {"plans": self.plans_used, "episode": self.episodes, "source": source,
                 "objective": cand["objective"], "best": self.best["objective"], "return": float(log.episode_return),
                 "acc_ratio": cand["acc_ratio"], "macs_ratio": cand["macs_ratio"]}
        self.curve.append(entry)
        self._log(log, entry, seconds)

    def _keep_top(self, cand: dict[str, Any], key: str, plan: dict[str, Any]) -> None:
        """Insert a final plan into :attr:`top` unless already there (its measurement is cached: same objective);
        ties keep the plan found first, so the list depends only on the search."""
        if any(PruningPlan.from_dict(t["plan"]).key() == key for t in self.top):
            return
        if len(self.top) >= self.keep_top and cand["objective"] <= self.top[-1]["objective"]:
            return
        self.top.append({**cand, "plan": plan})
        self.top.sort(key=lambda t: -t["objective"])  # stable: among equals the earlier stays first
        del self.top[self.keep_top:]

    def _log(self, log: Any, entry: dict[str, Any], seconds: float) -> None:
        w, step = self.writer, self.plans_used
        if w is None:
            return
        if entry["source"] == "greedy":
            for k in ("objective", "acc_ratio", "macs_ratio"):
                w.add_scalar(f"eval/{k}", entry[k], step)
            return
        w.add_scalar("charts/episode_return", entry["return"], step)
        for k in ("objective", "acc_ratio", "macs_ratio"):
            w.add_scalar(f"charts/{k}", entry[k], step)
        w.add_scalar("charts/best_objective", entry["best"], step)
        w.add_scalar("train/episodes", self.episodes, step)
        w.add_scalar("train/steps_per_second", log.length / max(seconds, 1e-9), step)
        for k, v in log.metrics.items():
            w.add_scalar(("losses/" if k.endswith("loss") else "train/") + k, v, step)
        w.add_histogram("charts/layer_rates", np.asarray([1.0 - r for r in self.env.plan.keep_ratios().values()]),
                        step)
