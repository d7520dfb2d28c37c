"""The zoo's CNNs, written by hand in torch (torchvision does not run with the pinned torch), exported with the
TorchScript exporter: BatchNormalization kept (the plain name) and folded by the exporter (``-folded``).

Each follows its paper's block structure; widths and input resolutions are reduced where noted so that the
whole family builds in a few minutes on two cores. Weights are seeded (``torch.manual_seed``); BatchNorm
statistics come from train-mode passes over 128 real photo crops (common.settle_batchnorm); the classifier
head is centered on those crops (common.center_head) -- except as below.

Trained-like weights (why: seeded random CNNs are chaotic). Measured in a torch fake-quant simulation (E4M3
on one layer's input only): noise injected at MobileNetV2's stem reached the logits 30 dB amplified (ResNet-18:
15 dB), ~1-1.7 dB per BN-ReLU layer -- the mean-field figure for random BN-ReLU nets (pi/(pi-1) per layer:
the ReLU output's mean, which the next BN removes, carries ~1/3 of the signal power while white noise passes
whole), plus 4-5.5 dB at a random classifier head. So whole-model SQNRs read ~0 dB (MobileNetV2, ShuffleNetV2,
RegNetY, ResNet-50) although every layer's own SQNR is ~31 dB. Trained filters are not white: they concentrate
on the directions their input patches vary in (low spatial frequencies, correlated channels), so they pass
signal more than white quantization noise. ``align_to_inputs`` gives every Conv/ConvTranspose/Linear weight
that property (Z C^(alpha/2), alpha 0.5, C its input-patch covariance on 64 settling crops, one train-mode
pass before the BN statistics are settled); Linear classifier heads are fitted to the features' top principal
directions as in the transformer family (``fit_head``). Still seeded and built in code, nothing downloaded.
E4M3 output SQNR, bench_coverage 32 calib / 32 val, before -> after (2026-12-03): resnet18 8.7 -> 29.2,
resnet50 0.8 -> 25.6, mobilenetv2 -0.8 -> 18.9, shufflenetv2 -1.3 -> 20.9, convnext-femto 23.6 -> 43.9,
unet 14.0 -> 27.7, yolov8n-style 35.7 -> 35.7 dB (other models and formats not measured after). Build time
rose from 1-4 s to 15-80 s per model measured at load average 14 on 2 cores (idle not measured). Calibration: 64 other crops of the same training
photographs; validation: 64 crops of different photographs (common.VAL_PHOTOS). Batches of 16.

Classifiers output ``logits`` [batch, 100]; the UNet ``mask`` [batch, 8, 64, 64]; the YOLO-style detector
``output0`` [batch, 4 + 20, 336] (decoded boxes in pixels + class probabilities, as YOLOv8's export).
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from . import ZooModel
from .common import (batched, center_head, crops, export, fitted_head, settle_batchnorm, spread_bn_affine,
                     to_fp16, threaded_build, write_batches)

try:  # the family needs torch (the ``zoo`` extra); without it the module has no models
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:  # pragma: no cover
    raise

NUM_CLASSES = 100
N_SETTLE, N_CALIB, N_VAL, BATCH = 128, 64, 64, 16
ALIGN_SAMPLES = 64  # settling crops the weight alignment and the head fit read


def _div(v: float, d: int = 8, min_value: Optional[int] = None) -> int:
    """MobileNet's make_divisible."""
    min_value = min_value or d
    n = max(min_value, int(v + d / 2) // d * d)
    return n + d if n < 0.9 * v else n


def conv_bn(cin, cout, k=3, s=1, groups=1, act: Optional[Callable] = nn.ReLU, eps=1e-5, pad=None):
    layers: List[nn.Module] = [nn.Conv2d(cin, cout, k, s, (k - 1) // 2 if pad is None else pad, groups=groups,
                                         bias=False), nn.BatchNorm2d(cout, eps=eps)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# -- ResNet (He et al. 2015) -------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, c, s):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, c, 3, s, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.down = None if s == 1 and cin == c else conv_bn(cin, c, 1, s, act=None)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, c, s):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, s, 1, bias=False), nn.BatchNorm2d(c)  # stride on 3x3 (v1.5)
        self.conv3, self.bn3 = nn.Conv2d(c, 4 * c, 1, bias=False), nn.BatchNorm2d(4 * c)
        self.down = None if s == 1 and cin == 4 * c else conv_bn(cin, 4 * c, 1, s, act=None)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self, block, layers, width=64, num_classes=NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        stages, cin = [], width
        for i, n in enumerate(layers):
            c = width * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, c, 2 if (j == 0 and i > 0) else 1))
                cin = c * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# -- MobileNetV2 (Sandler et al. 2018) ---------------------------------------------------------------
