"""QMIX with TorchRL on the pruning env (``pruning_env/Tiny-v1``), after TorchRL's multi-agent QMIX recipe.

    python examples/torchrl_qmix.py              # 8 collector batches of 12 frames (4 episodes of 3 steps)
    python examples/torchrl_qmix.py --smoke      # 2 batches: what the test suite runs

``PettingZooWrapper`` groups the agents ``layer_0 ... layer_3`` as ``"layer"``; the team reward is the
same for every agent, so its mean over agents (what QMIX's mixer is trained on here) is the env's reward.
"""

from __future__ import annotations

import argparse
import json

import torch
from tensordict.nn import TensorDictModule, TensorDictSequential
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, ReplayBuffer
from torchrl.envs.libs.pettingzoo import PettingZooWrapper
from torchrl.modules import EGreedyModule, MultiAgentMLP, QMixer, QValueModule
from torchrl.objectives import SoftUpdate, ValueEstimators
from torchrl.objectives.multiagent.qmixer import QMixerLoss

import pruning_env


def make_env(env_id: str = "pruning_env/Tiny-v1", **kwargs) -> PettingZooWrapper:
    """The pruning env as a TorchRL env: agent group ``"layer"``, global ``"state"`` for the mixer."""
    return PettingZooWrapper(pruning_env.make(env_id, **kwargs), return_state=True, use_mask=True)


def build(env: PettingZooWrapper, hidden: int = 64, embed: int = 16):
    """Per-agent Q-net (shared parameters), epsilon-greedy explorer, monotonic mixer over the global state."""
    group = next(iter(env.group_map))
    n_agents = len(env.group_map[group])
    obs_dim = env.observation_spec[group, "observation"].shape[-1]
    n_actions = env.full_action_spec[group, "action"].space.n
    net = MultiAgentMLP(n_agent_inputs=obs_dim, n_agent_outputs=n_actions, n_agents=n_agents, centralized=False,
                        share_params=True, depth=2, num_cells=hidden, activation_class=torch.nn.Tanh)
    qnet = TensorDictSequential(
        TensorDictModule(net, in_keys=[(group, "observation")], out_keys=[(group, "action_value")]),
        QValueModule(action_value_key=(group, "action_value"), action_space="categorical",
                     out_keys=[(group, "action"), (group, "action_value"), (group, "chosen_action_value")]),
    )
    explore = TensorDictSequential(qnet, EGreedyModule(eps_init=0.5, eps_end=0.05, annealing_num_steps=200,
                                                       action_key=(group, "action"),
                                                       spec=env.full_action_spec[group, "action"]))
    mixer = TensorDictModule(QMixer(state_shape=env.observation_spec["state"].shape, mixing_embed_dim=embed,
                                    n_agents=n_agents, device="cpu"),
                             in_keys=[(group, "chosen_action_value"), "state"], out_keys=["chosen_action_value"])
    loss = QMixerLoss(qnet, mixer, delay_value=True, action_space=env.full_action_spec[group, "action"])
    loss.set_keys(action_value=(group, "action_value"), local_value=(group, "chosen_action_value"),
                  global_value="chosen_action_value", action=(group, "action"))
    loss.make_value_estimator(ValueEstimators.TD0, gamma=0.99)
    return group, qnet, explore, loss


def train(batches: int = 8, frames_per_batch: int = 12, updates_per_batch: int = 4, seed: int = 0,
          env_id: str = "pruning_env/Tiny-v1") -> dict:
    """Collect ``batches`` x ``frames_per_batch`` env steps, do QMIX updates; returns what it saw."""
    torch.manual_seed(seed)
    env = make_env(env_id)
    env.set_seed(seed)
    group, _qnet, explore, loss = build(env)
    optim = torch.optim.Adam(loss.parameters(), lr=5e-4)
    target = SoftUpdate(loss, eps=0.95)
    buffer = ReplayBuffer(storage=LazyTensorStorage(10_000), batch_size=16)
    collector = Collector(env, explore, frames_per_batch=frames_per_batch, total_frames=batches * frames_per_batch,
                          auto_register_policy_transforms=False)
    losses, episodes, returns = [], 0, []
    for data in collector:
        nxt = data["next"]
        # QMIX learns one team value: the global reward / done are the agents' mean / any.
        nxt.set("reward", nxt[group, "reward"].mean(-2))
        nxt.set("done", nxt[group, "done"].any(-2))
        nxt.set("terminated", nxt[group, "terminated"].any(-2))
        ends = nxt["done"].squeeze(-1)
        episodes += int(ends.sum())
        returns += [float(r) for r in nxt["reward"].squeeze(-1)[ends]]  # the last step's reward of each episode
        buffer.extend(data.reshape(-1))
        for _ in range(updates_per_batch):
            out = loss(buffer.sample())
            optim.zero_grad()
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(loss.parameters(), 10.0)
            optim.step()
            target.step()
            losses.append(float(out["loss"].detach()))
        explore[-1].step(frames=data.numel())
    collector.shutdown()
    env.close()
    return {"frames": batches * frames_per_batch, "episodes": episodes, "updates": len(losses),
            "first_loss": losses[0], "last_loss": losses[-1]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8, help="collector batches of 12 frames (4 episodes)")
    parser.add_argument("--smoke", action="store_true", help="tiny budget: 2 batches")
    parser.add_argument("--env", default="pruning_env/Tiny-v1",
                        help="registered parallel env id, e.g. pruning_env/Tiny-Surrogate-v1 (the surrogate mode)")
    args = parser.parse_args(argv)
    result = train(batches=2 if args.smoke else args.batches, env_id=args.env)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
