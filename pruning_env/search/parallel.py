"""Scale out on Ray: plans measured by N env replicas in parallel, with results that never depend on N.

Install the extra first: ``pip install torch==2.13.0 -e ".[ray]"`` (Ray 2.60.0). Nothing else of the package
imports Ray; this module imports it only when a :class:`PlanEvaluator` or a :func:`ray_session` with
``workers > 1`` is made, and says which extra to install when it is missing.

Design
------
* **The plan evaluator** (:class:`PlanEvaluator`): N Ray actors, each a :class:`FilterPruningEnv` built from
  the driver env's model, data splits and config, which are put into the object store ONCE (``ray.put``) and
  handed to every actor (and to a restarted one) by reference. ``measure(plans)`` takes a batch, keeps every
  worker busy with one plan at a time, and returns the measurements in submission order. A driver-side store
  keyed by ``plan.key()`` is the shared cache: a plan any worker measured is never sent again.
* **The env logic stays in one place.** The driver env is the only env the algorithm and the search see. Its
  ``measurement_source`` hook (the one public hook this needs in ``envs/env.py``) looks a missed plan up in
  the evaluator's store before measuring it itself, so an ``env.step`` whose plan a worker measured is a
  cache hit with the very values the driver would have computed (measurement is deterministic). The driver
  env's cache, its order and its ``num_evaluations`` are therefore exactly those of a serial run, and so are
  the search's budget, points, best plan and report, for any N, provided every measurement runs with the same
  torch thread count (float reductions on 1 and 2 threads differ in the last bits, which can flip near-tied
  filter rankings: compare a serial run with ``OMP_NUM_THREADS=1`` to ``--worker-threads 1``).
* **Which plans to measure ahead** (:class:`Prefetcher`): before a training episode the search asks the
  algorithm what its next ``lookahead`` training episodes will do, through two hooks of the algorithm contract
  (``_Algorithm`` in :mod:`pruning_env.search.loop`; ``agents.Algorithm``'s defaults answer ``[]``, "not known")
  that use the PettingZoo API only, read with ``episodes_done``: ``upcoming_actions`` (joint actions; random search and
  the DSFP-uniform sweep, whose actions do not depend on observations) or ``upcoming_policies`` (factories of
  the exact policies; QMIX/VDN/IQL with ``episodes_per_snapshot = B > 1``: pymarl's parallel runner, B episodes
  of one policy snapshot, each exploring with its own random stream, learned from after the last one). A plan
  of step t depends on the measured scores of step t - 1, so those episodes are replayed in lockstep on a
  private *probe* env whose misses are collected instead of measured: round t measures every episode's step-t
  plan in one parallel batch. B is an algorithm setting (results depend on it, never on N); the lookahead is a
  speed setting only: a plan measured ahead but never visited costs worker time, never a budget unit.
* **Serial**: QMIX/VDN/IQL with ``episodes_per_snapshot = 1`` (the default: a policy changes after every
  episode) and AMC (the sequential view; its DDPG acts on observations and learns every step) measure in the
  driver, as without workers.
* **Faults**: actors restart on death (``max_restarts=-1``); a plan whose worker died is re-queued (to any
  worker) up to ``max_retries`` times, so a killed worker costs time only.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pruning_env.core.config import check_settings, option
from pruning_env.engine.plan import PruningPlan
from pruning_env.envs.config import EnvConfig
from pruning_env.envs.env import FilterPruningEnv
from pruning_env.envs.measure import Measurement

if TYPE_CHECKING:
    from pruning_env.search.loop import _Algorithm

__all__ = ["RAY_EXTRA", "PlanEvaluator", "Prefetcher", "WorkersConfig", "ray_session", "require_ray", "scale_out"]

RAY_EXTRA = 'pip install torch==2.13.0 -e ".[ray]"'
"""The install command of the optional Ray extra (named in every 'Ray missing' error)."""

_ADDRESS = re.compile(r"^(auto|(ray://)?[A-Za-z0-9_.\-]+:\d{1,5})$")


@dataclass
class WorkersConfig:
    """Parallel plan measurement on Ray (nested whole in train_marl.py's and benchmarks.marl's configs)."""

    workers: int = option(1, "plan-measuring workers (Ray actors); 1: no Ray, everything in this process as "
                          "before; results do not depend on it", min=1, run_only=True)
    ray_address: str | None = option(None, "Ray cluster to join: auto (the running one, e.g. after `ray start "
                                     "--head`), host:port or ray://host:port; none: start a local Ray with "
                                     "--workers CPUs and stop it at the end", run_only=True)
    worker_threads: int | None = option(None, "torch CPU threads per worker (default: this machine's cores / "
                                        "--workers, at least 1, so cores are not oversubscribed; 1 on a cluster)",
                                        min=1, run_only=True)
    lookahead: int | None = option(None, "training episodes whose plans are measured ahead in one parallel batch "
                                   "(default: 2 x --workers; a speed setting, never changes results)", min=1,
                                   run_only=True)

    def __post_init__(self) -> None:
        check_settings(self)
        if self.ray_address is not None and not _ADDRESS.match(self.ray_address):
            raise ValueError(f"--ray-address {self.ray_address!r} is not a Ray address: give auto, host:port or "
                             "ray://host:port (e.g. 10.0.0.5:6379)")
        if self.ray_address is not None and self.workers == 1:
            raise ValueError("--ray-address needs --workers >= 2 (with one worker nothing runs on Ray)")

    @property
    def enabled(self) -> bool:
        """Whether this run uses Ray (``workers > 1``)."""
        return self.workers > 1

    def check(self) -> None:
        """Raise ``ValueError`` (naming the extra) when the run needs Ray and it is not installed."""
        if self.enabled:
            try:
                require_ray()
            except ImportError as exc:
                raise ValueError(str(exc)) from None

    def threads(self) -> int:
        """Torch threads per worker: ``worker_threads``, else cores / workers locally, 1 on a cluster."""
        if self.worker_threads is not None:
            return self.worker_threads
        return 1 if self.ray_address else max(1, (os.cpu_count() or 1) // self.workers)

    def episodes_ahead(self) -> int:
        """Training episodes measured ahead per batch (``lookahead``, default 2 x workers)."""
        return self.lookahead if self.lookahead is not None else 2 * self.workers


def require_ray() -> Any:
    """The ``ray`` module, or ``ImportError`` saying how to install the extra."""
    try:
        import ray
    except ImportError:
        raise ImportError(f"--workers > 1 runs on Ray, which is not installed: {RAY_EXTRA} (Ray 2.60.0), or run "
                          "with --workers 1") from None
    return ray


@contextlib.contextmanager
def ray_session(cfg: WorkersConfig) -> Iterator[Any]:
    """Ray for the run: nothing with one worker (yields None); else join ``ray_address`` or start a local Ray with
    ``workers`` CPUs, yield the ``ray`` module, and shut down what was started here at the end (also on Ctrl-C).
    An already initialised Ray (e.g. a test's) is used as it is and left running."""
    if not cfg.enabled:
        yield None
        return
    ray = require_ray()
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            if cfg.ray_address:
                ray.init(address=cfg.ray_address, **kwargs)
            else:
                ray.init(num_cpus=cfg.workers, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"join the Ray cluster at --ray-address {cfg.ray_address}" if cfg.ray_address else "start Ray"
            raise RuntimeError(f"cannot {where}: {exc}".rstrip() + " (is `ray start --head` running there? "
                               "without --ray-address a local Ray is started)") from None
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


class _Worker:
    """One env replica in a Ray actor: measures plans (the class is made remote in :class:`PlanEvaluator`)."""

    def __init__(self, model: torch.nn.Module, splits: Any, config: EnvConfig, threads: int) -> None:
        torch.set_num_threads(threads)
        self.env = FilterPruningEnv(model, splits, config)

    def measure(self, plan: PruningPlan) -> tuple[Measurement, float]:
        """``(env.measure(plan), seconds it took here)``."""
        t0 = time.perf_counter()
        record = self.env.measure(plan)
        return record, time.perf_counter() - t0

    def pid(self) -> int:
        return os.getpid()


class PlanEvaluator:
    """N replicas of ``env`` as Ray actors measuring batches of plans, with one shared driver-side cache.

    Args:
        env: the driver env; its ``base_model``, ``splits`` and ``config`` are shipped once via the object store.
        workers: number of actors (each asks Ray for one CPU).
        threads: torch threads per actor.
        max_retries: times a plan is re-queued after its worker died, before giving up (a worker that is only
            restarting, ``ActorUnavailableError``, costs a pause and no try, for up to ``restart_timeout_s``).
        ready_timeout: seconds the workers may take to start (each builds its env replica).
        cpu_wait: seconds to wait for free CPUs (those of actors just closed come back after a moment).
        inflight_per_worker: plans queued on each actor at once; with 2 (the default) the next plan is already
            waiting when a worker returns a result, so no worker idles through the driver's round trip.

    Attributes: ``measured`` (plans the workers measured), ``worker_seconds`` (their measuring time, summed),
    ``requeued`` (plans re-queued after a worker died).
    """

    def __init__(self, env: FilterPruningEnv, workers: int, *, threads: int = 1, max_retries: int = 3,
                 ready_timeout: float = 600.0, cpu_wait: float = 15.0, inflight_per_worker: int = 2) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if inflight_per_worker < 1:
            raise ValueError(f"inflight_per_worker must be >= 1, got {inflight_per_worker}")
        self.inflight_per_worker = inflight_per_worker
        ray = require_ray()
        if not ray.is_initialized():
            raise RuntimeError("PlanEvaluator needs a running Ray: use it inside pruning_env.search.parallel."
                               "ray_session(...) or call ray.init() first")
        self._ray = ray
        self.max_retries = max_retries
        self.restart_timeout_s = 600.0  # how long restarting workers may stay unavailable before the search fails
        self._unavailable_since: float | None = None
        self._pause = 0.25
        self.measured = 0
        self.worker_seconds = 0.0
        self.requeued = 0
        self._store: dict[str, Measurement] = {}
        deadline = time.monotonic() + cpu_wait
        while (free := ray.available_resources().get("CPU", 0.0)) < workers and time.monotonic() < deadline:
            time.sleep(0.2)
        if free < workers:  # actors that cannot be placed would wait forever
            raise RuntimeError(f"{workers} workers need {workers} free CPUs in the Ray cluster, which has {free:g} "
                               "free; lower --workers, close other evaluators (PlanEvaluator.close) or add nodes")
        remote = ray.remote(num_cpus=1, max_restarts=-1)(_Worker)
        # Put once: every actor (and every restart) receives the same object-store copies by reference.
        self._model_ref, self._splits_ref = ray.put(env.base_model), ray.put(env.splits)
        self.actors = [remote.remote(self._model_ref, self._splits_ref, env.config, threads) for _ in range(workers)]
        try:
            ray.get([a.pid.remote() for a in self.actors], timeout=ready_timeout)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise RuntimeError(f"the {workers} workers did not start within {ready_timeout:g} s (building an env "
                               "replica each); see `ray status` and the workers' logs") from None

    def __len__(self) -> int:
        return len(self.actors)

    def source(self, plan: PruningPlan) -> Measurement | None:
        """The stored measurement of ``plan`` or None: an env's ``measurement_source``."""
        return self._store.get(plan.key())

    def measure(self, plans: list[PruningPlan]) -> list[Measurement]:
        """Measurements of ``plans`` (``FilterPruningEnv.measure`` records) in submission order; plans measured
        before, or twice in the batch, are measured once."""
        ray = self._ray
        keys = [p.key() for p in plans]
        todo: dict[str, PruningPlan] = {}
        for key, plan in zip(keys, plans):
            if key not in self._store:
                todo.setdefault(key, plan)
        queue = deque((key, plan, 0) for key, plan in todo.items())
        # one slot per plan an actor may hold; interleaved, so a small batch spreads over all workers
        idle = deque(w for _ in range(self.inflight_per_worker) for w in range(len(self.actors)))
        inflight: dict[Any, tuple[str, PruningPlan, int, int]] = {}
        while queue or inflight:
            while queue and idle:
                key, plan, tries = queue.popleft()
                worker = idle.popleft()
                inflight[self.actors[worker].measure.remote(plan)] = (key, plan, tries, worker)
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                key, plan, tries, worker = inflight.pop(ref)
                idle.append(worker)
                try:
                    record, seconds = ray.get(ref)
                except ray.exceptions.ActorUnavailableError as exc:
                    # the actor is restarting (rebuilding its env, slow on a busy machine): not the plan's fault;
                    # wait with a growing pause and re-queue, giving up only after restart_timeout_s in all
                    waited = self._unavailable_wait(exc)
                    self.requeued += 1
                    queue.appendleft((key, plan, tries))
                    time.sleep(waited)
                    continue
                except ray.exceptions.RayActorError as exc:
                    if tries >= self.max_retries:
                        raise RuntimeError(f"a plan failed on {tries + 1} workers in a row (the last: {exc}); "
                                           "check the workers' logs (ray logs) for the cause") from None
                    self.requeued += 1
                    queue.appendleft((key, plan, tries + 1))  # the actor restarts; any worker may take it
                    continue
                self._unavailable_since = None
                self._store[key] = record
                self.measured += 1
                self.worker_seconds += seconds
        return [self._store[key] for key in keys]

    def _unavailable_wait(self, exc: Exception) -> float:
        """Seconds to pause before re-queuing a plan whose worker is restarting (0.25 s doubling to 8 s);
        ``RuntimeError`` once workers have been unavailable for ``restart_timeout_s`` in a row."""
        now = time.monotonic()
        if self._unavailable_since is None:
            self._unavailable_since, self._pause = now, 0.25
        elif now - self._unavailable_since > self.restart_timeout_s:
            raise RuntimeError(f"Ray workers stayed unavailable for {self.restart_timeout_s:.0f} s (the last error: "
                               f"{exc}); check the workers' logs (ray logs) for the cause") from None
        else:
            self._pause = min(8.0, 2 * self._pause)
        return self._pause

    def worker_pids(self) -> list[int]:
        """Process ids of the actors (for fault tests); waits for restarting ones (up to ``restart_timeout_s``)."""
        ray, deadline, pids = self._ray, time.monotonic() + self.restart_timeout_s, []
        for actor in self.actors:
            pause = 0.25
            while True:
                try:
                    pids.append(ray.get(actor.pid.remote()))
                    break
                except ray.exceptions.ActorUnavailableError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(pause)
                    pause = min(8.0, 2 * pause)
        return pids

    def close(self) -> None:
        """Stop the actors (the store stays readable)."""
        for actor in self.actors:
            self._ray.kill(actor, no_restart=True)
        self.actors = []

    def __enter__(self) -> PlanEvaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Unmeasured(Exception):  # a control-flow signal of the probe env, not an error
    def __init__(self, plan: PruningPlan) -> None:
        super().__init__("plan not measured yet")
        self.plan = plan


class Prefetcher:
    """Measures the plans of an algorithm's next training episodes ahead, in parallel (see the module docs).

    Installs ``evaluator.source`` as ``env.measurement_source``; call it with the algorithm before each training
    episode (``Search(prefetch=...)`` does). ``lookahead``: training episodes per batch.
    """

    def __init__(self, env: FilterPruningEnv, evaluator: PlanEvaluator, lookahead: int) -> None:
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, got {lookahead}")
        self.env, self.evaluator, self.lookahead = env, evaluator, lookahead
        env.measurement_source = evaluator.source
        # A private replica on the driver that replays episodes on stored measurements and reports its first miss.
        self.probe = FilterPruningEnv(env.base_model, env.splits, env.config, device=env.device)
        self.probe.measurement_source = self._probe_source
        self._covered = 0  # training episodes done when the last batch ends

    def __call__(self, algorithm: _Algorithm) -> None:
        done = int(algorithm.episodes_done)
        if done < self._covered:
            return
        episodes: list[Any] = list(algorithm.upcoming_actions(self.lookahead, self.env.config.episode_length))
        if not episodes:
            episodes = list(algorithm.upcoming_policies(self.lookahead))
        self._covered = done + max(1, len(episodes))
        if episodes:
            self.prefetch(episodes)

    def prefetch(self, episodes: list[Any]) -> int:
        """Measure every plan the ``episodes`` visit from ``reset``, each a joint-action sequence or a factory of a
        ``policy(obs, infos) -> actions``; returns the rounds (round t measures all episodes' first unmeasured
        plans in one batch)."""
        pending, rounds = list(episodes), 0
        while pending:
            missing: dict[str, PruningPlan] = {}
            waiting = []
            for actions in pending:
                plan = self._first_missing(actions)
                if plan is not None:
                    missing.setdefault(plan.key(), plan)
                    waiting.append(actions)
            if missing:
                self.evaluator.measure(list(missing.values()))
                rounds += 1
            pending = waiting
        return rounds

    def _first_missing(self, episode: Any) -> PruningPlan | None:
        probe = self.probe
        obs, infos = probe.reset()
        try:
            if callable(episode):  # a policy factory: a fresh policy replays the episode from its first step
                policy = episode()
                while probe.agents:
                    obs, _, _, _, infos = probe.step(policy(obs, infos))
            else:
                for joint in episode:
                    if not probe.agents:
                        break
                    probe.step(joint)
        except _Unmeasured as miss:
            return miss.plan
        except (ValueError, TypeError):  # a hint the env rejects is no hint: those plans are measured when played
            return None
        return None

    def _probe_source(self, plan: PruningPlan) -> Measurement:
        record = self.evaluator.source(plan)
        if record is None:
            raise _Unmeasured(plan)
        return record


def scale_out(search: Any, cfg: WorkersConfig, evaluator: PlanEvaluator | None = None) -> PlanEvaluator | None:
    """Give ``search`` (a :class:`~pruning_env.search.Search`) parallel plan measurement when ``cfg.workers > 1``
    (inside a :func:`ray_session`); returns the evaluator (None with one worker: the search stays serial).

    ``evaluator``: reuse one made for an env of the SAME model, data and config (its store then serves every
    search of that problem: a plan measured for one is never measured again for another); else a new one.
    """
    if not cfg.enabled:
        return None
    if evaluator is None:
        evaluator = PlanEvaluator(search.env, cfg.workers, threads=cfg.threads())
    search.prefetch = Prefetcher(search.env, evaluator, cfg.episodes_ahead())
    return evaluator
