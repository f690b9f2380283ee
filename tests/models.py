"""Small models used across the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)  # residual add


class ResNet(nn.Module):
    """A residual CNN with BatchNorm, functional calls and flatten."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(ResBlock(8), ResBlock(8))
        self.head = nn.Linear(8 * 4 * 4, 24)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer1(x)
        x = F.adaptive_avg_pool2d(x, 4)
        x = torch.flatten(x, 1)
        return self.fc(self.drop(F.relu(self.head(x))))


RESNET_TARGETS = [
    "stem",
    "layer1.0.conv1",
    "layer1.0.conv2",
    "layer1.1.conv1",
    "layer1.1.conv2",
    "head",
    "fc",
]


def images(n: int = 64, seed: int = 1) -> torch.Tensor:
    """Seeded random 8x8 RGB images."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g)


def token_batches(vocab: int, count: int = 4, batch: int = 4, length: int = 24) -> list[dict]:
    """Tokenizer-style dict batches; the first sequence of each is half right padding."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, length // 2 :] = 0  # right padding, as a tokenizer pads
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def decoder_config(**overrides) -> dict:
    """Keyword arguments of a tiny random decoder-only transformers config (Llama, Qwen2)."""
    kwargs = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return {**kwargs, **overrides}


def warmed_resnet(seed: int = 0) -> ResNet:
    """A ResNet whose BatchNorm running statistics are not the defaults."""
    torch.manual_seed(seed)
    net = ResNet()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 3, 8, 8))
    return net.eval()


class SharedLinear(nn.Module):
    """One Linear called twice (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 6)
        self.shared = nn.Linear(6, 6)

    def forward(self, x):
        return self.shared(torch.tanh(self.shared(self.inp(x))))


class Tokens(nn.Module):
    """A Linear on (batch, tokens, features)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 7)
        self.out = nn.Linear(7, 3)

    def forward(self, x):
        return self.out(F.gelu(self.proj(x))).mean(1)


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > -1e9:  # always true on test data
            h = torch.relu(h)
        return self.b(h)


class Straight(Branchy):
    """Branchy with its branch taken unconditionally (traceable, same function)."""

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class KeywordModel(nn.Module):
    """Takes keyword arguments, as a dict batch provides them."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 6)

    def forward(self, features, scale):
        return self.enc(features) * scale


class MLP(nn.Module):
    def __init__(self, d_in=12, hidden=32, classes=4, rank=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, classes)
        with torch.no_grad():  # fc2's outputs live in a rank-`rank` subspace
            u = torch.randn(hidden, rank)
            self.fc2.weight.copy_(u @ torch.randn(rank, hidden) / hidden)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class GroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


class TwoBranches(nn.Module):
    """Branch `keep` needs all its width; branch `cut` only feeds 2 high-variance channels onward."""

    def __init__(self):
        super().__init__()
        self.keep = nn.Linear(16, 16)
        self.cut = nn.Linear(16, 16)
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(16, 16))
            self.keep.weight.copy_(q)
            self.cut.weight.copy_(torch.diag(torch.tensor([10.0, 10.0] + [1.0] * 14)))
            self.keep.bias.zero_()
            self.cut.bias.zero_()

    def forward(self, x):
        return torch.cat([self.keep(x), self.cut(x)[:, :2]], dim=1)


class Attention(nn.Module):
    """nn.MultiheadAttention uses out_proj's weight without calling it."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.att = nn.MultiheadAttention(16, 2, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.att(h, h, h)
        return self.out(a).mean(1)


class Conv1D(nn.Module):
    """transformers' Conv1D, as GPT-2 uses it: a Linear whose weight is stored (in, out)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.nf,))


class GPT2Block(nn.Module):
    """A GPT-2-style block: Conv1D attention and MLP projections."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.c_attn = Conv1D(3 * width, width)
        self.c_proj = Conv1D(width, width)
        self.c_fc = Conv1D(4 * width, width)
        self.mlp_proj = Conv1D(width, 4 * width)

    def forward(self, x):
        q, k, v = self.c_attn(self.ln(x)).split(x.shape[-1], dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
        x = x + self.c_proj(att)
        return x + self.mlp_proj(torch.nn.functional.gelu(self.c_fc(x)))


def reference(module: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(module(x))`` computed in float64 from the layer's basis and centre."""
    w, b = module.weight.double(), module.bias.double()
    if isinstance(module, nn.Conv2d):
        y = F.conv2d(x.double(), w, b, module.stride, module.padding).movedim(1, -1)
    elif isinstance(module, nn.Linear):
        y = x.double() @ w.T + b
    else:  # Conv1D: y = x W + b
        y = x.double() @ w + b
    v, c = layer.basis.double(), layer.center().double()
    out = (y - c) @ v @ v.T + c if layer.keepdim else (y - c) @ v
    return out.movedim(-1, 1) if isinstance(module, nn.Conv2d) else out
