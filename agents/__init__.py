"""Pruning agents: MARL learners (QMIX/VDN/IQL), AMC (DDPG) and baselines.

They know the pruning env only through the PettingZoo ``ParallelEnv`` API. Build one
by name and run it one episode at a time::

    from agents import make_algorithm, list_algorithms
    algo = make_algorithm("qmix", env, seed=0, eps_anneal_steps=300)
    for _ in range(200):
        log = algo.train_episode()        # EpisodeLog: return, actions, final_info, metrics
    best = algo.evaluate()
    torch.save(algo.state_dict(), "ckpt.pt")

Registered names: ``"qmix"``, ``"vdn"``, ``"iql"``, ``"amc"``, ``"random"``,
``"dsfp-uniform"``. :mod:`agents.base` documents how to add an algorithm in one file,
:mod:`agents.qmix` how to add a mixer.
"""

# Importing the modules registers their algorithms ("amc" imports Tianshou only when built).
from agents import baselines as _baselines  # noqa: F401  ("random", "dsfp-uniform")
from agents.amc import AMCConfig  # "amc"
from agents.base import Algorithm, EpisodeLog, get_algorithm, list_algorithms, make_algorithm, register
from agents.matrix_game import MatrixGameEnv
from agents.qmix import QMIXConfig, list_mixers, register_mixer  # "qmix", "vdn", "iql"

__all__ = [
    "AMCConfig",
    "Algorithm",
    "EpisodeLog",
    "MatrixGameEnv",
    "QMIXConfig",
    "get_algorithm",
    "list_algorithms",
    "list_mixers",
    "make_algorithm",
    "register",
    "register_mixer",
]
