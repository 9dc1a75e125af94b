"""SurrogateVectorEnv: N surrogate episodes stepped at once give, row for row, the PettingZoo surrogate env's."""

from __future__ import annotations

import numpy as np
import pytest

import pruning_env
from pruning_env.envs.env import INFO_KEYS
from pruning_env.envs.surrogate import DATA_DIR, SurrogateData, SurrogateModel, SurrogatePruningEnv
from pruning_env.envs.surrogate_vector import SurrogateVectorEnv

TINY = "pruning_env/Tiny-Surrogate-v1"
VGG = "pruning_env/VGG16-CIFAR10-w0.25-Surrogate-v1"


@pytest.fixture(scope="module")
def vgg_model() -> SurrogateModel:
    return SurrogateModel.load_or_fit(SurrogateData.load(DATA_DIR / "VGG16-CIFAR10-w0.25.npz"))


def _episodes_match(venv: SurrogateVectorEnv, ref: SurrogatePruningEnv, episodes: int) -> int:
    """Steps every row of ``venv`` and replays each row's actions on ``ref``; the number of steps compared (every
    observation, reward, termination, info, state and plan must be equal, bit for bit)."""
    agents, compared = ref.possible_agents, 0
    for ep in range(episodes):
        obs, infos = venv.reset(seed=ep)
        assert obs.shape == venv.observation_space.shape and obs.dtype == np.float32
        states = [venv.state()]
        steps = []
        for _ in range(ref.config.episode_length):
            actions = venv.action_space.sample()
            steps.append((actions, *venv.step(actions), venv.state()))
        plans = [venv.plan(i).key() for i in range(venv.num_envs)]
        for i in range(venv.num_envs):
            o, inf = ref.reset(seed=ep)
            assert np.array_equal(np.stack([o[a] for a in agents]), obs[i])
            assert all(inf[agents[0]][k] == infos[k][i] for k in INFO_KEYS if k != "rate")
            assert np.array_equal(ref.state(), states[0][i])
            for actions, vo, vr, vterm, vtrunc, vinf, vstate in steps:
                act = {a: (np.array([actions[i, j]], dtype=np.float32) if ref.config.continuous else
                           int(actions[i, j])) for j, a in enumerate(agents)}
                o, r, term, trunc, inf = ref.step(act)
                assert np.array_equal(np.stack([o[a] for a in agents]), vo[i])
                assert {r[a] for a in agents} == {vr[i]} and vterm[i] == term[agents[0]]
                assert not vtrunc[i] and not trunc[agents[0]]
                assert all(inf[agents[0]][k] == vinf[k][i] for k in INFO_KEYS if k != "rate")
                assert [inf[a]["rate"] for a in agents] == vinf["rate"][i].tolist()
                assert np.array_equal(ref.state(), vstate[i])
                compared += 1
            assert plans[i] == ref.plan.key()
            assert not ref.agents and vterm.all()
    return compared


@pytest.mark.parametrize("settings", [
    {"macs_target": 0.4},  # the exact budget
    {"macs_target": 0.6},
    {"macs_target": 0.5, "exact_budget": False},  # a soft budget: the rates as proposed
    {"macs_target": 0.4, "continuous": True},
    {"macs_target": 0.4, "episode_length": 5, "proxy": "acc"},
    {"reward": "amc"},
])
def test_every_row_is_the_pettingzoo_env_episode(settings):
    venv = SurrogateVectorEnv(TINY, 12, **settings)
    assert _episodes_match(venv, pruning_env.make(TINY, **settings), episodes=3) == 36 * venv.env.config.episode_length


@pytest.mark.parametrize("target", [0.5, 0.2])
def test_vgg16_rows_are_the_pettingzoo_env_episodes(vgg_model, target):
    """On the shipped VGG-16 surrogate (13 agents, the exact budget's search and give-back at work)."""
    venv = SurrogateVectorEnv(SurrogatePruningEnv(DATA_DIR / "VGG16-CIFAR10-w0.25.npz", model=vgg_model,
                                                  macs_target=target), 16)
    ref = SurrogatePruningEnv(DATA_DIR / "VGG16-CIFAR10-w0.25.npz", model=vgg_model, macs_target=target)
    assert _episodes_match(venv, ref, episodes=2) == 2 * 16 * 3
    macs = np.array([venv.env.macs_model.predict_plan(venv.plan(i))[0] for i in range(venv.num_envs)])
    assert (macs <= target * venv.env.base_macs).all()  # every final plan meets the budget


def test_tables_emptied_at_reset_keep_the_episodes_equal():
    venv = SurrogateVectorEnv(TINY, 8, max_states=4, macs_target=0.4)
    for _ in range(2):
        venv.reset()
        for _ in range(venv.env.config.episode_length):
            venv.step(venv.action_space.sample())
    assert max(len(s) for s in venv._states) > 4
    venv.reset()
    assert all(len(s) == 1 for s in venv._states)  # only the unpruned state is left
    assert _episodes_match(venv, pruning_env.make(TINY, macs_target=0.4), episodes=2) == 2 * 8 * 3


