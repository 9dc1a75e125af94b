"""The bottom layer: models, data, checkpoints, evaluation and shared config helpers.

Nothing here knows of pruning or reinforcement learning.
"""
