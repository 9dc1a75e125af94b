"""Pruning agents: MARL learners (QMIX/VDN/IQL), AMC (DDPG) and baselines.

They know the pruning env only through the PettingZoo/Gymnasium API they are handed;
nothing here imports ``pruning_env``. Each algorithm says which API it wants in its
``env_api`` class attribute: ``"parallel"`` (a PettingZoo ``ParallelEnv``, every layer
agent acts at every step) or ``"sequential"`` (a Gymnasium env that decides one layer per
step, e.g. ``pruning_env.SequentialPruningEnv(parallel_env)``). Build one by name and run
it one episode at a time::

    from agents import get_algorithm, make_algorithm
    cls = get_algorithm(name)
    env = parallel_env if cls.env_api == "parallel" else SequentialPruningEnv(parallel_env)
    over = cls.budget_overrides(plans=400, episode_length=4)   # exploration fitted to the budget
    algo = make_algorithm(name, env, seed=0, **over)
    for _ in range(100):
        log = algo.train_episode()        # EpisodeLog: return, actions, final_info, metrics
    best = algo.evaluate()
    torch.save(algo.state_dict(), "ckpt.pt")

Registered names: ``"qmix"``, ``"vdn"``, ``"iql"`` (parallel), ``"amc"`` (sequential),
``"random"``, ``"dsfp-uniform"`` (parallel). :mod:`agents.base` documents how to add an
algorithm in one file (implement the ``_train_episode()`` hook and ``evaluate()``; the base's
``train_episode()`` counts the episodes), :mod:`agents.qmix` how to add a mixer.
"""

# Importing the modules registers their algorithms ("amc" imports Tianshou only when built).
from agents.amc import AMCConfig  # "amc"
from agents.base import (
    ENV_APIS,
    Algorithm,
    EnvAPI,
    EpisodeLog,
    EpisodeTrace,
    RandomStreams,
    config_field,
    seeded_torch,
    split_observation,
)
from agents.baselines import DSFPUniformConfig, RandomSearchConfig  # "random", "dsfp-uniform"
from agents.qmix import Mixer, QMIXConfig, list_mixers, register_mixer  # "qmix", "vdn", "iql"
from agents.registry import get_algorithm, list_algorithms, make_algorithm, register

__all__ = [
    "ENV_APIS",
    "AMCConfig",
    "Algorithm",
    "DSFPUniformConfig",
    "EnvAPI",
    "EpisodeLog",
    "EpisodeTrace",
    "Mixer",
    "QMIXConfig",
    "RandomSearchConfig",
    "RandomStreams",
    "config_field",
    "get_algorithm",
    "list_algorithms",
    "list_mixers",
    "make_algorithm",
    "register",
    "register_mixer",
    "seeded_torch",
    "split_observation",
]