def test_seeded_action_sampling_repeats():
    a, b = SurrogateVectorEnv(TINY, 4), SurrogateVectorEnv(TINY, 4)
    a.reset(seed=7)
    b.reset(seed=7)
    assert np.array_equal(a.action_space.sample(), b.action_space.sample())


def test_infos_are_the_callers_and_state_works_before_reset():
    venv = SurrogateVectorEnv(TINY, 3, macs_target=0.4)
    ref = pruning_env.make(TINY, macs_target=0.4)
    assert np.array_equal(venv.state()[0], ref.state())  # before any reset: the unpruned network
    venv.reset()
    actions = np.ones((3, len(venv.env.layer_names)), dtype=np.int64)
    infos = venv.step(actions)[4]
    state = venv.state()
    for v in infos.values():
        v[...] = 100.0  # a caller's normaliser writing into its infos changes nothing of the env's
    assert np.array_equal(venv.state(), state)
    ref.reset()
    ref.step({a: 1 for a in ref.possible_agents})
    _, r, _, _, _ = ref.step({a: 1 for a in ref.possible_agents})
    assert venv.step(actions)[1].tolist() == [r["layer_0"]] * 3


def test_bad_input_is_refused_before_any_work():
    venv = SurrogateVectorEnv(TINY, 3, macs_target=0.4)
    layers, rates = len(venv.env.layer_names), len(venv.env.config.rates)
    with pytest.raises(RuntimeError, match="call reset"):
        venv.step(np.zeros((3, layers), dtype=np.int64))
    venv.reset()
    for bad, match in [(np.zeros((2, layers), dtype=np.int64), r"\(N, L\) = \(3, "),
                       (np.zeros((3, layers)), "must be ints"),
                       (np.full((3, layers), rates), "must be ints"),
                       (np.full((3, layers), -1), "must be ints"),
                       (np.zeros((3, layers), dtype=bool), "must be ints"),
                       (np.full((3, layers), "1"), "got dtype <U1"),
                       (np.full((3, layers), None), "got dtype object")]:
        with pytest.raises(ValueError, match=match):
            venv.step(bad)
    assert venv.current_step == 0  # nothing was stepped
    cont = SurrogateVectorEnv(TINY, 2, continuous=True)
    cont.reset()
    for bad in (np.full((2, layers), np.nan), np.full((2, layers), 0.99), np.full((2, layers), -0.1)):
        with pytest.raises(ValueError, match="rates in"):
            cont.step(bad)
    cont.step(np.full((2, layers, 1), 0.3))  # (N, L, 1), as Box(1,) actions stacked, is taken
    high = cont.single_action_space.high[0]
    with pytest.raises(ValueError, match="rates in"):  # the PettingZoo env's bound exactly (a float32 sum)
        cont.step(np.full((2, layers), float(high + np.float32(1e-6)) + 1e-7))
    for bad_n in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_envs"):
            SurrogateVectorEnv(TINY, bad_n)
        with pytest.raises(ValueError, match="max_states"):
            SurrogateVectorEnv(TINY, 2, max_states=bad_n)
    with pytest.raises(ValueError, match="not one"):
        SurrogateVectorEnv("pruning_env/Tiny-v1", 2)
    with pytest.raises(TypeError, match="already made"):
        SurrogateVectorEnv(pruning_env.make(TINY), 2, macs_target=0.3)
    for bad_i in (3, -1, 1.7, True):
        with pytest.raises(IndexError, match="episode index"):
            venv.plan(bad_i)


def test_make_vec_batches_registered_surrogate_ids_only():
    venv = pruning_env.make_vec(TINY, 3, macs_target=0.4)
    assert isinstance(venv, SurrogateVectorEnv) and venv.num_envs == 3 and venv.env.config.macs_target == 0.4
    with pytest.raises(ValueError, match="not one"):
        pruning_env.make_vec("pruning_env/Tiny-v1", 2)
    with pytest.raises(ValueError, match="unknown env id"):
        pruning_env.make_vec("pruning_env/Nope-Surrogate-v1", 2)


def test_made_from_the_data_file_and_the_id_alike():
    by_id = SurrogateVectorEnv(TINY, 2, macs_target=0.4)
    by_file = SurrogateVectorEnv(DATA_DIR / "Tiny.npz", 2, macs_target=0.4)
    actions = np.ones((2, len(by_id.env.layer_names)), dtype=np.int64)
    for v in (by_id, by_file):
        v.reset()
    assert np.array_equal(by_id.step(actions)[0], by_file.step(actions)[0])
