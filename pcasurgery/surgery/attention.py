"""``nn.MultiheadAttention`` with its projections as Linear modules, so PCA layers can follow them.

``nn.MultiheadAttention`` keeps its query/key/value projections as one packed
parameter and uses ``out_proj``'s weight without calling the module, so none
of its four projections is ever called as a module. :class:`SplitAttention`
computes the same function (outputs equal to float rounding) with
``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` as ``nn.Linear`` modules
that are called; ``pca_wrap`` puts it in place of every ``nn.MultiheadAttention``
whose projections it is asked to follow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.sites import replace_module
from ..modeling_pcasurgery import mark_replaced, register

__all__ = ["SplitAttention", "split_attention"]


class SplitAttention(nn.Module):
    """``nn.MultiheadAttention``'s forward, with ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` as modules.

    Same signature and results as the module it replaces (``batch_first``,
    ``key_padding_mask``, ``attn_mask``, ``need_weights``,
    ``average_attn_weights``, ``is_causal``, unbatched inputs, dropout of the
    attention weights in training). PyTorch's fused attention paths do not
    apply to it (it has no packed ``in_proj_weight``); it runs the explicit
    computation.
    """

    # read by nn.TransformerEncoderLayer's fast-path checks: no packed projection here
    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        if not supported(attention):
            raise ValueError("add_bias_kv and add_zero_attn attention cannot be split")
        e = attention.embed_dim
        self.embed_dim, self.num_heads = e, attention.num_heads
        self.kdim, self.vdim = attention.kdim, attention.vdim
        self.dropout, self.batch_first = attention.dropout, attention.batch_first
        self.head_dim = attention.head_dim
        weights = (
            attention.in_proj_weight.chunk(3)
            if attention._qkv_same_embed_dim
            else (attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight)
        )
        biases = (None,) * 3 if attention.in_proj_bias is None else attention.in_proj_bias.chunk(3)
        projections = []
        for weight, bias in zip(weights, biases, strict=True):
            linear = nn.Linear(
                weight.shape[1], e, bias=bias is not None, device=weight.device, dtype=weight.dtype
            )
            with torch.no_grad():
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
            linear.weight.requires_grad_(weight.requires_grad)
            projections.append(linear)
        self.q_proj, self.k_proj, self.v_proj = projections
        self.out_proj = attention.out_proj
        self.train(attention.training)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        length, batch, _ = query.shape
        source = key.shape[0]
        heads, dim = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(length, batch * heads, dim).transpose(0, 1)
        k = self.k_proj(key).reshape(source, batch * heads, dim).transpose(0, 1)
        v = self.v_proj(value).reshape(source, batch * heads, dim).transpose(0, 1)
        mask = _additive_mask(
            attn_mask, key_padding_mask, is_causal, batch, heads, length, source, q.dtype, q.device
        )
        scores = (q * math.sqrt(1.0 / dim)) @ k.transpose(1, 2)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = (weights @ v).transpose(0, 1).reshape(length, batch, self.embed_dim)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        per_head = weights.view(batch, heads, length, source)
        returned = per_head.mean(dim=1) if average_attn_weights else per_head
        return out, returned if batched else returned.squeeze(0)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def _additive_mask(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
    batch: int,
    heads: int,
    length: int,
    source: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor | None:
    """One float mask ``(batch*heads | 1, length, source)`` added to the scores (True = masked out)."""

    def additive(mask: Tensor) -> Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(mask, -math.inf)
        return mask.to(dtype)

    total = None
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=device).triu(1)
    if attn_mask is not None:
        total = additive(attn_mask)
        if total.dim() == 2:
            total = total.unsqueeze(0)
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).view(batch, 1, 1, source)
        padding = padding.expand(batch, heads, 1, source).reshape(batch * heads, 1, source)
        total = padding if total is None else total + padding
    return total


def supported(attention: nn.MultiheadAttention) -> bool:
    """Whether ``attention`` can be split (no ``add_bias_kv``, no ``add_zero_attn``, stock forward)."""
    return (
        type(attention) is nn.MultiheadAttention
        and attention.bias_k is None
        and not attention.add_zero_attn
    )


def split_attention(root: nn.Module, wanted) -> list[str]:
    """Replace, in ``root``, each supported ``nn.MultiheadAttention`` named by ``wanted(name)``.

    Returns the names of the modules replaced.
    """
    replaced = []
    for name, module in list(root.named_modules()):
        if isinstance(module, nn.MultiheadAttention) and supported(module) and wanted(name):
            replace_module(root, module, SplitAttention(module))
            replaced.append(name)
    mark_replaced(root, replaced)  # a saved compressed model builds it again from the original
    return replaced


register(SplitAttention, SplitAttention)
