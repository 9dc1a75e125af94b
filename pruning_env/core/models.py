"""CIFAR-style CNNs: VGG-11/13/16/19 (BN), AlexNet (CIFAR variant), ResNet-20/56, and ``tiny``.

Every network is built from plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear``
modules so that the pruning engine can shrink them physically, and every network
can be rebuilt from a *channel spec*: the actual output widths of its convs
(and hidden Linear layers), which is what a checkpoint stores after pruning.

Input sizes
-----------
* VGG: any square-ish input of at least 32x32 (five 2x2 max-pools, then a global
  average pool, so the classifier always sees ``C_last`` features). At 32x32 the
  global pool is the identity (the feature map is 1x1), matching the paper's VGG-16.
* AlexNet: at least 32x32 (three 2x2 max-pools, then an adaptive average pool to
  4x4, so the first Linear always takes ``C_last * 16`` inputs in 16-element
  spatial blocks per channel). At 32x32 the adaptive pool is the identity.
* tiny: 4 convs (16, M, 32, M, 32, 64, M) and a 64->32->C head, global average
  pool; any input of at least 8x8.
* ResNet: at least 8x8 (two stride-2 stages and a global average pool); 32x32 is
  the design size.

ResNet shortcut: option A of He et al. (2016), a parameter-free identity shortcut
that subsamples spatially and zero-pads the new channels, as in the original
CIFAR ResNet-20/56 (0.27 M / 0.85 M parameters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pruning_env.core.fx import probe_forward

__all__ = ["ModelSpec", "build", "build_from_spec", "channel_spec", "check_classes", "check_float32", "list_models"]

VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
    ],
}
ALEXNET_CONFIG: list[int | str] = [64, "M", 192, "M", 384, 256, 256, "M"]
# A 4-conv network for tests and tutorials (the Tiny-v1 env): seconds to train on CPU.
TINY_CONFIG: list[int | str] = [16, "M", 32, "M", 32, 64, "M"]
TINY_HIDDEN = [32]
ALEXNET_HIDDEN = [1024, 512]
VGG_HIDDEN = [512]
RESNET_DEPTHS = {"resnet20": 20, "resnet56": 56}
# Non-VGG plain networks: (layout, hidden Linear widths, adaptive pool size).
_PLAIN: dict[str, tuple[list[int | str], list[int], int]] = {
    "alexnet": (ALEXNET_CONFIG, ALEXNET_HIDDEN, 4),
    "tiny": (TINY_CONFIG, TINY_HIDDEN, 1),
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network, pruned or not.

    Attributes:
        arch: registered architecture name, e.g. ``"vgg16"``.
        num_classes: number of output logits.
        in_channels: input image channels (1 = grayscale, 3 = RGB).
        convs: output channels of every conv, in ``named_modules()`` order.
        hidden: output features of every hidden Linear layer (excludes the last).
    """

    arch: str
    num_classes: int
    in_channels: int
    convs: tuple[int, ...]
    hidden: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "convs": list(self.convs),
            "hidden": list(self.hidden),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(
            arch=str(d["arch"]),
            num_classes=int(d["num_classes"]),
            in_channels=int(d["in_channels"]),
            convs=tuple(int(c) for c in d["convs"]),
            hidden=tuple(int(h) for h in d["hidden"]),
        )


def _scale(c: int, width: float) -> int:
    return max(1, round(c * width))


