"""The pruning env as a BenchMARL task (BenchMARL's custom-task path), with QMIX or MAPPO.

    python examples/benchmarl_task.py                      # QMIX, 100,000 frames on the VGG-16 surrogate env
    python examples/benchmarl_task.py --algo mappo         # MAPPO instead
    python examples/benchmarl_task.py --smoke              # 240 frames on pruning_env/Tiny-Surrogate-v1 (the tests)
    python examples/benchmarl_task.py --num-envs 40        # 40 episodes per step in one batched TorchRL env
    python examples/benchmarl_task.py --env pruning_env/Tiny-v1 --frames 600   # any registered parallel env id

BenchMARL 1.5.2 (the newest) needs torchrl 0.10-0.11, and this project's other TorchRL code uses 0.14, so it lives in
its own virtual environment (``.ci/run`` makes ``.cache/venv-benchmarl``)::

    pip install torch==2.13.0 torchrl==0.11.1 tensordict==0.11.0 hydra-core pyyaml -e .
    pip install --no-deps benchmarl==1.5.2   # its declared torchvision and av are for video logging, unused here

The env is wrapped by TorchRL's ``PettingZooWrapper`` (the agents ``layer_0 ...`` form one group ``"layer"``, the
env's ``state()`` is the mixer's global state); the team reward is every agent's reward. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from typing import Any

import torch
from benchmarl.algorithms import MappoConfig, QmixConfig
from benchmarl.environments.common import Task, TaskClass
from benchmarl.experiment import Callback, Experiment, ExperimentConfig
from benchmarl.models.mlp import MlpConfig
from torchrl.data import Composite
from torchrl.envs import EnvBase
from torchrl.envs.libs.pettingzoo import PettingZooWrapper

import pruning_env


class SurrogateBatchEnv(EnvBase):
    """A :class:`~pruning_env.envs.surrogate_vector.SurrogateVectorEnv` as a TorchRL env of batch size
    ``[num_envs]``, laid out as ``PettingZooWrapper`` lays out the PettingZoo env (one group ``"layer"`` of the
    ``L`` agents; ``state`` at the root; the team reward as every agent's; done flags per agent and at the root),
    so that BenchMARL steps ``num_envs`` episodes per call instead of wrapping one env per episode.

    Episodes run in lockstep (all have the env's ``episode_length``): a reset resets every episode.
    """

    def __init__(self, env_id: str, num_envs: int, *, continuous: bool, seed: int | None, device: Any,
                 **kwargs: Any) -> None:
        from torchrl.data import Bounded, Categorical, Unbounded

        from pruning_env.envs.surrogate_vector import SurrogateVectorEnv

        self.venv = SurrogateVectorEnv(env_id, num_envs, continuous=continuous, **kwargs)
        super().__init__(batch_size=torch.Size([num_envs]), device=device)
        n, agents, features = self.venv.observation_space.shape
        state = self.venv.env.state_space.shape[0]
        group = (n, agents)
        self.group_map = {"layer": list(self.venv.env.possible_agents)}
        self.full_observation_spec = Composite(
            layer=Composite(observation=Bounded(0.0, 1.0, (*group, features), dtype=torch.float32), shape=group),
            state=Bounded(0.0, 1.0, (n, state), dtype=torch.float32), shape=(n,))
        rates = self.venv.env.config.rates
        action = (Bounded(0.0, float(max(rates)), (*group, 1), dtype=torch.float32) if continuous else
                  Categorical(len(rates), group, dtype=torch.int64))
        self.full_action_spec = Composite(layer=Composite(action=action, shape=group), shape=(n,))
        self.full_reward_spec = Composite(layer=Composite(reward=Unbounded((*group, 1)), shape=group), shape=(n,))
        flags = ("done", "terminated", "truncated")
        self.full_done_spec = Composite(
            **{k: Categorical(2, (n, 1), dtype=torch.bool) for k in flags},
            layer=Composite(**{k: Categorical(2, (*group, 1), dtype=torch.bool) for k in flags}, shape=group),
            shape=(n,))
        if seed is not None:
            self.set_seed(seed)

    def _flags(self, done: bool) -> dict[str, Any]:
        n, agents = self.batch_size[0], len(self.group_map["layer"])
        root = torch.full((n, 1), done, dtype=torch.bool)
        return {"done": root, "terminated": root.clone(), "truncated": torch.zeros(n, 1, dtype=torch.bool),
                "layer": {"done": root[:, None].expand(n, agents, 1).clone(),
                          "terminated": root[:, None].expand(n, agents, 1).clone(),
                          "truncated": torch.zeros(n, agents, 1, dtype=torch.bool)}}

    def _out(self, obs: Any, done: bool, reward: Any = None) -> Any:
        from tensordict import TensorDict

        self._obs, self._done = obs, done
        flags = self._flags(done)
        layer = {"observation": torch.from_numpy(obs), **flags.pop("layer")}
        if reward is not None:
            layer["reward"] = torch.from_numpy(reward.astype("float32"))[:, None, None].expand(
                -1, len(self.group_map["layer"]), 1).clone()
        group = TensorDict(layer, batch_size=(*self.batch_size, len(self.group_map["layer"])), device=self.device)
        return TensorDict({"layer": group, "state": torch.from_numpy(self.venv.state()), **flags},
                          batch_size=self.batch_size, device=self.device)

    def _reset(self, tensordict: Any = None, **_: Any) -> Any:
        mask = None if tensordict is None else tensordict.get("_reset", None)
        if mask is not None and not bool(mask.all()):
            if bool(mask.any()):
                raise RuntimeError("SurrogateBatchEnv resets all its episodes at once (they run in lockstep); got a "
                                   "reset of some of them")
            return self._out(self._obs, self._done)  # nothing to reset: the episodes as they are
        obs, _ = self.venv.reset()
        return self._out(obs, False)

    def _step(self, tensordict: Any) -> Any:
        action = tensordict.get(("layer", "action")).detach().cpu().numpy()
        obs, reward, terminated, _, _ = self.venv.step(action)
        return self._out(obs, bool(terminated.all()), reward)

    def _set_seed(self, seed: int | None) -> None:
        self.venv.reset(seed=seed)


class PruningEnvTask(TaskClass):
    """A pruning env id (config ``env_id``, optional ``kwargs`` for :func:`pruning_env.make`; ``num_envs`` > 1
    with a surrogate id: :class:`SurrogateBatchEnv`) as a BenchMARL task."""

    def get_env_fun(self, num_envs: int, continuous_actions: bool, seed: int | None, device: Any):
        cfg = copy.deepcopy(self.config)

        def make() -> EnvBase:
            if cfg.get("vectorized"):  # one TorchRL env of batch size [num_envs]
                env = SurrogateBatchEnv(cfg["env_id"], num_envs, continuous=continuous_actions, seed=seed,
                                        device=device, **cfg.get("kwargs", {}))
                self.episode_length = int(env.venv.env.config.episode_length)
                return env
            env = pruning_env.make(cfg["env_id"], continuous=continuous_actions, **cfg.get("kwargs", {}))
            self.episode_length = int(env.config.episode_length)  # the env's public config (for max_steps)
            return PettingZooWrapper(env, return_state=True, categorical_actions=True, seed=seed, device=device)

        return make

    def supports_continuous_actions(self) -> bool:
        return True  # the env's continuous=True: a Box rate per agent

    def supports_discrete_actions(self) -> bool:
        return True

    def has_render(self, env: EnvBase) -> bool:
        return False

    def max_steps(self, env: EnvBase) -> int:
        return self.episode_length  # recorded by get_env_fun's env maker, which BenchMARL calls first

    def group_map(self, env: EnvBase) -> dict[str, list[str]]:
        return env.group_map

    def _only(self, env: EnvBase, key: str) -> Composite:
        spec = env.full_observation_spec_unbatched.clone()  # a batched env's specs without its batch dimension
        for group in self.group_map(env):
            for k in list(spec[group].keys()):
                if k != key:
                    del spec[group][k]
        if "state" in list(spec.keys()):  # a spec's keys (a Composite is not a dict)
            del spec["state"]
        return spec

    def observation_spec(self, env: EnvBase) -> Composite:
        return self._only(env, "observation")

    def info_spec(self, env: EnvBase) -> Composite | None:
        return None

    def state_spec(self, env: EnvBase) -> Composite | None:
        return Composite({"state": env.full_observation_spec_unbatched["state"].clone()})

    def action_spec(self, env: EnvBase) -> Composite:
        return env.full_action_spec_unbatched

    def action_mask_spec(self, env: EnvBase) -> Composite | None:
        return None

    @staticmethod
    def env_name() -> str:
        return "pruning_env"


class PruningTask(Task):
    """The registered pruning env ids, as BenchMARL tasks (configured by :meth:`Task.get_task`)."""

    PRUNING = None

    @staticmethod
    def associated_class():
        return PruningEnvTask


class _Returns(Callback):
    """Every finished episode's team return (the mean over agents of the summed reward; they are all equal)."""

    def __init__(self) -> None:
        super().__init__()
        self.returns: list[float] = []

    def on_batch_collected(self, batch) -> None:
        group = next(iter(self.experiment.group_map))
        done = batch.get(("next", group, "done")).any(-2).reshape(-1)
        ret = batch.get(("next", group, "episode_reward")).mean(-2).reshape(-1)
        self.returns += ret[done].tolist()


def run(env_id: str, algo: str, frames: int, frames_per_batch: int, seed: int, num_envs: int = 1,
        **env_kwargs: Any) -> dict[str, Any]:
    """One BenchMARL experiment: ``frames`` env steps (counted per env step, as BenchMARL does) of ``algo``;
    ``num_envs`` > 1: that many episodes per step in one :class:`SurrogateBatchEnv` (surrogate ids only)."""
    torch.manual_seed(seed)
    task = PruningTask.PRUNING.get_task(config={"env_id": env_id, "kwargs": env_kwargs, "vectorized": num_envs > 1})
    exp = ExperimentConfig.get_from_yaml()
    exp.sampling_device = exp.train_device = exp.buffer_device = "cpu"
    exp.prefer_continuous_actions = False  # a rate from the env's grid (QMIX needs discrete actions)
    exp.max_n_frames, exp.max_n_iters = frames, None
    exp.on_policy_collected_frames_per_batch = exp.off_policy_collected_frames_per_batch = frames_per_batch
    exp.on_policy_n_envs_per_worker = exp.off_policy_n_envs_per_worker = num_envs
    exp.on_policy_minibatch_size = min(exp.on_policy_minibatch_size, frames_per_batch)
    exp.off_policy_train_batch_size = min(exp.off_policy_train_batch_size, frames_per_batch)
    exp.off_policy_n_optimizer_steps = max(1, min(exp.off_policy_n_optimizer_steps, frames_per_batch // 10))
    exp.on_policy_n_minibatch_iters = min(exp.on_policy_n_minibatch_iters, 4)
    exp.off_policy_memory_size = max(frames, frames_per_batch)
    exp.evaluation, exp.render, exp.loggers, exp.create_json = False, False, [], False
    exp.checkpoint_interval, exp.checkpoint_at_end = 0, False
    exp.save_folder = tempfile.mkdtemp(prefix="benchmarl-")
    algorithm = {"qmix": QmixConfig, "mappo": MappoConfig}[algo].get_from_yaml()
    returns = _Returns()
    experiment = Experiment(task=task, algorithm_config=algorithm, model_config=MlpConfig.get_from_yaml(),
                            critic_model_config=MlpConfig.get_from_yaml(), seed=seed, config=exp,
                            callbacks=[returns])
    t0 = time.perf_counter()
    experiment.run()
    seconds = time.perf_counter() - t0
    tail = returns.returns[-max(1, len(returns.returns) // 10):]
    return {"env": env_id, "algo": algo, "num_envs": num_envs, "frames": int(experiment.total_frames), "iterations":
            int(experiment.n_iters_performed), "episodes": len(returns.returns),
            "first_return": returns.returns[0] if returns.returns else math.nan,
            "last_tenth_mean_return": sum(tail) / len(tail) if returns.returns else math.nan,
            "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default=None, help="registered parallel env id (default: "
                        "pruning_env/VGG16-CIFAR10-w0.25-Surrogate-v1; with --smoke pruning_env/Tiny-Surrogate-v1)")
    parser.add_argument("--algo", choices=("qmix", "mappo"), default="qmix", help="BenchMARL algorithm")
    parser.add_argument("--frames", type=int, default=100_000, help="env steps in all (BenchMARL's max_n_frames)")
    parser.add_argument("--frames-per-batch", type=int, default=1_200, help="env steps collected per iteration")
    parser.add_argument("--macs-target", type=float, default=0.3, help="the env's MACs target (exact budget)")
    parser.add_argument("--seed", type=int, default=0, help="experiment seed")
    parser.add_argument("--num-envs", type=int, default=1, help="episodes stepped at once: > 1 makes one batched "
                        "TorchRL env of a surrogate id (SurrogateBatchEnv); 1: TorchRL's PettingZooWrapper")
    parser.add_argument("--smoke", action="store_true", help="tiny budget: 240 frames (2 iterations) on the Tiny "
                        "surrogate, what the test suite runs")
    args = parser.parse_args(argv)
    if args.frames < 1 or args.frames_per_batch < 1 or args.num_envs < 1:
        parser.error("--frames, --frames-per-batch and --num-envs must be positive")
    env_id = args.env or ("pruning_env/Tiny-Surrogate-v1" if args.smoke else
                          "pruning_env/VGG16-CIFAR10-w0.25-Surrogate-v1")
    frames, per_batch = (240, 120) if args.smoke else (args.frames, args.frames_per_batch)
    if args.num_envs > 1 and "Surrogate" not in env_id:
        parser.error(f"--num-envs {args.num_envs} batches a surrogate env; {env_id} is not one (use --num-envs 1)")
    if per_batch % args.num_envs:
        parser.error(f"--frames-per-batch {per_batch} must be a multiple of --num-envs {args.num_envs}")
    if args.num_envs > 1:  # TorchRL's own check of the batched env: specs against a short rollout
        from torchrl.envs.utils import check_env_specs

        check_env_specs(SurrogateBatchEnv(env_id, args.num_envs, continuous=False, seed=args.seed, device="cpu",
                                          macs_target=args.macs_target))
    result = run(env_id, args.algo, frames, per_batch, args.seed, num_envs=args.num_envs,
                 macs_target=args.macs_target)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
