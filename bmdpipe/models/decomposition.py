"""Decomposition GAN of seed 004 (BMD-GAN §3.2): radiograph → projection of bone-segmented CT.

* :class:`HRNetEncoder`: timm's HRNet (``features_only``, one input channel,
  no pretrained weights), its four branches upsampled to 1/4 resolution and
  concatenated, as HRNet's segmentation head does.
* :class:`Pix2PixHDDecoder`: the upsampling path of pix2pixHD's global
  generator (transposed convolutions, then a 7×7 output convolution).
* :class:`ResnetGenerator`: pix2pixHD's global generator, the baseline of
  seed 004 Table 3.
* :class:`MultiscaleDiscriminator`: three PatchGAN discriminators on the image
  at 1, 1/2 and 1/4 resolution, returning intermediate features for the
  feature-matching loss.

All normalisation is GroupNorm (seed 004 §4.2.7: batch statistics of small
batches hurt); :func:`batchnorm_to_groupnorm` converts timm's encoder.
Shapes: images ``(B, 1, H, W)`` with H and W multiples of 32.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def group_norm(channels: int, max_groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with the most groups (≤ ``max_groups``) that divide ``channels``."""
    groups = max(g for g in range(1, max_groups + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def batchnorm_to_groupnorm(module: nn.Module, max_groups: int = 8) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` (in place) by :func:`group_norm` of the same width."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, group_norm(child.num_features, max_groups))
        else:
            batchnorm_to_groupnorm(child, max_groups)
    return module


class HRNetEncoder(nn.Module):
    """HRNet features at 1/4 resolution.

    Args:
        name: timm model name (``hrnet_w18_small_v2`` for the demo, ``hrnet_w48`` at paper size).

    Shapes:
        ``(B, 1, H, W)`` → ``(B, out_channels, H/4, W/4)``.
    """

    def __init__(self, name: str = "hrnet_w18_small_v2") -> None:
        super().__init__()
        import timm

        self.body = batchnorm_to_groupnorm(
            timm.create_model(name, features_only=True, pretrained=False, in_chans=1, feature_location="")
        )
        info = self.body.feature_info
        self.branches = [i for i, r in enumerate(info.reduction()) if r >= 4]
        self.out_channels = sum(info.channels()[i] for i in self.branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.body(x)
        size = feats[self.branches[0]].shape[-2:]
        return torch.cat(
            [feats[i] if feats[i].shape[-2:] == size else F.interpolate(feats[i], size=size, mode="bilinear",
                                                                       align_corners=False)
             for i in self.branches],
            dim=1,
        )


class Pix2PixHDDecoder(nn.Module):
    """pix2pixHD's upsampling path from 1/4 resolution to full resolution.

    Shapes:
        ``(B, in_channels, H/4, W/4)`` → ``(B, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int = 1, ngf: int = 32) -> None:
        super().__init__()
        self.in_channels = in_channels
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ngf * 4, 3, padding=1), group_norm(ngf * 4), nn.ReLU(True)]
        ch = ngf * 4
        for _ in range(2):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 3, stride=2, padding=1, output_padding=1), group_norm(ch // 2),
                       nn.ReLU(True)]
            ch //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ch, out_channels, 7)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Generator(nn.Module):
    """Encoder + decoder; ``features`` gives the encoder's 1/4-resolution map (for the stage-3 head).

    Shapes:
        ``(B, 1, H, W)`` → ``(B, 1, H, W)``.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    @classmethod
    def hrnet(cls, name: str = "hrnet_w18_small_v2", ngf: int = 32, out_channels: int = 1) -> "Generator":
        enc = HRNetEncoder(name)
        return cls(enc, Pix2PixHDDecoder(enc.out_channels, out_channels, ngf))

    @property
    def feature_channels(self) -> int:
        """Channels of the encoder's 1/4-resolution features (what the stage-3 head takes)."""
        return self.decoder.in_channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class _ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), group_norm(ch), nn.ReLU(True),
                                   nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), group_norm(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResnetGenerator(Generator):
    """pix2pixHD's global generator (c7s1-ngf, two stride-2 downsamplings, residual blocks, decoder)."""

    def __init__(self, ngf: int = 32, n_blocks: int = 9, out_channels: int = 1) -> None:
        encoder = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(1, ngf, 7), group_norm(ngf), nn.ReLU(True),
            nn.Conv2d(ngf, ngf * 2, 3, stride=2, padding=1), group_norm(ngf * 2), nn.ReLU(True),
            nn.Conv2d(ngf * 2, ngf * 4, 3, stride=2, padding=1), group_norm(ngf * 4), nn.ReLU(True),
            *[_ResBlock(ngf * 4) for _ in range(n_blocks)],
        )
        super().__init__(encoder, Pix2PixHDDecoder(ngf * 4, out_channels, ngf))


def build_generator(arch: dict) -> Generator:
    """A generator from its description ``{"kind": "hrnet"|"resnet", "encoder", "ngf", "n_blocks", "out_channels"}``."""
    if arch["kind"] == "hrnet":
        return Generator.hrnet(arch["encoder"], arch["ngf"], arch["out_channels"])
    if arch["kind"] == "resnet":
        return ResnetGenerator(arch["ngf"], arch.get("n_blocks", 9), arch["out_channels"])
    raise ValueError(f"unknown generator kind {arch['kind']!r}: hrnet or resnet")


def widen_output(generator: Generator, state: dict[str, torch.Tensor], out_channels: int) -> dict[str, torch.Tensor]:
    """A stage-1 state dict (one output channel) for a generator with ``out_channels`` outputs.

    The last convolution's single filter is copied to every channel, so stage 2
    starts from stage 1's bone image in each site channel (hierarchical learning).
    """
    own = generator.state_dict()
    out = {}
    for k, v in state.items():
        if k in own and own[k].shape != v.shape and v.shape[0] == 1 and own[k].shape[0] == out_channels:
            v = v.expand(out_channels, *v.shape[1:]).clone()
        out[k] = v
    return out


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pixHD's NLayerDiscriminator) returning every layer's output.

    Shapes:
        ``(B, C, H, W)`` → list of ``n_layers + 2`` maps, the last ``(B, 1, h, w)`` patch scores.
    """

    def __init__(self, in_channels: int = 2, ndf: int = 32, n_layers: int = 3) -> None:
        super().__init__()
        seq: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, ndf, 4, 2, 2), nn.LeakyReLU(0.2, True))]
        ch = ndf
        for n in range(1, n_layers + 1):
            nxt = min(ch * 2, 512)
            stride = 2 if n < n_layers else 1
            seq.append(nn.Sequential(nn.Conv2d(ch, nxt, 4, stride, 2), group_norm(nxt), nn.LeakyReLU(0.2, True)))
            ch = nxt
        seq.append(nn.Sequential(nn.Conv2d(ch, 1, 4, 1, 2)))
        self.layers = nn.ModuleList(seq)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out


class MultiscaleDiscriminator(nn.Module):
    """``num_d`` PatchGANs on the (radiograph, DRR) pair at successively halved resolution."""

    def __init__(self, in_channels: int = 2, ndf: int = 32, n_layers: int = 3, num_d: int = 3) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList(PatchDiscriminator(in_channels, ndf, n_layers) for _ in range(num_d))

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        out = []
        for i, d in enumerate(self.discriminators):
            if i:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            out.append(d(x))
        return out
