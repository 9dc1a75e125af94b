"""The search loop shared by ``train_marl.py`` and the benchmarks (budget unit: plans measured)."""