class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, s, t):
        super().__init__()
        hid = cin * t
        layers = [] if t == 1 else [conv_bn(cin, hid, 1, act=nn.ReLU6)]
        layers += [conv_bn(hid, hid, 3, s, groups=hid, act=nn.ReLU6), conv_bn(hid, cout, 1, act=None)]
        self.conv = nn.Sequential(*layers)
        self.res = s == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.res else self.conv(x)


class MobileNetV2(nn.Module):
    CFG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
           (6, 320, 1, 1)]

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        layers, cin = [conv_bn(3, 32, 3, 2, act=nn.ReLU6)], 32
        for t, c, n, s in self.CFG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(conv_bn(cin, 1280, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# -- MobileNetV3-small (Howard et al. 2019) ----------------------------------------------------------
class SqueezeExcite(nn.Module):
    def __init__(self, c, squeeze, act=nn.ReLU, gate=nn.Hardsigmoid):
        super().__init__()
        self.fc1, self.act, self.fc2, self.gate = nn.Conv2d(c, squeeze, 1), act(), nn.Conv2d(squeeze, c, 1), gate()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class MBv3Block(nn.Module):
    def __init__(self, cin, k, exp, cout, se, act, s):
        super().__init__()
        layers: List[nn.Module] = [] if exp == cin else [conv_bn(cin, exp, 1, act=act)]
        layers.append(conv_bn(exp, exp, k, s, groups=exp, act=act))
        if se:
            layers.append(SqueezeExcite(exp, _div(exp // 4)))
        layers.append(conv_bn(exp, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.res = s == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.res else self.block(x)


class MobileNetV3Small(nn.Module):
    RE, HS = nn.ReLU, nn.Hardswish
    CFG = [(3, 16, 16, True, RE, 2), (3, 72, 24, False, RE, 2), (3, 88, 24, False, RE, 1),
           (5, 96, 40, True, HS, 2), (5, 240, 40, True, HS, 1), (5, 240, 40, True, HS, 1),
           (5, 120, 48, True, HS, 1), (5, 144, 48, True, HS, 1), (5, 288, 96, True, HS, 2),
           (5, 576, 96, True, HS, 1), (5, 576, 96, True, HS, 1)]

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        bn = partial(conv_bn, eps=1e-3)
        layers, cin = [bn(3, 16, 3, 2, act=nn.Hardswish)], 16
        for k, exp, c, se, act, s in self.CFG:
            layers.append(MBv3Block(cin, k, exp, c, se, act, s))
            cin = c
        layers.append(bn(cin, 576, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        for m in self.features.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = 1e-3
        self.classifier = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(1024, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# -- EfficientNet-B0 (Tan & Le 2019) -----------------------------------------------------------------
class MBConv(nn.Module):
    def __init__(self, cin, cout, k, s, expand):
        super().__init__()
        hid = cin * expand
        cb = partial(conv_bn, act=nn.SiLU, eps=1e-3)
        layers: List[nn.Module] = [] if expand == 1 else [cb(cin, hid, 1)]
        layers += [cb(hid, hid, k, s, groups=hid), SqueezeExcite(hid, max(1, cin // 4), nn.SiLU, nn.Sigmoid),
                   conv_bn(hid, cout, 1, act=None, eps=1e-3)]
        self.block = nn.Sequential(*layers)
        self.res = s == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.res else self.block(x)


class EfficientNetB0(nn.Module):
    CFG = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
           (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        layers, cin = [conv_bn(3, 32, 3, 2, act=nn.SiLU, eps=1e-3)], 32
        for e, k, s, c, n in self.CFG:
            for i in range(n):
                layers.append(MBConv(cin, c, k, s if i == 0 else 1, e))
                cin = c
        layers.append(conv_bn(cin, 1280, 1, act=nn.SiLU, eps=1e-3))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# -- ShuffleNetV2 1.0x (Ma et al. 2018) --------------------------------------------------------------
def channel_shuffle(x, groups: int = 2):
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin, cout, s):
        super().__init__()
        self.s = s
        bf = cout // 2
        if s > 1:
            self.branch1 = nn.Sequential(conv_bn(cin, cin, 3, s, groups=cin, act=None), conv_bn(cin, bf, 1))
        self.branch2 = nn.Sequential(conv_bn(cin if s > 1 else bf, bf, 1), conv_bn(bf, bf, 3, s, groups=bf, act=None),
                                     conv_bn(bf, bf, 1))

    def forward(self, x):
        if self.s == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat((a, self.branch2(b)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, repeats=(4, 8, 4), channels=(24, 116, 232, 464, 1024), num_classes=NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, channels[0], 3, 2), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], channels[0]
        for n, c in zip(repeats, channels[1:-1]):
            stages += [ShuffleUnit(cin, c, 2)] + [ShuffleUnit(c, c, 1) for _ in range(n - 1)]
            cin = c
        self.stages = nn.Sequential(*stages)
        self.conv5 = conv_bn(cin, channels[-1], 1)
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x):
        x = self.conv5(self.stages(self.stem(x)))
        return self.fc(x.mean([2, 3]))


# -- RegNetY-400MF (Radosavovic et al. 2020) ---------------------------------------------------------
class RegNetYBlock(nn.Module):
    def __init__(self, cin, cout, s, group_width=8, se_ratio=0.25):
        super().__init__()
        self.a = conv_bn(cin, cout, 1)
        self.b = conv_bn(cout, cout, 3, s, groups=cout // group_width)
        self.se = SqueezeExcite(cout, max(1, int(round(cin * se_ratio))), nn.ReLU, nn.Sigmoid)
        self.c = conv_bn(cout, cout, 1, act=None)
        self.proj = None if s == 1 and cin == cout else conv_bn(cin, cout, 1, s, act=None)

    def forward(self, x):
        y = self.c(self.se(self.b(self.a(x))))
        return F.relu(y + (x if self.proj is None else self.proj(x)))


class RegNetY(nn.Module):
    def __init__(self, depths=(1, 3, 6, 6), widths=(48, 104, 208, 440), num_classes=NUM_CLASSES):
        super().__init__()
        self.stem = conv_bn(3, 32, 3, 2)
        blocks, cin = [], 32
        for d, w in zip(depths, widths):
            for i in range(d):
                blocks.append(RegNetYBlock(cin, w, 2 if i == 0 else 1))
                cin = w
        self.trunk = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.trunk(self.stem(x)), 1), 1))


# -- DenseNet-BC (Huang et al. 2017), growth 12 ------------------------------------------------------
class DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size=4):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(bn_size * growth), nn.Conv2d(bn_size * growth, growth, 3, 1, 1,
                                                                             bias=False)

    def forward(self, x):
        return self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class DenseNet(nn.Module):
    def __init__(self, growth=12, blocks=(6, 12, 24, 16), num_classes=NUM_CLASSES):
        super().__init__()
        c = 2 * growth
        self.stem = nn.Sequential(nn.Conv2d(3, c, 7, 2, 3, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.blocks, self.trans = nn.ModuleList(), nn.ModuleList()
        for i, n in enumerate(blocks):
            layers = nn.ModuleList()
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            self.blocks.append(layers)
            if i < len(blocks) - 1:
                self.trans.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False),
                                                nn.AvgPool2d(2, 2)))
                c //= 2
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for i, layers in enumerate(self.blocks):
            feats = [x]
            for layer in layers:
                feats.append(layer(torch.cat(feats, 1)))
            x = torch.cat(feats, 1)
            if i < len(self.trans):
                x = self.trans[i](x)
        x = F.relu(self.norm(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# -- ConvNeXt (Liu et al. 2022), "femto" widths ------------------------------------------------------
class LayerNorm2d(nn.Module):
    """ConvNeXt's channels-first LayerNorm (mean/var over C), written out as the reference code does."""

    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pwconv1, self.pwconv2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        # layer scale: the paper initializes it at 1e-6 and training grows it; a seeded untrained model keeps
        # the blocks from being identities with a spread of trained-like magnitudes instead
        self.gamma = nn.Parameter(torch.empty(c).uniform_(0.05, 0.5))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, depths=(2, 2, 6, 2), dims=(48, 96, 192, 384), num_classes=NUM_CLASSES):
        super().__init__()
        self.downsample = nn.ModuleList([nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0]))])
        for i in range(3):
            self.downsample.append(nn.Sequential(LayerNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, 2)))
        self.stages = nn.ModuleList([nn.Sequential(*[ConvNeXtBlock(d) for _ in range(n)])
                                     for n, d in zip(depths, dims)])
        self.norm, self.head = nn.LayerNorm(dims[-1], eps=1e-6), nn.Linear(dims[-1], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        for down, stage in zip(self.downsample, self.stages):
            x = stage(down(x))
        return self.head(self.norm(x.mean([-2, -1])))


# -- UNet (Ronneberger et al. 2015), 4 levels, widths 16..256 ----------------------------------------
def double_conv(cin, cout):
    return nn.Sequential(conv_bn(cin, cout, 3), conv_bn(cout, cout, 3))


class UNet(nn.Module):
    def __init__(self, widths=(16, 32, 64, 128, 256), n_classes=8):
        super().__init__()
        self.downs = nn.ModuleList()
        cin = 3
        for w in widths:
            self.downs.append(double_conv(cin, w))
            cin = w
        self.ups, self.dec = nn.ModuleList(), nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.ups.append(nn.ConvTranspose2d(cin, w, 2, 2))  # the paper's 2x2 up-convolution
            self.dec.append(double_conv(2 * w, w))
            cin = w
        self.head = nn.Conv2d(cin, n_classes, 1)

    def forward(self, x):
        skips = []
        for i, d in enumerate(self.downs):
            x = d(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, dec, skip in zip(self.ups, self.dec, reversed(skips[:-1])):
            x = dec(torch.cat([skip, up(x)], 1))
        return self.head(x)


# -- YOLO-style detector (YOLOv8n layout: C2f/SPPF backbone, PAN neck, decoupled DFL head) -----------
def yconv(cin, cout, k=1, s=1):
    return conv_bn(cin, cout, k, s, act=nn.SiLU, eps=1e-3)


class YBottleneck(nn.Module):
    def __init__(self, c, shortcut=True):
        super().__init__()
        self.cv1, self.cv2, self.add = yconv(c, c, 3), yconv(c, c, 3), shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    def __init__(self, cin, cout, n=1, shortcut=False):
        super().__init__()
        self.c = cout // 2
        self.cv1 = yconv(cin, 2 * self.c, 1)
        self.cv2 = yconv((2 + n) * self.c, cout, 1)
        self.m = nn.ModuleList(YBottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, cin, cout, k=5):
        super().__init__()
        self.cv1, self.cv2 = yconv(cin, cin // 2, 1), yconv(cin * 2, cout, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class YOLO(nn.Module):
    def __init__(self, nc=20, img=128, w=(16, 32, 64, 128, 256), reg_max=16):
        super().__init__()
        self.nc, self.reg_max = nc, reg_max
        self.b0 = nn.Sequential(yconv(3, w[0], 3, 2), yconv(w[0], w[1], 3, 2), C2f(w[1], w[1], 1, True),
                                yconv(w[1], w[2], 3, 2), C2f(w[2], w[2], 2, True))                 # P3 /8
        self.b1 = nn.Sequential(yconv(w[2], w[3], 3, 2), C2f(w[3], w[3], 2, True))                # P4 /16
        self.b2 = nn.Sequential(yconv(w[3], w[4], 3, 2), C2f(w[4], w[4], 1, True), SPPF(w[4], w[4]))  # P5 /32
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.h1, self.h2 = C2f(w[4] + w[3], w[3]), C2f(w[3] + w[2], w[2])
        self.d1, self.h3 = yconv(w[2], w[2], 3, 2), C2f(w[2] + w[3], w[3])
        self.d2, self.h4 = yconv(w[3], w[3], 3, 2), C2f(w[3] + w[4], w[4])
        chs, self.strides = (w[2], w[3], w[4]), (8, 16, 32)
        c2, c3 = max(16, chs[0] // 4, reg_max * 4), max(chs[0], min(nc, 100))
        self.box = nn.ModuleList(nn.Sequential(yconv(c, c2, 3), yconv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1))
                                 for c in chs)
        self.cls = nn.ModuleList(nn.Sequential(yconv(c, c3, 3), yconv(c3, c3, 3), nn.Conv2d(c3, nc, 1))
                                 for c in chs)
        for b, c, s in zip(self.box, self.cls, self.strides):  # YOLOv8's bias_init
            nn.init.constant_(b[-1].bias, 1.0)
            nn.init.constant_(c[-1].bias, math.log(5 / nc / (640 / s) ** 2))
        self.dfl = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(reg_max, dtype=torch.float).view(1, reg_max, 1, 1)
        anchors, stride_t = [], []
        for s in self.strides:  # anchor points for the export resolution, as YOLOv8 bakes them
            n = img // s
            sy, sx = torch.meshgrid(torch.arange(n) + 0.5, torch.arange(n) + 0.5, indexing="ij")
            anchors.append(torch.stack((sx, sy), -1).view(-1, 2))
            stride_t.append(torch.full((n * n, 1), float(s)))
        self.register_buffer("anchors", torch.cat(anchors).transpose(0, 1).contiguous(), persistent=False)
        self.register_buffer("stride_t", torch.cat(stride_t).transpose(0, 1).contiguous(), persistent=False)

    def forward(self, x):
        p3 = self.b0(x)
        p4 = self.b1(p3)
        p5 = self.b2(p4)
        h4 = self.h1(torch.cat([self.up(p5), p4], 1))
        o3 = self.h2(torch.cat([self.up(h4), p3], 1))
        o4 = self.h3(torch.cat([self.d1(o3), h4], 1))
        o5 = self.h4(torch.cat([self.d2(o4), p5], 1))
        b = x.shape[0]
        y = torch.cat([torch.cat([bx(o), cl(o)], 1).view(b, 4 * self.reg_max + self.nc, -1)
                       for o, bx, cl in zip((o3, o4, o5), self.box, self.cls)], 2)
        box, cls = y.split((4 * self.reg_max, self.nc), 1)
        a = box.shape[-1]
        dist = self.dfl(box.view(b, 4, self.reg_max, a).transpose(2, 1).softmax(1)).view(b, 4, a)
        lt, rb = dist.chunk(2, 1)
        x1y1, x2y2 = self.anchors.unsqueeze(0) - lt, self.anchors.unsqueeze(0) + rb
        dbox = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * self.stride_t
        return torch.cat((dbox, cls.sigmoid()), 1)


# -- trained-like weights ----------------------------------------------------------------------------
ALIGN_ALPHA = 0.5   # weights W = Z C^(alpha/2): see align_to_inputs
MAX_COLS = 8192     # input patches sampled per layer for its covariance


def _input_patches(x: "torch.Tensor", m: nn.Module) -> "torch.Tensor":
    """The vectors layer ``m`` reads from its input ``x``, per group: [groups, D, n]."""
    if isinstance(m, nn.Linear):
        return x.reshape(-1, x.shape[-1]).T[None]
    if isinstance(m, nn.ConvTranspose2d):  # each output pixel reads one input pixel's channels per offset
        return x.permute(1, 0, 2, 3).reshape(1, x.shape[1], -1)
    u = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # [N, cin*k*k, L]
    n, d, l = u.shape
    g = m.groups
    return u.reshape(n, g, d // g, l).permute(1, 2, 0, 3).reshape(g, d // g, n * l)


def align_to_inputs(model: nn.Module, batch: np.ndarray, alpha: float = ALIGN_ALPHA, seed: int = 0,
                    skip: Sequence[nn.Module] = ()) -> int:
    """Turn every Conv / ConvTranspose / Linear weight towards the directions its input varies in, as training
    does: one train-mode pass over ``batch`` (BatchNorm on batch statistics) where a pre-hook on each layer,
    before it runs, replaces its seeded weight Z (per group) by ``Z C^(alpha/2)``, C the covariance of the
    input patches the layer reads on that batch (eigenvalues normalized to mean 1), rescaled to Z's norm;
    downstream layers see the already-aligned upstream outputs. Layers fed fewer than 2 vectors per input
    dimension (squeeze-excite FCs, pooled-feature MLPs: the covariance would be rank-deficient) and
    ``skip`` keep their weights. Returns the number of layers aligned."""
    gen = torch.Generator().manual_seed(seed)
    skipped = set(map(id, skip))
    hooks, done = [], [0]

    def hook(mod, args):
        u = _input_patches(args[0].detach(), mod).double()
        if u.shape[-1] < 2 * u.shape[1]:
            return
        if u.shape[-1] > MAX_COLS:
            u = u[..., torch.randperm(u.shape[-1], generator=gen)[:MAX_COLS]]
        u = u - u.mean(-1, keepdim=True)
        ev, vec = torch.linalg.eigh(u @ u.transpose(1, 2) / u.shape[-1])
        ev = ev.clamp_min(0)
        ev = ev / ev.mean(-1, keepdim=True).clamp_min(1e-30)
        p = vec @ torch.diag_embed(ev ** (alpha / 2)) @ vec.transpose(1, 2)  # [g, D, D], symmetric
        w = mod.weight.detach().double()
        if isinstance(mod, nn.ConvTranspose2d):  # [cin, cout, k, k]: mix along cin
            new = torch.einsum("ij,jokl->iokl", p[0], w)
        elif isinstance(mod, nn.Linear):
            new = w @ p[0]
        else:
            g = mod.groups
            new = (w.reshape(g, w.shape[0] // g, -1) @ p).reshape(w.shape)
        new *= w.norm() / new.norm().clamp_min(1e-30)
        with torch.no_grad():
            mod.weight.copy_(new.to(mod.weight.dtype))
        done[0] += 1

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and m.weight.requires_grad \
                and id(m) not in skipped:
            hooks.append(m.register_forward_pre_hook(hook))
    model.train()
    try:
        with torch.no_grad():
            model(torch.from_numpy(batch))
    finally:
        for h in hooks:
            h.remove()
    model.eval()
    return done[0]


def fit_head(model: nn.Module, head: nn.Linear, batch: np.ndarray, rng: np.random.Generator) -> None:
    """A trained classifier's head (as transformer.settle's): the weight reads the directions in which its
    input features vary across samples (a random mix of their top 8 principal directions on ``batch``, plus
    10 % of the random weight), scaled so the logits vary by ~2 across samples; the bias centres every class
    (+ N(0, 0.1) priors)."""
    feats: List[torch.Tensor] = []
    h = head.register_forward_pre_hook(lambda mod, args: feats.append(args[0].detach()))
    model.eval()
    try:
        with torch.no_grad():
            model(torch.from_numpy(batch))
    finally:
        h.remove()
    x = torch.cat(feats).double().reshape(-1, head.in_features)
    weight, bias = fitted_head(x, head.weight.detach().double(), rng)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)


# -- building ----------------------------------------------------------------------------------------
def _head_of(m: nn.Module) -> Optional[nn.Module]:
    for attr in ("fc", "head"):
        h = getattr(m, attr, None)
        if isinstance(h, (nn.Linear, nn.Conv2d)):
            return h
    cls = getattr(m, "classifier", None)
    if isinstance(cls, nn.Sequential) and isinstance(cls[-1], nn.Linear):
        return cls[-1]
    return None


def image_builder(ctor: Callable[[], nn.Module], res: int, *, keep_bn: bool, fp16: bool = False,
                  output: str = "logits", center: bool = True, align: bool = True) -> Callable[[Path, int], None]:
    def build(folder: Path, seed: int) -> None:
        torch.manual_seed(seed)
        model = ctor()
        spread_bn_affine(model)
        settle_x = crops("train", N_SETTLE, res, seed * 1000 + 1)
        head = _head_of(model)
        linear_head = isinstance(head, nn.Linear) and center
        if align:
            align_to_inputs(model, settle_x[:ALIGN_SAMPLES], seed=seed, skip=[head] if linear_head else [])
        settle = batched(settle_x, 32)
        settle_batchnorm(model, settle)
        if linear_head:
            fit_head(model, head, settle_x[:ALIGN_SAMPLES], np.random.default_rng(seed * 1000 + 4))
        elif center and head is not None:
            center_head(model, head, settle[:2])
        calib = crops("train", N_CALIB, res, seed * 1000 + 2)
        val = crops("val", N_VAL, res, seed * 1000 + 3)
        check = {}
        if fp16:  # checked against the FP32 model: cosine >= 0.999
            with torch.no_grad():
                check = dict(ref_outputs=[model(torch.from_numpy(calib[:BATCH])).numpy()], min_cosine=0.999)
            model = to_fp16(model, fold_bn=not keep_bn)
            calib, val = calib.astype(np.float16), val.astype(np.float16)
        export(model, (torch.from_numpy(calib[:2]),), folder / "model.onnx", ["input"], [output],
               {"input": {0: "batch"}, output: {0: "batch"}}, keep_bn=keep_bn,
               check_feed={"input": calib[:BATCH]}, **check)
        write_batches(folder / "calib", {"input": calib}, BATCH)
        write_batches(folder / "val", {"input": val}, BATCH)

    return threaded_build(build)


def _twins(name: str, ctor, res: int, desc: str, tags: Sequence[str] = (), bn_in_folded: bool = False,
           output: str = "logits") -> List[ZooModel]:
    """The BN-unfolded model and its folded twin."""
    t = frozenset(tags)
    return [ZooModel(name, "cnn", image_builder(ctor, res, keep_bn=True, output=output), t | {"bn"},
                     desc + ", BN kept"),
            ZooModel(name + "-folded", "cnn", image_builder(ctor, res, keep_bn=False, output=output),
                     (t - {"smoke"}) | {"folded"} | ({"bn"} if bn_in_folded else set()),
                     desc + ", BN folded into Conv by the exporter")]


MODELS: List[ZooModel] = [
    *_twins("resnet18", lambda: ResNet(BasicBlock, (2, 2, 2, 2)), 64, "ResNet-18, 64x64 input", ("smoke",)),
    ZooModel("resnet18-fp16", "cnn", image_builder(lambda: ResNet(BasicBlock, (2, 2, 2, 2)), 64, keep_bn=True,
                                                   fp16=True),
             frozenset({"bn", "fp16", "smoke"}), "ResNet-18 converted to float16 (model.half()), BN kept"),
    *_twins("resnet50", lambda: ResNet(Bottleneck, (3, 4, 6, 3), width=32), 64,
            "ResNet-50 (v1.5 bottlenecks) at half width (32..256 mid channels), 64x64 input"),
    *_twins("mobilenetv2", MobileNetV2, 64, "MobileNetV2 1.0x, 64x64 input", ("depthwise", "smoke")),
    ZooModel("mobilenetv2-fp16-folded", "cnn", image_builder(MobileNetV2, 64, keep_bn=False, fp16=True),
             frozenset({"fp16", "folded", "depthwise"}), "MobileNetV2 in float16, BN folded"),
    *_twins("mobilenetv3-small", MobileNetV3Small, 64, "MobileNetV3-small (hardswish, SE), 64x64 input",
            ("depthwise",)),
    *_twins("efficientnet-b0", EfficientNetB0, 64, "EfficientNet-B0 (MBConv, SiLU, SE), 64x64 input",
            ("depthwise",)),
    *_twins("shufflenetv2", ShuffleNetV2, 64, "ShuffleNetV2 1.0x (channel split/shuffle), 64x64 input",
            ("depthwise",)),
    *_twins("regnety-400mf", RegNetY, 64, "RegNetY-400MF (group conv, SE), 64x64 input"),
    *_twins("densenet-bc", DenseNet, 64, "DenseNet-BC-121 layout at growth 12, 64x64 input",
            bn_in_folded=True),
    ZooModel("convnext-femto", "cnn", image_builder(ConvNeXt, 64, keep_bn=False), frozenset({"depthwise"}),
             "ConvNeXt (femto widths 48..384, depths 2-2-6-2; LayerNorm, GELU, 7x7 depthwise), 64x64 input"),
    *_twins("unet", UNet, 64, "UNet, 4 levels, widths 16..256, ConvTranspose up-sampling, 8-class mask "
            "output, 64x64 input", output="mask"),
    *_twins("yolov8n-style", YOLO, 128, "YOLOv8n-style detector (C2f, SPPF, PAN neck with Resize/Concat, DFL "
            "head decoding boxes), 128x128 input", output="output0"),
]
