"""The environment layer: the PettingZoo env, its observation features and objective, views, registry."""
