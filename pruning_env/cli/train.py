"""``python -m pruning_env.train``: train a baseline CNN (see :mod:`pruning_env.training.train`)."""

from __future__ import annotations

import argparse
import sys

from pruning_env.cli.options import add_config_args, config_from_args, print_json
from pruning_env.training import train as _train_module
from pruning_env.training.train import TrainConfig, TrainingInterrupted, train

__all__ = ["main"]

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pruning_env.train", description=_train_module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, TrainConfig)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(TrainConfig, args)
        summary = train(cfg)
    except (ValueError, RuntimeError) as exc:  # our errors carry actionable messages
        parser.exit(2, f"error: {exc}\n")
    except KeyboardInterrupt as exc:
        parser.exit(130, f"{exc if isinstance(exc, TrainingInterrupted) else 'interrupted'}\n")
    print_json(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
