"""A CleanRL-style PPO loop with one shared policy over SuperSuit's vectorised pruning env.

SuperSuit turns the ParallelEnv into a vector env with one entry per agent (``layer_0 ... layer_3`` of
``Tiny-v1``), and ``concat_vec_envs_v1`` stacks copies of it; every entry gets the team reward.

    python examples/cleanrl_supersuit.py              # 20 updates of 2 copies x 4 agents x 6 steps
    python examples/cleanrl_supersuit.py --smoke      # 2 updates of 3 steps: what the test suite runs
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import supersuit as ss
import torch
from torch import nn

import pruning_env


def make_vec_env(copies: int = 2, env_id: str = "pruning_env/Tiny-v1"):
    env = pruning_env.make(env_id)
    vec = ss.pettingzoo_env_to_vec_env_v1(env)
    return ss.concat_vec_envs_v1(vec, copies, num_cpus=0, base_class="gymnasium")


class Agent(nn.Module):
    def __init__(self, obs_dim: int, n_actions: int, hidden: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.pi, self.v = nn.Linear(hidden, n_actions), nn.Linear(hidden, 1)

    def act(self, x: torch.Tensor, action: torch.Tensor | None = None):
        h = self.body(x)
        dist = torch.distributions.Categorical(logits=self.pi(h))
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action), dist.entropy(), self.v(h).squeeze(-1)


def train(updates: int = 20, num_steps: int = 6, copies: int = 2, seed: int = 0, gamma: float = 0.99,
          env_id: str = "pruning_env/Tiny-v1",
          lam: float = 0.95, clip: float = 0.2, epochs: int = 2) -> dict:
    torch.manual_seed(seed)
    envs = make_vec_env(copies, env_id)
    n = envs.num_envs
    agent = Agent(envs.observation_space.shape[0], envs.action_space.n)
    optim = torch.optim.Adam(agent.parameters(), lr=3e-4)
    obs, _ = envs.reset(seed=seed)
    obs = torch.as_tensor(obs, dtype=torch.float32)
    done = torch.zeros(n)
    returns, ret, losses = [], np.zeros(n), []
    for _ in range(updates):
        buf = {k: [] for k in ("obs", "act", "logp", "rew", "done", "val")}
        for _ in range(num_steps):
            with torch.no_grad():
                action, logp, _, value = agent.act(obs)
            nxt, reward, term, trunc, _ = envs.step(action.numpy())
            for k, v in (("obs", obs), ("act", action), ("logp", logp), ("rew", torch.as_tensor(reward)),
                         ("done", done), ("val", value)):
                buf[k].append(v.float() if k != "act" else v)
            ret += reward
            ended = np.logical_or(term, trunc)
            returns += ret[ended].tolist()
            ret[ended] = 0.0
            obs, done = torch.as_tensor(nxt, dtype=torch.float32), torch.as_tensor(ended, dtype=torch.float32)
        with torch.no_grad():
            next_value = agent.act(obs)[3]
        b = {k: torch.stack(v) for k, v in buf.items()}
        adv, last = torch.zeros_like(b["rew"]), torch.zeros(n)
        for t in reversed(range(num_steps)):  # GAE
            nonterm = 1.0 - (done if t == num_steps - 1 else b["done"][t + 1])
            nv = next_value if t == num_steps - 1 else b["val"][t + 1]
            delta = b["rew"][t] + gamma * nv * nonterm - b["val"][t]
            adv[t] = last = delta + gamma * lam * nonterm * last
        target = adv + b["val"]
        flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in b.items()}
        adv_f, target_f = adv.reshape(-1), target.reshape(-1)
        for _ in range(epochs):
            _, logp, ent, value = agent.act(flat["obs"], flat["act"])
            ratio = (logp - flat["logp"]).exp()
            a = (adv_f - adv_f.mean()) / (adv_f.std() + 1e-8)
            pg = -torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a).mean()
            loss = pg + 0.5 * ((value - target_f) ** 2).mean() - 0.01 * ent.mean()
            optim.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), 0.5)
            optim.step()
            losses.append(float(loss.detach()))
    envs.close()
    return {"vec_envs": n, "updates": updates, "agent_episodes": len(returns),
            "mean_return": float(np.mean(returns)) if returns else None, "last_loss": losses[-1]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny budget: 2 updates of 3 steps")
    parser.add_argument("--env", default="pruning_env/Tiny-v1",
                        help="registered parallel env id, e.g. pruning_env/Tiny-Surrogate-v1 (the surrogate mode)")
    args = parser.parse_args(argv)
    result = train(2, num_steps=3, env_id=args.env) if args.smoke else train(args.updates, env_id=args.env)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
