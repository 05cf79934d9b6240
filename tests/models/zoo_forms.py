"""Faithful copies of the module forms third-party model zoos use (timm, torchvision), written
here so the tests need no zoo: layers that are not nn.Conv2d/nn.Linear/nn.BatchNorm2d by class,
yet compute exactly what those do."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's form: a BatchNorm2d subclass that applies its activation inside forward."""

    def __init__(self, channels: int, act: type[nn.Module] = nn.SiLU):
        super().__init__(channels)
        self.act = act()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(x)


class Conv2dSame(nn.Conv2d):
    """TensorFlow "same" padding: pad computed from the input size, then a conv without padding."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ReLU()
        self.conv_expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.conv_expand(self.act(self.conv_reduce(s))))


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channels-first LayerNorm: permute, normalize over channels, permute back."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class FunctionalConv(nn.Module):
    """A layer that holds its weight as a bare Parameter and calls F.conv2d itself."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 1, 1) / math.sqrt(cin))
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias)


class FunctionalLinear(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / math.sqrt(cin))
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class ZooForms(nn.Module):
    """Every form above in one small image classifier (16x16 input, 10 classes)."""

    WEIGHT_LAYERS = 12  # Conv/Linear computations in the graph, each must be int8

    def __init__(self):
        super().__init__()
        self.stem = Conv2dSame(3, 16, 3, stride=2, bias=False)
        self.bn1 = BatchNormAct2d(16, nn.Hardswish)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)  # depthwise
        self.bn2 = BatchNormAct2d(16, nn.ReLU6)
        self.se = SqueezeExcite(16, 8)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.norm = LayerNorm2d(32)
        self.pw = FunctionalConv(32, 32)
        self.act = nn.GELU()
        self.patch = nn.Conv2d(32, 32, 2, stride=2)  # patch embedding: 8x8 -> 4x4 tokens
        self.attn = Attention(32, 4)
        self.layer_scale = nn.Parameter(torch.full((32,), 0.5))
        self.mlp = FunctionalLinear(32, 64)
        self.mlp_out = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.bn1(self.stem(x))
        x = self.bn2(self.dw(x))
        x = self.se(x)
        x = self.act(self.pw(self.norm(self.grouped(x))))
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = t + self.layer_scale * self.attn(t)
        t = t + self.mlp_out(F.silu(self.mlp(t)))
        return self.head(t.mean(1))


def build() -> nn.Module:
    """Seeded weights and BatchNorm statistics that are not the identity."""
    torch.manual_seed(0)
    model = ZooForms()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return model.eval()
