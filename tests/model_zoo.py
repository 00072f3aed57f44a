"""Small models written the way torchvision and timm write theirs, for the convert, audit and fold tests
(torchvision's PyPI wheel does not import beside the CPU torch used here, and timm needs it).

What they share with the real code, and what broke flexbn before: in-place activations right after a batch
norm (``nn.ReLU(inplace=True)``, ``Hardswish``, ``SiLU``), residual additions in place (``out += identity``),
a ``BatchNormAct2d`` that subclasses ``nn.BatchNorm2d`` and whose ``forward`` is a copy of torch's followed by
a drop layer and an activation (timm's ``layers/norm_act.py``), timm's ``SyncBatchNormAct`` (a
``torch.nn.SyncBatchNorm`` subclass calling ``super().forward`` then the activation), pre-activation dense
layers (batch norm before the convolution, ``torch.cat``), and lazy modules.

Every factory returns a model with random weights, biases and running statistics (ones and zeros would hide
a swapped or unfolded tensor); ``flexbn audit tests/model_zoo.py:resnet --input-shape 4,3,16,16`` runs them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


# ----------------------------------------------------------------------------------------------------------
# torchvision: models/resnet.py


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: Any = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class ResNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 8, norm_layer: Any = None) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(width, width, norm_layer=norm_layer))
        down = nn.Sequential(conv1x1(width, 2 * width, 2), norm_layer(2 * width))
        self.layer2 = nn.Sequential(
            BasicBlock(width, 2 * width, 2, down, norm_layer=norm_layer),
            BasicBlock(2 * width, 2 * width, norm_layer=norm_layer),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)

        return x


def resnet(num_classes: int = 10, width: int = 8) -> nn.Module:
    return randomize(ResNet(num_classes, width))


# ----------------------------------------------------------------------------------------------------------
# torchvision: models/mobilenetv3.py and ops/misc.py


class Conv2dNormActivation(nn.Sequential):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation_layer: Any = nn.ReLU,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                (kernel_size - 1) // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels, eps=0.001, momentum=0.01),
        ]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, input_channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, input: Tensor) -> Tensor:
        scale = self.avgpool(input)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return input * self.scale_activation(scale)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, expanded: int, cout: int, stride: int, use_se: bool) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = [
            Conv2dNormActivation(cin, expanded, 1, activation_layer=nn.Hardswish),
            Conv2dNormActivation(expanded, expanded, 3, stride, expanded, nn.Hardswish),
        ]
        if use_se:
            layers.append(SqueezeExcitation(expanded, max(expanded // 4, 2)))
        layers.append(Conv2dNormActivation(expanded, cout, 1, activation_layer=None))
        self.block = nn.Sequential(*layers)

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class MobileNetV3(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            Conv2dNormActivation(3, 8, 3, 2, activation_layer=nn.Hardswish),
            InvertedResidual(8, 16, 8, 1, True),
            InvertedResidual(8, 24, 12, 2, False),
            Conv2dNormActivation(12, 24, 1, activation_layer=nn.Hardswish),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(24, 16),
            nn.BatchNorm1d(16),
            nn.Hardswish(inplace=True),
            nn.Linear(16, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet(num_classes: int = 10) -> nn.Module:
    return randomize(MobileNetV3(num_classes))


# ----------------------------------------------------------------------------------------------------------
# timm: layers/norm_act.py, models/_efficientnet_blocks.py, models/densenet.py


def _assert(condition: bool, message: str) -> None:
    torch._assert(condition, message)  # timm's layers/trace_utils.py


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's: a ``nn.BatchNorm2d`` subclass (checkpoint compatibility) whose forward is a copy of
    torch's, then a drop layer and an activation."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        apply_act: bool = True,
        act_layer: Any = nn.ReLU,
        inplace: bool = True,
        drop_layer: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            **factory_kwargs,
        )
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace) if apply_act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # cut & paste of torch.nn.BatchNorm2d.forward impl to avoid issues with torchscript and tracing
        _assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")

        # exponential_average_factor is set to self.momentum
        # (when it is available) only so that it gets updated
        # in ONNX graph when this node is exported to ONNX.
        if self.momentum is None:  # noqa: SIM108 (timm's code as it is)
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum

        if self.training and self.track_running_stats:  # noqa: SIM102
            # TODO: if statement only here to tell the jit to skip emitting this when it is None
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # use cumulative moving average
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:  # use exponential moving average
                    exponential_average_factor = self.momentum

        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)

        x = F.batch_norm(
            x,
            # If buffers are not to be tracked, ensure that they won't be updated
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        x = self.act(x)
        return x


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm's: only made by timm's convert_sync_batchnorm, with ``drop`` and ``act`` set afterwards."""

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


