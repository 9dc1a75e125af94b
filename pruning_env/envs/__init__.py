"""The environment layer: the PettingZoo env, its observation features, objective and measurement record
(``measure.Measurement``), helpers around an env (``plans``), views, registry (versioned ids)."""
