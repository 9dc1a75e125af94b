"""Reproducible benchmarks on real data; run from the repository root as ``python -m benchmarks.<name>``."""
