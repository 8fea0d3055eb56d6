"""CycleGAN's ResNet generator in `paddle.nn`, layer for layer as PaddleGAN builds it.

The layer order (and therefore every `state_dict()` key and shape) is the one of PaddleGAN's
`ppgan/models/generators/resnet.py`, which itself follows the original PyTorch CycleGAN
`models/networks.py`. With 9 blocks the state dict has 94 keys:

    model.0   reflect pad 3        model.10..(9+n) ResnetBlock       model.19 ConvTranspose 4ngf->2ngf
    model.1   conv 7x7 3->ngf      (each: pad, conv, norm, relu,     model.20 norm, model.21 relu
    model.2   norm, model.3 relu    pad, conv, norm)                 model.22 ConvTranspose 2ngf->ngf
    model.4   conv 3x3/2 ngf->2ngf                                   model.23 norm, model.24 relu
    model.5   norm, model.6 relu                                     model.25 reflect pad 3
    model.7   conv 3x3/2 2ngf->4ngf                                  model.26 conv 7x7 ngf->3
    model.8   norm, model.9 relu                                     model.27 tanh

InstanceNorm2D keeps PaddleGAN's `scale`/`bias` parameters (frozen at 1 and 0 there); their stored
values are honoured. Convolutions have biases because instance norm is used (PaddleGAN's `use_bias`).
"""

from __future__ import annotations

import paddle
from paddle import nn

# PaddleGAN freezes the instance-norm affine parameters at 1/0 (learning_rate=0, trainable=False).
_SCALE_ATTR = dict(initializer=nn.initializer.Constant(1.0), learning_rate=0.0, trainable=False)
_BIAS_ATTR = dict(initializer=nn.initializer.Constant(0.0), learning_rate=0.0, trainable=False)


def instance_norm(channels: int) -> nn.InstanceNorm2D:
    """PaddleGAN's 'instance' norm layer: per-image statistics, frozen unit scale and zero bias."""
    return nn.InstanceNorm2D(
        channels,
        weight_attr=paddle.ParamAttr(**_SCALE_ATTR),  # type: ignore[arg-type]
        bias_attr=paddle.ParamAttr(**_BIAS_ATTR),  # type: ignore[arg-type]
    )


class ResnetBlock(nn.Layer):
    """pad-conv-norm-relu-[dropout]-pad-conv-norm with a skip connection.

    Args:
        dim: channels in and out.
        use_dropout: insert Dropout(0.5) after the first ReLU; this shifts the second conv to index 5
            -> 6, exactly as in PaddleGAN, so such weights only load into a generator built with it.
    """

    def __init__(self, dim: int, use_dropout: bool = False) -> None:
        super().__init__()
        layers: list[nn.Layer] = [
            nn.Pad2D(padding=[1, 1, 1, 1], mode="reflect"),
            nn.Conv2D(dim, dim, kernel_size=3, padding=0, bias_attr=True),
            instance_norm(dim),
            nn.ReLU(),
        ]
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [
            nn.Pad2D(padding=[1, 1, 1, 1], mode="reflect"),
            nn.Conv2D(dim, dim, kernel_size=3, padding=0, bias_attr=True),
            instance_norm(dim),
        ]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Layer):
    """Image-to-image generator: 2 stride-2 downsamplings, `n_blocks` residual blocks, 2 upsamplings.

    Args:
        input_nc: input channels (3 for RGB).
        output_nc: output channels (3 for RGB).
        ngf: filters in the first conv layer; the bottleneck has 4*ngf.
        n_blocks: residual blocks at the bottleneck (9 for 256 px CycleGAN, 6 for 128 px).
        use_dropout: Dropout(0.5) inside each block (rare in CycleGAN checkpoints).
    Input and output are float32 NCHW in [-1, 1]; H and W must be multiples of 4.
    """

    def __init__(
        self, input_nc: int = 3, output_nc: int = 3, ngf: int = 64, n_blocks: int = 9, use_dropout: bool = False
    ) -> None:
        super().__init__()
        layers: list[nn.Layer] = [
            nn.Pad2D(padding=[3, 3, 3, 3], mode="reflect"),
            nn.Conv2D(input_nc, ngf, kernel_size=7, padding=0, bias_attr=True),
            instance_norm(ngf),
            nn.ReLU(),
        ]
        channels = ngf
        for _ in range(2):  # downsampling
            layers += [
                nn.Conv2D(channels, channels * 2, kernel_size=3, stride=2, padding=1, bias_attr=True),
                instance_norm(channels * 2),
                nn.ReLU(),
            ]
            channels *= 2
        layers += [ResnetBlock(channels, use_dropout) for _ in range(n_blocks)]
        for _ in range(2):  # upsampling
            layers += [
                nn.Conv2DTranspose(
                    channels, channels // 2, kernel_size=3, stride=2, padding=1, output_padding=1, bias_attr=True
                ),
                instance_norm(channels // 2),
                nn.ReLU(),
            ]
            channels //= 2
        layers += [
            nn.Pad2D(padding=[3, 3, 3, 3], mode="reflect"),
            nn.Conv2D(ngf, output_nc, kernel_size=7, padding=0),
            nn.Tanh(),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.model(x)


def build_generator(
    name: str = "resnet", *, ngf: int = 64, n_blocks: int = 9, use_dropout: bool = False
) -> ResnetGenerator:
    """Factory by registry name (`generator = "resnet"`)."""
    if name != "resnet":
        raise ValueError(f"unknown generator {name!r}; supported: resnet")
    return ResnetGenerator(3, 3, ngf=ngf, n_blocks=n_blocks, use_dropout=use_dropout)
