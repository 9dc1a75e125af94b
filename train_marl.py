"""Learn a per-layer pruning policy with multi-agent RL, prune, fine-tune, report.

    python train_marl.py --net vgg16                      # preset "cpu" without a GPU, "paper" with one
    python train_marl.py --env pruning_env/Tiny-v1 --preset smoke --algo qmix

``python train_marl.py --help`` documents every flag; the implementation is
:mod:`pruning_env.cli.marl`.
"""

import sys

from pruning_env.cli.marl import main

if __name__ == "__main__":
    sys.exit(main())