class PlainCNN(nn.Module):
    """Conv-BN-ReLU stack with max-pools, an adaptive pool and an MLP classifier.

    Used for VGG and AlexNet. ``forward`` maps ``(N, C_in, H, W)`` images to
    ``(N, num_classes)`` logits.
    """

    def __init__(
        self,
        arch: str,
        layout: list[int | str],
        hidden: list[int],
        num_classes: int,
        in_channels: int,
        pool_size: int,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.arch = arch
        layers: list[nn.Module] = []
        c_in = in_channels
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                c_out = int(item)
                layers += [
                    nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True),
                ]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        head: list[nn.Module] = []
        f_in = c_in * pool_size * pool_size
        for h in hidden:
            head += [nn.Dropout(dropout), nn.Linear(f_in, h), nn.ReLU(inplace=True)]
            f_in = h
        head.append(nn.Linear(f_in, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block with an option-A (zero-pad) identity shortcut.

    ``conv1`` is block-internal: its output channels (``mid``) can be pruned
    freely. ``conv2`` feeds the residual addition and keeps the stage width.
    """

    def __init__(self, c_in: int, mid: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, mid, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride = stride
        self.pad = c_out - c_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            lo = self.pad // 2
            x = F.pad(x, (0, 0, 0, 0, lo, self.pad - lo))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR (He et al. 2016, Sec. 4.2), option-A shortcuts."""

    def __init__(
        self, arch: str, depth: int, stage_widths: list[int], mids: list[int], num_classes: int, in_channels: int
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        if len(mids) != 3 * n:
            raise ValueError(f"{arch} needs {3 * n} block-internal widths, got {len(mids)}")
        self.arch = arch
        self.conv1 = nn.Conv2d(in_channels, stage_widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stage_widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages: list[nn.Module] = []
        c_in = stage_widths[0]
        k = 0
        for s, width in enumerate(stage_widths):
            blocks = []
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(BasicBlock(c_in, mids[k], width, stride))
                c_in = width
                k += 1
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def list_models() -> list[str]:
    """Names accepted by :func:`build`."""
    return sorted([*VGG_CONFIGS, "alexnet", *RESNET_DEPTHS, "tiny"])


def _check_common(name: str, num_classes: int, in_channels: int) -> None:
    if name not in list_models():
        raise ValueError(f"unknown network {name!r}; choose one of {', '.join(list_models())}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if in_channels not in (1, 3) and (not isinstance(in_channels, int) or in_channels < 1):
        raise ValueError(f"in_channels must be a positive integer (1 grayscale, 3 RGB), got {in_channels!r}")


def default_spec(name: str, *, num_classes: int, in_channels: int = 3, width: float = 1.0) -> ModelSpec:
    """The channel spec of an unpruned ``name`` at ``width`` (see :func:`build`)."""
    _check_common(name, num_classes, in_channels)
    if not (isinstance(width, (int, float)) and 0 < width <= 8):
        raise ValueError(f"width must be a number in (0, 8], got {width!r}")
    if name in VGG_CONFIGS:
        convs = [_scale(c, width) for c in VGG_CONFIGS[name] if c != "M"]
        hidden = [_scale(h, width) for h in VGG_HIDDEN]
    elif name in _PLAIN:
        layout, hid, _ = _PLAIN[name]
        convs = [_scale(c, width) for c in layout if c != "M"]
        hidden = [_scale(h, width) for h in hid]
    else:
        n = (RESNET_DEPTHS[name] - 2) // 6
        stages = [_scale(c, width) for c in (16, 32, 64)]
        convs = [stages[0]]
        for w in stages:
            convs += [w, w] * n
        hidden = []
    return ModelSpec(name, num_classes, in_channels, tuple(convs), tuple(hidden))


def build_from_spec(spec: ModelSpec) -> nn.Module:
    """Build a (possibly pruned) network with exactly the widths in ``spec``."""
    _check_common(spec.arch, spec.num_classes, spec.in_channels)
    convs = list(spec.convs)
    if spec.arch in VGG_CONFIGS or spec.arch in _PLAIN:
        base, hid, pool = _PLAIN.get(spec.arch, (VGG_CONFIGS.get(spec.arch), VGG_HIDDEN, 1))
        n_conv = sum(1 for c in base if c != "M")
        n_hidden = len(hid)
        if len(convs) != n_conv or len(spec.hidden) != n_hidden:
            raise ValueError(
                f"{spec.arch} has {n_conv} convs and {n_hidden} hidden Linear layers; "
                f"the spec gives {len(convs)} and {len(spec.hidden)}"
            )
        it = iter(convs)
        layout = [c if c == "M" else next(it) for c in base]
        return PlainCNN(spec.arch, layout, list(spec.hidden), spec.num_classes, spec.in_channels, pool)
    depth = RESNET_DEPTHS[spec.arch]
    n = (depth - 2) // 6
    if len(convs) != 1 + 6 * n:
        raise ValueError(f"{spec.arch} has {1 + 6 * n} convs; the spec gives {len(convs)}")
    blocks = [(convs[1 + 2 * i], convs[2 + 2 * i]) for i in range(3 * n)]
    stage_widths = [blocks[s * n][1] for s in range(3)]
    for i, (_, out) in enumerate(blocks):
        if out != stage_widths[i // n]:
            raise ValueError(
                f"{spec.arch}: block {i} outputs {out} channels but its stage is {stage_widths[i // n]} wide; "
                "residual-coupled channels cannot be pruned separately"
            )
    if convs[0] != stage_widths[0]:
        raise ValueError(f"{spec.arch}: the stem conv must output the first stage's width {stage_widths[0]}")
    return CifarResNet(spec.arch, depth, stage_widths, [m for m, _ in blocks], spec.num_classes, spec.in_channels)


def build(name: str, *, num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """Build an unpruned CIFAR network.

    Args:
        name: one of :func:`list_models` (``vgg11/13/16/19``, ``alexnet``, ``resnet20``, ``resnet56``).
        num_classes: number of classes (10 for CIFAR-10, 100 for CIFAR-100).
        in_channels: 3 for RGB, 1 for grayscale input.
        width: multiplier on every conv's channels (and VGG/AlexNet hidden Linear widths),
            e.g. 0.25 for CPU-sized experiments. Channels are rounded, at least 1.

    Returns:
        The model in train mode. It maps ``(N, in_channels, H, W)`` float images
        (H, W >= 32; see the module docstring) to ``(N, num_classes)`` logits.
    """
    return build_from_spec(default_spec(name, num_classes=num_classes, in_channels=in_channels, width=width))


def channel_spec(model: nn.Module) -> ModelSpec:
    """Read the actual widths of a model built by this module (also after pruning)."""
    arch = getattr(model, "arch", None)
    if arch not in list_models():
        raise ValueError(
            "channel_spec() needs a network built by pruning_env.core.models (it has an .arch attribute); "
            f"got {type(model).__name__}"
        )
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return ModelSpec(
        arch=arch,
        num_classes=linears[-1].out_features,
        in_channels=convs[0].in_channels,
        convs=tuple(c.out_channels for c in convs),
        hidden=tuple(lin.out_features for lin in linears[:-1]),
    )


def check_float32(model: nn.Module, what: str = "the model") -> None:
    """Raise ``TypeError`` unless every floating parameter and buffer of ``model`` is float32.

    The package measures, prunes and fine-tunes float32 networks (inputs are float32 batches);
    another dtype would otherwise fail deep inside torch with a dtype clash.
    """
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in [*model.parameters(), *model.buffers()]
                     if t.is_floating_point() and t.dtype != torch.float32})
    if dtypes:
        raise TypeError(f"{what} has {', '.join(dtypes)} weights; pruning_env works on float32 models only: "
                        "pass model.float()")


def check_classes(model: nn.Module, input_shape: tuple[int, int, int], classes: int, what: str = "the model") -> None:
    """Raise ``ValueError`` unless ``model`` scores an image of ``input_shape`` (``[C, H, W]``) into ``classes``
    outputs, the data set's number of classes: a 10-class network measured on a 4-class data set would give a
    meaningless accuracy, without any error.

    Runs one forward pass of a zero image (:func:`~pruning_env.core.fx.probe_forward`: batch 1, the model's device,
    no gradients, eval mode, every module's mode restored). An output that is not a ``(1, K)`` tensor is not checked.
    """
    try:
        out = probe_forward(model, (1, *input_shape))
    except RuntimeError as exc:
        raise ValueError(f"{what} cannot run on the data set's images of shape {list(input_shape)} "
                         f"({str(exc).splitlines()[0]}): it was made for other images") from None
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] != classes:
        raise ValueError(f"{what} has {out.shape[1]} outputs but the data set has {classes} classes: it was trained "
                         "on another data set, so its accuracy here would mean nothing; use the network trained on "
                         "this data set (or the data set it was trained on)")
