"""Analytic MACs and parameter counts for conv, linear and BatchNorm layers.

Units: one MAC is one multiply-accumulate. FLOPs = 2 x MACs (the convention of
most pruning papers that quote "FLOPs" is actually MACs; we always say MACs).

The counter runs one probe forward (:func:`pruning_env.core.fx.probe_forward`: eval
mode, no gradients, on the model's device and dtype) on a zero tensor of ``input_shape``
with hooks that read only the *shapes* of each layer's output, so it works for
any widths (also after pruning) and any input size, and it never copies the
model. Counted per layer:

* ``Conv2d``: ``H_out * W_out * C_out * (C_in / groups) * k_h * k_w`` MACs.
* ``Linear``: ``in_features * out_features`` MACs.
* ``BatchNorm2d/1d``: one MAC per output element (the folded scale-and-shift).

Bias additions, pooling, activations and the residual addition are not counted
(they are additions or comparisons, not multiply-accumulates), as in the papers we
compare with and in ``torch.utils.flop_counter``. For VGG-16 on CIFAR-10 this gives
313.46 M MACs for its convs and Linears (the paper's figure) plus 0.28 M for BN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pruning_env.core.fx import probe_forward

__all__ = ["FlopsReport", "count"]

_COUNTED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)


@dataclass
class FlopsReport:
    """MACs and parameters of a model for one input shape.

    Attributes:
        macs: total multiply-accumulates for one image.
        params: total number of parameters (all of ``model.parameters()``).
        per_layer_macs: MACs of each counted module, keyed by its ``named_modules()`` name.
        per_layer_params: parameters of each counted module, same keys.
    """

    macs: int
    params: int
    per_layer_macs: dict[str, int] = field(default_factory=dict)
    per_layer_params: dict[str, int] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        """FLOPs = 2 x MACs."""
        return 2 * self.macs


def _layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return int(out.numel() // out.shape[0]) * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        rows = out.numel() // out.shape[-1] // out.shape[0]
        return rows * module.out_features * module.in_features
    return int(out.numel() // out.shape[0])  # BatchNorm


def count(model: nn.Module, input_shape: tuple[int, ...]) -> FlopsReport:
    """Count MACs and parameters of ``model`` for one input of ``input_shape``.

    Args:
        model: any ``nn.Module`` (not modified; every module's train/eval mode is restored).
        input_shape: ``(C, H, W)`` of one image, or ``(1, C, H, W)``.

    Returns:
        A :class:`FlopsReport`; MACs are per image.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or shape[0] != 1 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) or (1, C, H, W), got {input_shape!r}")
    per_macs: dict[str, int] = {}
    per_params: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, _COUNTED):
            per_params[name] = sum(p.numel() for p in module.parameters(recurse=False))

            def hook(mod: nn.Module, _inp: tuple, out: torch.Tensor, name: str = name) -> None:
                per_macs[name] = per_macs.get(name, 0) + _layer_macs(mod, out)

            handles.append(module.register_forward_hook(hook))
    try:
        probe_forward(model, shape)
    except RuntimeError as exc:
        raise ValueError(
            f"the model does not accept an input of shape {shape}: {exc}. "
            "Pass the (C, H, W) the model was built for (e.g. (3, 32, 32) for CIFAR)."
        ) from None
    finally:
        for h in handles:
            h.remove()
    return FlopsReport(
        macs=sum(per_macs.values()),
        params=sum(p.numel() for p in model.parameters()),
        per_layer_macs=per_macs,
        per_layer_params=per_params,
    )
