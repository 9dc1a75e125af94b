"""Filter-importance criteria: the three DSFP sensitivities, their fusion, and baselines.

Every criterion maps a network (and, for the data-driven ones, one calibration batch)
to one score per output filter of every ``nn.Conv2d``. This package knows nothing of
reinforcement learning or of the pruning engine: it only reads the model, and leaves
it exactly as it found it (weights, ``.grad``, BatchNorm running statistics, modes,
``requires_grad`` flags, hooks, device and dtype).

Criteria
--------
=============  ===================================================================
name           score of output filter ``F`` of a conv layer (LOW = prune first)
=============  ===================================================================
``grad``       mean over F's weights of ``|dL/dW|`` (DSFP; cross-entropy ``L``)
``taylor``     mean over F's weights of ``|W * dL/dW|`` (DSFP)
``kl``         ``KL(softmax(z) || softmax(z_F))``, ``z_F`` = logits with F's conv
               output channel zeroed (before its BatchNorm); DSFP. Option ``kl=``
               picks the mode (:data:`KL_MODES`, see :mod:`.kl`)
``dsfp``       the DSFP fusion of the three above (see :func:`fuse`), signed by the
               required ``direction`` (see below)
``l1``         ``sum |W|`` over F's weights (Li et al. 2017)
``l2``         ``sqrt(sum W^2)`` over F's weights (Li et al. 2017)
``taylor_fo``  ``mean_n (sum_{h,w} a * dl_n/da)^2`` (Molchanov et al. 2019), ``a`` F's
               channel after the BatchNorm that directly follows the conv
``fpgm``       sum of Euclidean distances from F's weights to those of every other
               filter of the layer (He et al. 2019, "Filter Pruning via Geometric Median")
``random``     uniform in [0, 1), seeded (``seed=``, default 0)
=============  ===================================================================

Every criterion accepts ``seed=`` (default 0); only those with randomness use it
(``Criterion.uses_seed``: ``random``), so callers never special-case a criterion by name.

Pruning direction
-----------------
:func:`score` always returns values such that **the filters with the lowest values
are pruned first** (:func:`prune_first` gives that order). For every criterion except
``dsfp`` the values are importance-like, so low means unimportant. ``dsfp`` is the
exception the source paper leaves open (its code prunes the lowest fused score, its text
the highest), so ``score(..., "dsfp", direction=...)`` requires ``direction="low"``
(returns the fused score ``s``) or ``direction="high"`` (returns ``-s``).

Modules
-------
:mod:`.base` the :class:`Criterion` class, the registry and :func:`score`;
:mod:`.checks` input validation and model-state bookkeeping; :mod:`.dsfp` ``grad``,
``taylor``, ``kl``, ``dsfp``, :class:`Components`, :func:`fuse`; :mod:`.baselines`
``l1``, ``l2``, ``taylor_fo``, ``fpgm``, ``random``; :mod:`.gradient` the gradient pass
(BatchNorm batch statistics, dropout off, no ``.grad`` touched); :mod:`.kl`,
:mod:`.kl_exact`, :mod:`.kl_linear` the KL modes; :mod:`.interpreter` the torch.fx
interpreter of the batched exact KL (its channel-wise op table is shared with the
prunable-layer policy, in :mod:`pruning_env.core.fx`).

Adding a criterion
------------------
One class in one file: subclass :class:`Criterion`, say what it needs and which options
it takes, implement :meth:`Criterion.compute`, and register it by name::

    import torch
    from pruning_env.criteria import Criterion, register_criterion, score

    @register_criterion("weight_power")
    class WeightPower(Criterion):
        \"\"\"sum |W|^p over the filter's weights.\"\"\"

        needs_data = False        # gets images = labels = None
        needs_labels = False
        options = {"p": 1.0}      # accepted options and their defaults

        def compute(self, model, images, labels, convs, *, seed):
            p = self.config["p"]
            return {name: conv.weight.detach().abs().pow(p).flatten(1).sum(1) for name, conv in convs.items()}

    score(model, None, None, "weight_power", p=2.0)  # also in list_criteria(), the env and the CLIs

:func:`score` validates the inputs and options, moves the batch to the model's device and
dtype, and returns each layer's scores as a ``(C_out,)`` float32 CPU tensor.
"""

from __future__ import annotations

# Registration order is the order of list_criteria(): DSFP's criteria, then the baselines.
from pruning_env.criteria.base import (
    Criterion,
    get_criterion,
    list_criteria,
    prune_first,
    register_criterion,
    score,
    unregister_criterion,
)
from pruning_env.criteria.dsfp import (
    DIRECTIONS,
    Components,
    apply_direction,
    compute_components,
    fuse,
    fuse_normalised,
    minmax,
)

# isort: split
from pruning_env.criteria import baselines as baselines  # registers l1, l2, taylor_fo, fpgm, random
from pruning_env.criteria.kl import KL_MODES

__all__ = [
    "CRITERIA",
    "DIRECTIONS",
    "KL_MODES",
    "Components",
    "Criterion",
    "apply_direction",
    "compute_components",
    "fuse",
    "fuse_normalised",
    "get_criterion",
    "list_criteria",
    "minmax",
    "prune_first",
    "register_criterion",
    "score",
    "unregister_criterion",
]

CRITERIA: tuple[str, ...] = tuple(list_criteria())
"""The built-in criteria (registered when the package is imported); :func:`list_criteria`
also lists those registered later."""
