"""The Algorithm plug-in contract: registry, env APIs, budget hints, metric names, one-episode
API, exact resume, determinism, and what ``import agents`` exports."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import io
import math
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

import agents
import agents.registry as registry
from agents import (
    Algorithm,
    EpisodeLog,
    Mixer,
    QMIXConfig,
    get_algorithm,
    list_algorithms,
    make_algorithm,
    register,
    register_mixer,
)
from agents.baselines import RandomSearch
from tests.matrix_game import MatrixGameEnv


class ToySequentialEnv(gym.Env):
    """AMC-style sequential view for tests: one layer per step, keep ratio in [0, 1].

    Observation: (step / n_layers, previous action, 1 - step / n_layers). Reward 0 until
    the last layer, then ``-mean((a_t - target_t)^2)`` with fixed per-layer targets.
    With ``layer_names`` it exposes them as ``possible_agents``, as the pruning env's
    sequential view does.
    """

    def __init__(self, n_layers: int, layer_names: list[str] | None = None) -> None:
        self.n_layers = n_layers
        if layer_names is not None:
            self.possible_agents = list(layer_names)
        self.targets = np.linspace(0.2, 0.8, n_layers)
        self.observation_space = gym.spaces.Box(0.0, 1.0, (3,), np.float32)
        self.action_space = gym.spaces.Box(0.0, 1.0, (1,), np.float32)

    def _obs(self, prev: float) -> np.ndarray:
        frac = self.t / self.n_layers
        return np.array([frac, prev, 1.0 - frac], dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.t, self.actions = 0, []
        return self._obs(0.0), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        assert self.action_space.contains(action), action
        self.actions.append(float(action[0]))
        self.t += 1
        done = self.t == self.n_layers
        reward = -float(np.mean((np.array(self.actions) - self.targets) ** 2)) if done else 0.0
        return self._obs(float(action[0])), reward, done, False, {"plan": list(self.actions)} if done else {}


ALL = ["qmix", "vdn", "iql", "amc", "random", "dsfp-uniform"]
SMALL: dict[str, dict[str, Any]] = {
    "qmix": dict(learning_starts=2, batch_size=4, updates_per_episode=2, eps_anneal_steps=20, target_update_interval=3),
    "qmix-variant": dict(
        agent_net="gru", td_lambda=0.6, optimizer="rmsprop", target_tau=0.05,
        learning_starts=2, batch_size=4, updates_per_episode=2, eps_anneal_steps=20, buffer_size=5,
    ),
    "vdn": dict(learning_starts=2, batch_size=4, eps_anneal_steps=20),
    "iql": dict(learning_starts=2, batch_size=4, eps_anneal_steps=20),
    "amc": dict(
        warmup_episodes=2, batch_size=8, actor_hidden=(32, 32), critic_hidden=(32, 32),
        buffer_size=20,
    ),
    "random": {},
    "dsfp-uniform": {},
}
CASES = [*ALL, "qmix-variant"]
LOSSES = {"qmix": {"td_loss"}, "vdn": {"td_loss"}, "iql": {"td_loss"}, "amc": {"actor_loss", "critic_loss"},
          "random": set(), "dsfp-uniform": set()}
"""The metrics each algorithm reports as losses (keys ending in "loss" go to TensorBoard's losses/)."""


def build(case: str, seed: int = 0) -> Algorithm:
    """The algorithm on a 3-agent, 3-step game, in the API its class asks for (no name check)."""
    name = case.removesuffix("-variant")
    if get_algorithm(name).env_api == "sequential":
        env: Any = ToySequentialEnv(3, layer_names=["agent_0", "agent_1", "agent_2"])
    else:
        env = MatrixGameEnv(n_agents=3, n_actions=4, n_steps=3)
    return make_algorithm(name, env, seed=seed, **SMALL[case])


def as_plain(log: EpisodeLog) -> dict[str, Any]:
    return dataclasses.asdict(log)


def run(algo: Algorithm, n: int) -> list[dict[str, Any]]:
    logs = [as_plain(algo.train_episode()) for _ in range(n)]
    return [*logs, as_plain(algo.evaluate())]


def test_registry_lists_all_and_rejects_unknown_names() -> None:
    assert set(ALL) <= set(list_algorithms())
    with pytest.raises(ValueError, match=r"unknown algorithm 'qmixx'.*known: .*dsfp-uniform.*qmix"):
        make_algorithm("qmixx", MatrixGameEnv(), seed=0)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['learning_rate'\].*config fields"):
        make_algorithm("qmix", MatrixGameEnv(), seed=0, learning_rate=1e-3)
    with pytest.raises(ValueError, match="unknown mixer 'nope'"):
        make_algorithm("qmix", MatrixGameEnv(), seed=0, mixer="nope")
    assert isinstance(make_algorithm("agents.baselines:random", MatrixGameEnv(), seed=0), Algorithm)
    assert make_algorithm("vdn", MatrixGameEnv(), seed=0).config.mixer == "vdn"
    assert make_algorithm("qmix", MatrixGameEnv(), seed=0, config=QMIXConfig(lr=0.1), gamma=0.5).config.lr == 0.1


def test_plugins_in_one_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new algorithm and a new mixer plug in by decorator and run by name."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    import agents.qmix as qmix

    monkeypatch.setattr(qmix, "_MIXERS", dict(qmix._MIXERS))

    @dataclasses.dataclass
    class AlwaysConfig:
        action: int = 1
        """Action every agent takes."""

    @register("always")
    class Always(Algorithm):
        config_cls = AlwaysConfig

        def _train_episode(self) -> EpisodeLog:
            log, _ = self.play_episode(lambda obs, infos: {a: self.config.action for a in obs})
            return log

        def evaluate(self) -> EpisodeLog:
            return self.play_episode(lambda obs, infos: {a: self.config.action for a in obs})[0]

    @register_mixer("max")
    class MaxMixer(Mixer):
        def forward(self, agent_qs: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
            return agent_qs.max(dim=-1, keepdim=True).values

    log = make_algorithm("always", MatrixGameEnv(), seed=0, action=2).train_episode()
    assert log.episode_return == 9.0 and log.actions == [{"agent_0": 2, "agent_1": 2}]
    algo = make_algorithm("qmix", MatrixGameEnv(), seed=0, mixer="max", **SMALL["qmix"])
    assert isinstance(algo.mixer, MaxMixer)
    assert all(math.isfinite(algo.train_episode().episode_return) for _ in range(4))
    assert algo.gradient_steps > 0


# ---------------------------------------------------------------------- the contract of train_episode
_NEW_STYLE = """
import dataclasses
from agents import Algorithm, EpisodeLog, register

@dataclasses.dataclass
class Config:
    action: int = 1
    \"\"\"Action every agent takes.\"\"\"

@register("{name}")
class Always(Algorithm):
    config_cls = Config

    def _train_episode(self) -> EpisodeLog:
        return self.play_episode(lambda obs, infos: {{a: self.config.action for a in obs}})[0]

    def evaluate(self) -> EpisodeLog:
        return self.play_episode(lambda obs, infos: {{a: self.config.action for a in obs}})[0]
"""
# The way plug-ins were written before the base class counted episodes: refused, with the way out.
_OLD_STYLE = _NEW_STYLE.replace(
    "def _train_episode(self) -> EpisodeLog:\n        return",
    "def train_episode(self) -> EpisodeLog:\n        self.episodes_done += 1\n        return")


def _plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, source: str) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_a_module_name_plugin_is_counted_once_by_the_base_and_resumes(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented plug-in (agents/base.py): only _train_episode and evaluate; the base counts and saves."""
    _plugin_module(tmp_path, monkeypatch, "contract_new_style", _NEW_STYLE.format(name="always-new"))
    algo = make_algorithm("contract_new_style:always-new", MatrixGameEnv(), seed=0, action=2)
    for i in range(3):
        assert algo.train_episode().length == 1
        assert (algo.episodes_done, algo.env_steps) == (i + 1, i + 1)
    algo.evaluate()
    assert (algo.episodes_done, algo.env_steps) == (3, 3)  # evaluate is no training episode
    buf = io.BytesIO()
    torch.save(algo.state_dict(), buf)  # the base's state_dict is complete for a plug-in with no state of its own
    buf.seek(0)
    fresh = make_algorithm("always-new", MatrixGameEnv(), seed=0, action=2)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert (fresh.episodes_done, fresh.env_steps) == (3, 3)
    fresh.train_episode()
    assert fresh.episodes_done == 4


def test_a_plugin_that_overrides_train_episode_is_refused_at_definition(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture) -> None:
    _plugin_module(tmp_path, monkeypatch, "contract_old_style", _OLD_STYLE.format(name="always-old"))
    message = r"overrides train_episode\(\); implement _train_episode\(\) instead"
    with pytest.raises(TypeError, match="Always " + message):
        get_algorithm("contract_old_style:always-old")
    assert "always-old" not in list_algorithms()
    with pytest.raises(TypeError, match="Wrapper " + message):
        class Wrapper(RandomSearch):  # also a subclass of a built-in
            def train_episode(self) -> EpisodeLog:
                return super().train_episode()
    from pruning_env.cli import marl  # the --algo module:name path says which flag

    with pytest.raises(SystemExit):
        marl.main(["--env", "pruning_env/Tiny-v1", "--algo", "contract_old_style:always-old",
                   "--logdir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--algo contract_old_style:always-old" in err and "_train_episode" in err


def test_a_hook_that_counts_itself_or_returns_no_log_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    class CountsItself(RandomSearch):
        def _train_episode(self) -> EpisodeLog:
            log = super()._train_episode()
            self.episodes_done += 1  # the old habit: would count the episode twice
            return log

    algo = CountsItself(MatrixGameEnv(), seed=0)
    with pytest.raises(RuntimeError, match=r"CountsItself\._train_episode\(\) changed episodes_done/env_steps.*"
                                           r"remove the subclass's own counting"):
        algo.train_episode()

    class NoLog(RandomSearch):
        def _train_episode(self) -> Any:
            super()._train_episode()

    with pytest.raises(TypeError, match=r"NoLog\._train_episode\(\) must return an EpisodeLog, got NoneType"):
        NoLog(MatrixGameEnv(), seed=0).train_episode()


def test_an_episode_that_raises_is_not_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    algo = make_algorithm("random", MatrixGameEnv(), seed=0)
    algo.train_episode()
    monkeypatch.setattr(algo, "_train_episode", lambda: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        algo.train_episode()
    assert (algo.episodes_done, algo.env_steps) == (1, 1)


def test_the_base_class_provides_everything_the_search_layer_reads() -> None:
    """``_Algorithm`` (pruning_env/search/loop.py) is the search layer's copy of the contract: every member it
    names exists on agents.Algorithm with the same kind (class attribute, instance attribute, method)."""
    from pruning_env.search.loop import _Algorithm

    members = {n for n in vars(_Algorithm) if not n.startswith("_")}
    annotated = set(_Algorithm.__annotations__)
    assert {"episodes_done", "env_api", "train_episode", "evaluate", "state_dict", "load_state_dict",
            "budget_overrides", "upcoming_actions", "upcoming_policies"} <= members | annotated
    algo = make_algorithm("random", MatrixGameEnv(), seed=0)
    for name in members:
        assert callable(getattr(Algorithm, name, None)), name
    assert isinstance(algo.episodes_done, int) and Algorithm.env_api in agents.ENV_APIS
    assert {n for n in annotated if not hasattr(algo, n)} == set()
    assert Algorithm.__abstractmethods__ == {"_train_episode", "evaluate"}  # state_dict is concrete, extended


@pytest.mark.parametrize("case", CASES)
def test_train_and_evaluate_one_episode_each(case: str) -> None:
    algo = build(case)
    for i in range(4):
        log = algo.train_episode()
        assert isinstance(log, EpisodeLog)
        assert log.length == 3 and len(log.actions) == 3
        if case == "amc":  # one layer (agent) per step, named by the env's possible_agents
            assert [set(step) for step in log.actions] == [{"agent_0"}, {"agent_1"}, {"agent_2"}]
        else:
            assert all(set(step) == {"agent_0", "agent_1", "agent_2"} for step in log.actions)
        assert all(math.isfinite(v) for v in log.metrics.values())
        # TensorBoard rule: exactly the losses end in "loss" (the learners learn from episode 2 or 3 on)
        assert {k for k in log.metrics if k.endswith("loss")} <= LOSSES[case.removesuffix("-variant")]
        assert algo.episodes_done == i + 1
    assert algo.env_steps == 12
    ev = algo.evaluate()
    assert algo.episodes_done == 4 and ev.length == 3
    if case == "amc":
        assert ev.final_info["plan"] == pytest.approx([step[f"agent_{t}"] for t, step in enumerate(ev.actions)])
        assert all(0.0 <= v <= 1.0 for step in ev.actions for v in step.values())
        assert "critic_loss" in log.metrics and "actor_loss" in log.metrics
    else:
        assert set(ev.final_info) == {"joint_action", "payoff"}
        assert all(isinstance(v, int) and 0 <= v < 4 for step in ev.actions for v in step.values())
    if case.startswith(("qmix", "vdn", "iql")):
        assert "td_loss" in log.metrics and "epsilon" in log.metrics
    # by the 4th episode every learner has learnt: its losses are all there, and nothing else ends in "loss"
    assert {k for k in log.metrics if k.endswith("loss")} == LOSSES[case.removesuffix("-variant")]


@pytest.mark.parametrize("case", CASES)
def test_state_dict_round_trip_resumes_exactly(case: str) -> None:
    first = build(case, seed=3)
    run(first, 5)
    saved = first.state_dict()
    continued = run(first, 4)  # keeps training after the snapshot: the snapshot must not change

    buf = io.BytesIO()
    torch.save(saved, buf)  # checkpoints hold only tensors and plain values
    buf.seek(0)
    restored = torch.load(buf, weights_only=True)

    fresh = build(case, seed=99)  # different seed and a new env: everything must come from the state
    fresh.load_state_dict(restored)
    assert fresh.seed == 3
    assert run(fresh, 4) == continued


@pytest.mark.parametrize("case", CASES)
def test_same_seed_same_results(case: str) -> None:
    a, b = run(build(case, seed=7), 5), run(build(case, seed=7), 5)
    assert a == b
    if case not in ("dsfp-uniform",):
        assert run(build(case, seed=8), 5) != a


def test_dsfp_uniform_sweeps_indices_and_evaluates_best() -> None:
    env = MatrixGameEnv(n_actions=4, payoff=np.diag([1.0, 5.0, 2.0, 0.0]))
    algo = make_algorithm("dsfp-uniform", env, seed=0)
    logs = [algo.train_episode() for _ in range(6)]
    assert [log.actions[0]["agent_0"] for log in logs] == [0, 1, 2, 3, 0, 1]
    assert all(len(set(log.actions[0].values())) == 1 for log in logs)
    assert algo.best_index == 1
    assert algo.evaluate().actions == [{"agent_0": 1, "agent_1": 1}]


def test_random_search_replays_best_in_evaluate() -> None:
    env = MatrixGameEnv(n_steps=2)
    algo = make_algorithm("random", env, seed=0)
    best = max((algo.train_episode() for _ in range(15)), key=lambda log: log.episode_return)
    ev = algo.evaluate()
    assert ev.episode_return == best.episode_return == algo.best_return
    assert ev.actions == best.actions


# ---------------------------------------------------------------------- env APIs
def test_each_algorithm_declares_the_env_api_it_wants() -> None:
    assert {name: get_algorithm(name).env_api for name in ALL} == {
        "qmix": "parallel", "vdn": "parallel", "iql": "parallel", "amc": "sequential",
        "random": "parallel", "dsfp-uniform": "parallel",
    }
    assert all(get_algorithm(name).env_api in agents.ENV_APIS for name in list_algorithms())
    assert agents.ENV_APIS == ("parallel", "sequential")


def test_register_rejects_an_unknown_env_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class Joint(Algorithm):
        config_cls = QMIXConfig
        env_api = "joint"  # not an EnvAPI: the point of the test

    with pytest.raises(TypeError, match=r"env_api must be one of \('parallel', 'sequential'\), got 'joint'"):
        register("joint")(Joint)


def test_wrong_env_api_fails_with_a_hint() -> None:
    with pytest.raises(TypeError, match=r"amc wants a Gymnasium env .*sequential.*got the PettingZoo ParallelEnv "
                                        r"MatrixGameEnv; wrap it: pruning_env\.SequentialPruningEnv\(env\)"):
        make_algorithm("amc", MatrixGameEnv(), seed=0)
    for name in ("qmix", "iql", "random", "dsfp-uniform"):
        with pytest.raises(TypeError, match=rf"{name} wants a PettingZoo ParallelEnv .*got the Gymnasium env "
                                            "ToySequentialEnv; pass the parallel env itself"):
            make_algorithm(name, ToySequentialEnv(3), seed=0)
    with pytest.raises(TypeError, match=r"amc wants a Gymnasium env .*with observation_space/action_space, got object"):
        make_algorithm("amc", object(), seed=0)


def test_make_sequential_env_option_is_gone() -> None:
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['make_sequential_env'\]"):
        make_algorithm("amc", ToySequentialEnv(3), seed=0, make_sequential_env=lambda env: env)


def test_amc_names_steps_by_index_without_possible_agents() -> None:
    algo = make_algorithm("amc", ToySequentialEnv(3), seed=0, **SMALL["amc"])
    log = algo.train_episode()
    assert [list(step) for step in log.actions] == [["step_0"], ["step_1"], ["step_2"]]
    assert log.final_info["plan"] == pytest.approx([step[f"step_{t}"] for t, step in enumerate(log.actions)])


def test_amc_rejects_non_scalar_actions() -> None:
    env = ToySequentialEnv(3)
    env.action_space = gym.spaces.Box(0.0, 1.0, (2,), np.float32)
    with pytest.raises(ValueError, match=r"Box action space of shape \(1,\)"):
        make_algorithm("amc", env, seed=0)


def test_constructor_options_of_plug_ins_still_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """make_algorithm hands keywords that are not config fields to a plug-in's keyword-only parameters."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register("scaled-random")
    class ScaledRandom(RandomSearch):
        def __init__(self, env: Any, config: Any = None, *, seed: int, device: str = "cpu", scale: int = 1) -> None:
            super().__init__(env, config, seed=seed, device=device)
            self.scale = scale

    assert make_algorithm("scaled-random", MatrixGameEnv(), seed=0, scale=3).scale == 3
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['size'\].*constructor options: \['scale'\]"):
        make_algorithm("scaled-random", MatrixGameEnv(), seed=0, size=3)


# ---------------------------------------------------------------------- budget hints
@pytest.mark.parametrize("plans, episode_length, eps_steps, warmup", [
    (480, 4, 240, 15),   # 120 AMC episodes: 15 of warm-up
    (3, 3, 2, 1),        # the floors: at least one step of annealing, one warm-up episode
    (1, 12, 1, 1),
    (2000, 5, 1000, 50),
])
def test_budget_overrides(plans: int, episode_length: int, eps_steps: int, warmup: int) -> None:
    expected = {"qmix": {"eps_anneal_steps": eps_steps}, "vdn": {"eps_anneal_steps": eps_steps},
                "iql": {"eps_anneal_steps": eps_steps}, "amc": {"warmup_episodes": warmup},
                "random": {}, "dsfp-uniform": {}}
    for name in ALL:
        over = get_algorithm(name).budget_overrides(plans, episode_length)
        assert over == expected[name], name
        # the keys are config fields: they go straight to make_algorithm
        assert dataclasses.asdict(get_algorithm(name).default_config(**over)).items() >= over.items()


def test_budget_overrides_feed_make_algorithm() -> None:
    cls = get_algorithm("qmix")
    algo = make_algorithm("qmix", MatrixGameEnv(n_steps=2), seed=0, **cls.budget_overrides(40, 2))
    for _ in range(10):  # 20 env steps = half the budget: epsilon is at its floor
        algo.train_episode()
    assert algo.epsilon() == pytest.approx(algo.config.eps_end)
    amc = make_algorithm("amc", ToySequentialEnv(3), seed=0, **get_algorithm("amc").budget_overrides(48, 3))
    assert amc.config.warmup_episodes == 2


@pytest.mark.parametrize("plans, episode_length", [(0, 4), (10, 0), (-1, 3), (2.5, 3), (True, 3)])
def test_budget_overrides_reject_bad_budgets(plans: Any, episode_length: Any) -> None:
    for name in ALL:
        with pytest.raises(ValueError, match="must be a positive integer"):
            get_algorithm(name).budget_overrides(plans, episode_length)


# ---------------------------------------------------------------------- package surface
PLUGIN_API = ["Algorithm", "EpisodeLog", "register", "make_algorithm", "get_algorithm", "list_algorithms",
              "seeded_torch", "RandomStreams", "split_observation", "register_mixer", "list_mixers", "Mixer",
              "QMIXConfig", "AMCConfig", "RandomSearchConfig", "DSFPUniformConfig"]


def test_package_exports_the_plugin_api_and_no_test_envs() -> None:
    for name in PLUGIN_API:
        assert name in agents.__all__, name
        assert getattr(agents, name) is not None
    assert set(agents.__all__) == {n for n in dir(agents) if not n.startswith("_")} - {
        "amc", "base", "baselines", "qmix", "registry", "replay"}  # the submodules themselves
    assert not hasattr(agents, "MatrixGameEnv")
    assert importlib.util.find_spec("agents.matrix_game") is None
    assert agents.Mixer is agents.qmix.Mixer and agents.seeded_torch is agents.base.seeded_torch


def test_agents_never_imports_pruning_env() -> None:
    """Not even lazily: the agents know the env only through the API they are handed."""
    package = Path(agents.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__"):
                names = [arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
            else:
                continue
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] == "pruning_env"]
    assert offenders == []
