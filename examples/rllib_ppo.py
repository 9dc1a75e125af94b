"""RLlib PPO with one shared policy for every layer agent of the pruning env (``ParallelPettingZooEnv``).

Needs the optional extra, in its own virtual environment (Ray pins gymnasium 1.2.2):
``pip install torch==2.13.0 -e ".[rllib]"``. Exits with a message when Ray is not installed.

    python examples/rllib_ppo.py                # 5 training iterations
    python examples/rllib_ppo.py --smoke        # 1 iteration with tiny batches
    python examples/rllib_ppo.py --env-runners 4 # sampling in 4 Ray env-runner processes (a local Ray of 5 CPUs)
    python examples/rllib_ppo.py --smoke --env-runners 1   # what the test suite runs

RLlib's ``episode_return_mean`` sums the rewards of all agents, so it is ``L`` times the env's team return;
the per-agent returns (``agent_episode_returns_mean``) are the team return itself.
"""

from __future__ import annotations

import argparse
import json
import sys


def train(iterations: int = 5, batch: int = 48, seed: int = 0, env_runners: int = 0,
          env_id: str = "pruning_env/Tiny-v1") -> dict:
    """PPO for ``iterations`` iterations of ``batch`` env steps; ``env_runners`` > 0 samples in that many Ray
    env-runner actors (each with its own env), 0 in the driver."""
    import ray
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.env.wrappers.pettingzoo_env import ParallelPettingZooEnv
    from ray.tune.registry import register_env

    def env_creator(_config):
        import pruning_env

        return ParallelPettingZooEnv(pruning_env.make(env_id))

    register_env("pruning_env_tiny", env_creator)
    ray.init(num_cpus=1 + env_runners, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        config = (
            PPOConfig()
            .environment("pruning_env_tiny")
            .framework("torch")
            .env_runners(num_env_runners=env_runners, rollout_fragment_length=max(1, batch // max(1, env_runners)))
            .multi_agent(policies={"shared"}, policy_mapping_fn=lambda agent_id, *args, **kwargs: "shared")
            .training(train_batch_size_per_learner=batch, minibatch_size=batch // 2, num_epochs=1, lr=3e-4)
            .debugging(seed=seed)
        )
        algo = config.build_algo()
        results = [algo.train() for _ in range(iterations)]
        remote_runners = algo.env_runner_group.num_healthy_remote_env_runners()
        algo.stop()
    finally:
        ray.shutdown()
    last = results[-1]
    runners = last.get("env_runners", {})
    learner = last.get("learners", {}).get("shared", {})
    return {
        "iterations": len(results),
        "env_runners": remote_runners,
        "env_steps": int(runners.get("num_env_steps_sampled_lifetime", 0)),
        "episodes": int(runners.get("num_episodes_lifetime", 0)),
        "episode_return_mean": runners.get("episode_return_mean"),
        "agent_episode_returns_mean": runners.get("agent_episode_returns_mean"),
        "total_loss": learner.get("total_loss"),
    }


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny budget: 1 iteration of 24 env steps")
    parser.add_argument("--env-runners", type=int, default=0,
                        help="RLlib num_env_runners: sampling actors (0: sample in the driver)")
    parser.add_argument("--env", default="pruning_env/Tiny-v1",
                        help="registered parallel env id, e.g. pruning_env/Tiny-Surrogate-v1 (the surrogate mode)")
    args = parser.parse_args(argv)
    if args.env_runners < 0:
        parser.error(f"--env-runners must be >= 0, got {args.env_runners}")
    try:
        import ray.rllib  # noqa: F401
    except ImportError:
        print('rllib_ppo: Ray RLlib is not installed (pip install torch==2.13.0 -e ".[rllib]"); skipping',
              file=sys.stderr)
        print(json.dumps({"skipped": "ray[rllib] not installed"}))
        return None
    result = train(1, batch=24, env_runners=args.env_runners, env_id=args.env) if args.smoke else \
        train(args.iterations, env_runners=args.env_runners, env_id=args.env)
    print(json.dumps(result, default=float))
    return result


if __name__ == "__main__":
    main()
