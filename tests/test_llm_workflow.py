"""The whole workflow on a tiny Llama-style decoder (random weights, no download).

RMSNorm, grouped-query attention with q/k/v/o projections, a SwiGLU MLP, a
causal mask plus the tokenizer's padding mask, and an output layer tied to the
token embedding: wrap the blocks, calibrate on padded tokenizer batches, plan a
budget, compress and export.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pcasurgery as ps


class RMSNorm(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Block(nn.Module):
    def __init__(self, width: int = 32, heads: int = 4, kv_heads: int = 2, hidden: int = 64):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, width // heads
        self.attn_norm, self.mlp_norm = RMSNorm(width), RMSNorm(width)
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(width, width, bias=False)
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x, mask):
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask
        att = torch.softmax(scores, -1) @ v
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, t, -1))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyLlama(nn.Module):
    def __init__(self, vocab: int = 64, width: int = 32, depth: int = 2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.norm = RMSNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied, as in SmolLM2

    def forward(self, input_ids, attention_mask):
        t = input_ids.shape[1]
        causal = torch.full((t, t), float("-inf")).triu(1)
        padding = (1.0 - attention_mask[:, None, None, :].float()) * -1e9
        mask = causal + padding
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return self.lm_head(self.norm(x))


def token_batches(n: int = 6, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(1, 64, (4, 40), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 30:] = 0  # a shorter, right-padded sequence
        ids[0, 30:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def test_wrap_calibrate_budget_compress_a_llama_style_decoder(tmp_path):
    torch.manual_seed(0)
    model = TinyLlama().eval()
    wrapped = ps.pca_wrap(model, include="layers.*")
    names = list(ps.pca_layers_of(wrapped))
    assert len(names) == 14 and names[0] == "layers.0.q_proj"
    data = token_batches()
    ps.calibrate(wrapped, data, progress=False)
    real_tokens = sum(int(b["attention_mask"].sum()) for b in data)
    assert {int(layer.sample_count) for layer in ps.pca_layers_of(wrapped).values()} == {
        real_tokens
    }
    plan = ps.budget_plan(wrapped, remove=0.2)
    assert plan.attrs["removed"] >= 0.2 and set(plan["layer"]) == set(names)
    ps.apply_plan(wrapped, plan)
    small = ps.compress(wrapped)
    assert small.lm_head.weight is small.embed_tokens.weight  # the tie survives
    blocks = ps.count_params(model.layers)
    assert ps.count_params(small.layers) <= 0.8 * blocks + 1
    batch = data[0]
    with torch.no_grad():
        torch.testing.assert_close(small(**batch), wrapped(**batch), atol=1e-4, rtol=1e-4)
    pytest.importorskip("onnxruntime")
    ps.export_onnx(small, batch, tmp_path / "llama.onnx")  # dynamic batch and sequence
