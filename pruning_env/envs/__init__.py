"""The environment layer: the PettingZoo env, its observation features, objective and measurement record
(``measure.Measurement``), helpers around an env (``plans``), views, registry (versioned ids), surrogate mode
(``surrogate``; ``surrogate_vector`` for many episodes at once)."""
