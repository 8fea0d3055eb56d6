"""CycleGAN's PatchGAN discriminator (PaddleGAN's `NLayerDiscriminator` layer order) and its pool of fakes.

With `n_layers = 3` each output unit sees a 70x70 patch of the input (the "70x70 PatchGAN" of the
CycleGAN paper). Layers, all 4x4 convolutions:

    model.0  conv stride 2, 3 -> ndf          model.1  LeakyReLU(0.2)
    then n_layers - 1 times: conv stride 2 (channels x2, at most 8*ndf), instance norm, LeakyReLU(0.2)
    then: conv stride 1 (channels x2, at most 8*ndf), instance norm, LeakyReLU(0.2)
    last: conv stride 1 -> 1 channel (a map of real/fake scores, no sigmoid: LSGAN takes raw scores)

Instance norms are PaddleGAN's (frozen scale/bias, shared with the generator), so the state-dict keys
match PaddleGAN's `netD_A`/`netD_B`.
"""

from __future__ import annotations

import random

import paddle
from paddle import nn

from stylequeue.models.generator import instance_norm


class NLayerDiscriminator(nn.Layer):
    """PatchGAN discriminator.

    Args:
        input_nc: input channels (3 for RGB).
        ndf: filters in the first conv layer.
        n_layers: stride-2 conv layers; 3 gives the 70x70 receptive field.
    Input is float32 NCHW in [-1, 1]; output is N x 1 x h x w raw scores.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        kernel, pad = 4, 1
        layers: list[nn.Layer] = [
            nn.Conv2D(input_nc, ndf, kernel_size=kernel, stride=2, padding=pad),
            nn.LeakyReLU(0.2),
        ]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2D(ndf * prev, ndf * mult, kernel_size=kernel, stride=2, padding=pad, bias_attr=True),
                instance_norm(ndf * mult),
                nn.LeakyReLU(0.2),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2D(ndf * prev, ndf * mult, kernel_size=kernel, stride=1, padding=pad, bias_attr=True),
            instance_norm(ndf * mult),
            nn.LeakyReLU(0.2),
            nn.Conv2D(ndf * mult, 1, kernel_size=kernel, stride=1, padding=pad),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.model(x)


class ImagePool:
    """A history of generated images (Shrivastava et al. 2017), as CycleGAN feeds its discriminators.

    Until `size` fakes are stored every new one is stored and passed on; afterwards, each new fake is
    passed on half the time, and the other half it replaces a random stored one, which is passed on
    instead, so a discriminator also judges older generator outputs. `size` 0 passes everything on.
    """

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size = size
        self.rng = rng
        self.images: list[paddle.Tensor] = []

    def query(self, images: paddle.Tensor) -> paddle.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.unbind(0):
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image)
                out.append(image)
            elif self.rng.random() < 0.5:
                index = self.rng.randrange(self.size)
                out.append(self.images[index])
                self.images[index] = image
            else:
                out.append(image)
        return paddle.concat(out, axis=0)