class SqueezeExcite(nn.Module):
    def __init__(self, in_chs: int, rd_channels: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(in_chs, rd_channels, 1, bias=True)
        self.act1 = nn.SiLU(inplace=True)
        self.conv_expand = nn.Conv2d(rd_channels, in_chs, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.conv_reduce(x_se)
        x_se = self.act1(x_se)
        x_se = self.conv_expand(x_se)
        return x * self.gate(x_se)


class EfficientInvertedResidual(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, exp_ratio: int = 4, stride: int = 1) -> None:
        super().__init__()
        mid_chs = in_chs * exp_ratio
        self.has_skip = in_chs == out_chs and stride == 1
        self.conv_pw = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.bn1 = BatchNormAct2d(mid_chs, act_layer=nn.SiLU)
        self.conv_dw = nn.Conv2d(mid_chs, mid_chs, 3, stride, 1, groups=mid_chs, bias=False)
        self.bn2 = BatchNormAct2d(mid_chs, act_layer=nn.SiLU)
        self.se = SqueezeExcite(mid_chs, max(mid_chs // 4, 2))
        self.conv_pwl = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.bn3 = BatchNormAct2d(out_chs, apply_act=False)
        self.drop_path = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.conv_pw(x)
        x = self.bn1(x)
        x = self.conv_dw(x)
        x = self.bn2(x)
        x = self.se(x)
        x = self.conv_pwl(x)
        x = self.bn3(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class EfficientNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = BatchNormAct2d(8, act_layer=nn.SiLU)
        self.blocks = nn.Sequential(
            EfficientInvertedResidual(8, 8), EfficientInvertedResidual(8, 12, stride=2)
        )
        self.conv_head = nn.Conv2d(12, 16, 1, bias=False)
        self.bn2 = BatchNormAct2d(16, act_layer=nn.SiLU)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_stem(x)
        x = self.bn1(x)
        x = self.blocks(x)
        x = self.conv_head(x)
        x = self.bn2(x)
        x = self.global_pool(x).flatten(1)
        return self.classifier(x)


def efficientnet(num_classes: int = 10) -> nn.Module:
    return randomize(EfficientNet(num_classes))


class DenseLayer(nn.Module):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int = 2) -> None:
        super().__init__()
        self.add_module("norm1", BatchNormAct2d(num_input_features))
        self.add_module(
            "conv1", nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
        )
        self.add_module("norm2", BatchNormAct2d(bn_size * growth_rate))
        self.add_module(
            "conv2", nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        )

    def forward(self, xs: list[Tensor] | Tensor) -> Tensor:
        prev_features = [xs] if isinstance(xs, Tensor) else xs
        concated_features = torch.cat(prev_features, 1)
        bottleneck_output = self.conv1(self.norm1(concated_features))
        return self.conv2(self.norm2(bottleneck_output))


class DenseNet(nn.Module):
    def __init__(self, num_classes: int = 10, growth_rate: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNormAct2d(8))
        self.layers = nn.ModuleList(
            [DenseLayer(8 + i * growth_rate, growth_rate) for i in range(3)]
        )
        self.norm5 = BatchNormAct2d(8 + 3 * growth_rate)
        self.classifier = nn.Linear(8 + 3 * growth_rate, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = [self.features(x)]
        for layer in self.layers:
            features.append(layer(features))
        x = self.norm5(torch.cat(features, 1))
        return self.classifier(x.mean((2, 3)))


def densenet(num_classes: int = 10) -> nn.Module:
    return randomize(DenseNet(num_classes))


# ----------------------------------------------------------------------------------------------------------
# lazy modules


def lazy(num_classes: int = 10) -> nn.Module:
    """Shapes inferred at the first forward; weights only exist after it."""
    return nn.Sequential(
        nn.LazyConv2d(8, 3, padding=1, bias=False),
        nn.LazyBatchNorm2d(),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.LazyLinear(16),
        nn.LazyBatchNorm1d(),
        nn.ReLU(inplace=True),
        nn.LazyLinear(num_classes),
    )


FACTORIES = {
    "resnet": resnet,
    "mobilenet": mobilenet,
    "efficientnet": efficientnet,
    "densenet": densenet,
    "lazy": lazy,
}
INPUT_SHAPE = (4, 3, 16, 16)
