"""DSFP's KL sensitivity: its definition, its modes (option ``kl=``) and their dispatch.

The KL of filter ``F`` is ``KL(softmax(z) || softmax(z_F))``, ``z_F`` the logits with F's
conv output channel zeroed (before its BatchNorm), computed with the model in eval mode on
the first ``kl_batch_size`` (default 128, as DSFP's code) images, summed over classes and
averaged over the batch, in float64 from the logits (DSFP's code takes ``log`` of a
clamped softmax; we use ``log_softmax``).

=================  ==============================================================
mode               how (see the module named)
=================  ==============================================================
``exact_loop``     one forward per filter (:mod:`~pruning_env.criteria.kl_exact`)
``exact``          the same values, batched over filters (default; ``kl_exact``)
``fisher``         one backward, Fisher expansion at the conv output (``kl_linear``)
``fisher_delta``   one backward, Fisher expansion of the exact channel change
``linear``         ``K`` backward passes, KL of the linearised logits
=================  ==============================================================

``benchmarks/kl_speed.py`` measures their speed and their rank agreement with ``exact``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from torch import Tensor, nn

from pruning_env.core.fx import probe_forward
from pruning_env.criteria.checks import no_inplace, preserved, set_modes
from pruning_env.criteria.kl_exact import kl_batched, kl_loop
from pruning_env.criteria.kl_linear import kl_linearised

__all__ = ["KL_MODES", "KL_OPTIONS", "kl_labels_needed", "kl_options", "kl_scores"]

KL_MODES: Final[tuple[str, ...]] = ("exact", "exact_loop", "fisher", "fisher_delta", "linear")
"""Values of the ``kl=`` option (see the module docstring)."""

KL_OPTIONS: Final[Mapping[str, Any]] = {"kl": "exact", "kl_batch_size": 128, "kl_chunk_size": None, "kl_verify": True}
"""The KL options of the ``kl`` and ``dsfp`` criteria and their defaults."""


def kl_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate KL options (missing ones take the :data:`KL_OPTIONS` defaults).

    Returns:
        ``{"kl": mode or None, "kl_batch_size": int, "kl_chunk_size": int or None, "kl_verify": bool}``.

    Raises:
        ValueError: an unknown mode or a non-positive size.
    """
    mode = options.get("kl", KL_OPTIONS["kl"])
    if mode is not None and mode not in KL_MODES:
        raise ValueError(f"unknown KL mode {mode!r}; valid modes: {', '.join(KL_MODES)} (or None)")
    bs = options.get("kl_batch_size", KL_OPTIONS["kl_batch_size"])
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"kl_batch_size must be a positive integer, got {bs!r}")
    chunk = options.get("kl_chunk_size")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"kl_chunk_size must be a positive integer or None, got {chunk!r}")
    verify = bool(options.get("kl_verify", KL_OPTIONS["kl_verify"]))
    return {"kl": mode, "kl_batch_size": bs, "kl_chunk_size": chunk, "kl_verify": verify}


def kl_labels_needed(mode: str | None) -> bool:
    """Whether a KL mode needs labels (the Fisher modes use the cross-entropy)."""
    return mode in ("fisher", "fisher_delta")


def kl_scores(
    model: nn.Module,
    images: Tensor,
    labels: Tensor | None,
    convs: Mapping[str, nn.Conv2d],
    *,
    kl: str,
    kl_batch_size: int,
    kl_chunk_size: int | None,
    kl_verify: bool,
) -> dict[str, Tensor]:
    """The KL of every filter of ``convs`` in mode ``kl``; the model is left as found.

    Args:
        images: ``(N, C, H, W)`` on the model's device and dtype (the first
            ``kl_batch_size`` are used).
        labels: ``(N,)`` int64, required by the Fisher modes.

    Returns:
        ``{layer: (C_out,) float64}`` CPU tensors, in nats.
    """
    images = images[:kl_batch_size]
    labels = None if labels is None else labels[:kl_batch_size]
    with preserved(model, restore_buffers=False):
        no_inplace(model)  # cached activations must never be overwritten
        if kl == "exact_loop":
            return probe_forward(model, images, run=lambda x: kl_loop(model, x, convs))
        if kl == "exact":
            return probe_forward(
                model, images, run=lambda x: kl_batched(model, x, convs, chunk=kl_chunk_size, verify=kl_verify)
            )
        set_modes(model, batchnorm_train=False)  # eval mode, with gradients
        return kl_linearised(model, images, labels, convs, mode=kl)
