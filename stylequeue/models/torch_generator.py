"""CycleGAN's ResNet generator in `torch.nn`, layer for layer as `models/generator.py` builds it in Paddle.

Same layer order, so the same `model.N` indices (see generator.py's table: reflect pad 3, conv 7x7,
norm, relu, two stride-2 convs, `n_blocks` residual blocks, two transposed convs, reflect pad 3,
conv 7x7, tanh). The one difference is a name: PaddleGAN's instance norm stores `scale`/`bias`, PyTorch's
affine `InstanceNorm2d` stores `weight`/`bias`; `load_paddlegan_state` renames, nothing else changes
(Conv `[out, in, k, k]` and ConvTranspose `[in, out, k, k]` are the same in both frameworks).

Both frameworks' instance norms use eps 1e-5 and per-image statistics, so batching changes nothing.
This module imports torch: only the torch runtime imports it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn


def _instance_norm(channels: int) -> nn.InstanceNorm2d:
    # affine=True holds PaddleGAN's stored scale/bias (1 and 0 unless trained otherwise).
    return nn.InstanceNorm2d(channels, eps=1e-5, affine=True, track_running_stats=False)


class ResnetBlock(nn.Module):
    """pad-conv-norm-relu-[dropout]-pad-conv-norm with a skip connection (generator.py's ResnetBlock)."""

    def __init__(self, dim: int, use_dropout: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), _instance_norm(dim), nn.ReLU()]
        if use_dropout:
            layers.append(nn.Dropout(0.5))  # shifts the second conv from index 5 to 6, as in PaddleGAN
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), _instance_norm(dim)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """Image-to-image generator: 2 stride-2 downsamplings, `n_blocks` residual blocks, 2 upsamplings.

    Args:
        ngf: filters in the first conv layer; the bottleneck has 4*ngf.
        n_blocks: residual blocks at the bottleneck.
        use_dropout: Dropout(0.5) inside each block (inactive in eval mode).
    Input and output are float NCHW in [-1, 1]; H and W must be multiples of 4.
    """

    def __init__(self, ngf: int = 64, n_blocks: int = 9, use_dropout: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7), _instance_norm(ngf), nn.ReLU()]
        channels = ngf
        for _ in range(2):  # downsampling
            layers += [nn.Conv2d(channels, channels * 2, 3, stride=2, padding=1), _instance_norm(channels * 2),
                       nn.ReLU()]
            channels *= 2
        layers += [ResnetBlock(channels, use_dropout) for _ in range(n_blocks)]
        for _ in range(2):  # upsampling
            layers += [nn.ConvTranspose2d(channels, channels // 2, 3, stride=2, padding=1, output_padding=1),
                       _instance_norm(channels // 2), nn.ReLU()]
            channels //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def load_paddlegan_state(model: ResnetGenerator, state: Mapping[str, np.ndarray]) -> None:
    """Load a validated PaddleGAN-layout state dict (weights.load_for_spec) into `model`, every key checked."""
    renamed = {(key.removesuffix(".scale") + ".weight" if key.endswith(".scale") else key): torch.from_numpy(
        np.ascontiguousarray(value, dtype=np.float32)) for key, value in state.items()}
    model.load_state_dict(renamed, strict=True)
