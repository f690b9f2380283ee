"""nn.MultiheadAttention split into Linear projections: the same function, then followed by PCA layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pcasurgery as ps
from pcasurgery.surgery.attention import SplitAttention


def masks(batch: int, length: int, source: int, heads: int, kind: str):
    g = torch.Generator().manual_seed(1)
    padding = torch.zeros(batch, source, dtype=torch.bool)
    padding[0, source - 2 :] = True
    causal = torch.ones(length, source, dtype=torch.bool).triu(1)
    return {
        "none": {},
        "padding": {"key_padding_mask": padding},
        "float padding": {"key_padding_mask": padding.float() * -1e4},
        "causal": {"attn_mask": causal, "is_causal": True},
        "float 3d": {"attn_mask": torch.randn(batch * heads, length, source, generator=g)},
        "both": {"attn_mask": causal, "key_padding_mask": padding},
    }[kind]


@pytest.mark.parametrize("kind", ["none", "padding", "float padding", "causal", "float 3d", "both"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_split_attention_equals_multihead_attention(kind, batch_first, need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    split = SplitAttention(mha).eval()
    q = torch.randn(3, 5, 16)
    kv = torch.randn(3, 5, 16)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    options = masks(3, 5, 5, 4, kind)
    with torch.no_grad():
        expected = mha(q, kv, kv, need_weights=need_weights, **options)
        got = split(q, kv, kv, need_weights=need_weights, **options)
    torch.testing.assert_close(got[0], expected[0], atol=1e-6, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(got[1], expected[1], atol=1e-6, rtol=1e-5)
    else:
        assert got[1] is None


def test_split_attention_with_other_key_widths_unbatched_and_per_head_weights():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, kdim=7, vdim=5, bias=False).eval()
    split = SplitAttention(mha)
    q, k, v = torch.randn(4, 12), torch.randn(6, 7), torch.randn(6, 5)  # unbatched
    with torch.no_grad():
        expected = mha(q, k, v, average_attn_weights=False)
        got = split(q, k, v, average_attn_weights=False)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_transformer_layer_attention_projections_get_pca_layers():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0).eval()
    x = torch.randn(8, 7, 16)  # 56 tokens: more rows than any layer is wide
    padding = torch.zeros(8, 7, dtype=torch.bool)
    padding[:, 5:] = True
    wrapped = ps.pca_wrap(layer, 0.95)
    assert list(ps.pca_layers_of(wrapped)) == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
        "linear1", "linear2",
    ]  # fmt: skip
    assert isinstance(layer.self_attn, nn.MultiheadAttention)  # the original is untouched
    with torch.no_grad():  # uncalibrated: the original function
        torch.testing.assert_close(wrapped(x, src_key_padding_mask=padding),
                                   layer(x, src_key_padding_mask=padding), atol=1e-5, rtol=1e-5)  # fmt: skip
    ps.calibrate(wrapped, [x], progress=False)
    small = ps.compress(wrapped)
    with torch.no_grad():
        torch.testing.assert_close(small(x), wrapped(x), atol=1e-4, rtol=1e-4)
    only_mlp = ps.pca_wrap(layer, 0.95, include="linear*")  # attention left as it was
    assert isinstance(only_mlp.self_attn, nn.MultiheadAttention)


def test_attention_that_cannot_be_split_is_left_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(8, 2, add_bias_kv=True))
    model.add_module("fc", nn.Linear(8, 8))
    with pytest.warns(UserWarning) as caught:
        wrapped = ps.pca_wrap(model, include=["attn.*", "fc"])
    messages = " ".join(str(w.message) for w in caught)
    assert "never called as modules" in messages and "- attn.out_proj" in messages
    assert "MultiheadAttention (62%)" in messages  # weights no PCA layer can follow
    assert isinstance(wrapped.attn, nn.MultiheadAttention)
    assert list(ps.pca_layers_of(wrapped)) == ["fc"]
