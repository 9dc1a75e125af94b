"""Stable-Baselines3 PPO on the joint single-agent view of the pruning env (one ``MultiDiscrete`` action: every
layer's rate at once; reward = the team reward).

    python examples/sb3_ppo.py                 # 600 env steps (200 episodes of Tiny-v1)
    python examples/sb3_ppo.py --smoke         # 24 steps: what the test suite runs

``"pruning_env:..."`` makes Gymnasium import the package first, so no ``import pruning_env`` is needed.
"""

from __future__ import annotations

import argparse
import json

import gymnasium
from stable_baselines3 import PPO


def train(steps: int = 600, seed: int = 0) -> dict:
    env = gymnasium.make("pruning_env:pruning_env/Tiny-Joint-v1")
    model = PPO("MlpPolicy", env, n_steps=12, batch_size=12, n_epochs=2, learning_rate=3e-4, seed=seed, verbose=0)
    model.learn(total_timesteps=steps)
    obs, _ = env.reset(seed=seed)
    ret, done, info = 0.0, False, {}
    while not done:  # one greedy episode
        action, _ = model.predict(obs, deterministic=True)
        obs, reward, done, _, info = env.step(action)
        ret += float(reward)
    return {"steps": int(model.num_timesteps), "episodes": len(model.ep_info_buffer),
            "greedy_return": ret, "greedy_macs_ratio": info["macs_ratio"], "greedy_acc_ratio": info["acc_ratio"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="env steps to learn for")
    parser.add_argument("--smoke", action="store_true", help="tiny budget: 24 steps")
    args = parser.parse_args(argv)
    result = train(24 if args.smoke else args.steps)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
