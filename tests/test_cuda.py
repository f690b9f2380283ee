"""Calibration, projection and compression on a CUDA device against the same on the CPU.

Skipped without CUDA. The CPU run is the reference. Statistics and spectra are
float64 on both, but the activations they are taken from are float32 products
of two BLAS libraries (1e-7 apart), so spectra agree to 1e-5 relative, and the
projecting and compressed models' outputs to float32 round-off.
Covered here beyond ``test_calibrate``'s CNN: a transformer's dict batches with
padding (masked statistics), widening projections whose spectra come through
their input (``layers.through``), factored projections, the eval fold, and
``compress``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from models import reference, token_batches
from torch import nn

import pcasurgery as ps

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
transformers = pytest.importorskip("transformers")


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def wrapped_pair(model: nn.Module, threshold: float):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cpu = ps.pca_wrap(copy.deepcopy(model), threshold, include="model.layers.*")
        gpu = ps.pca_wrap(copy.deepcopy(model), threshold, include="model.layers.*")
    data = token_batches(96)
    ps.calibrate(cpu, data, progress=False)
    ps.calibrate(gpu, data, device="cuda", progress=False)
    return cpu, gpu


def test_a_transformer_calibrated_on_cuda_matches_the_cpu():
    cpu, gpu = wrapped_pair(tiny_llama(), 0.9)
    for name, a in ps.pca_layers_of(cpu).items():
        b = ps.pca_layers_of(gpu)[name]
        assert b.eigenvalues.device.type == "cuda"
        assert int(b.sample_count) == int(a.sample_count) == 16 * 24 - 4 * 12, name  # no pads
        assert b.in_dim == a.in_dim, name
        scale = float(a.eigenvalues[0])
        torch.testing.assert_close(b.eigenvalues.cpu(), a.eigenvalues, rtol=1e-5, atol=1e-7 * scale)
        torch.testing.assert_close(b.mean.cpu(), a.mean, rtol=1e-5, atol=1e-6)
    prompt = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        expected = cpu(input_ids=prompt).logits
        torch.testing.assert_close(
            gpu(input_ids=prompt.cuda()).logits.cpu(), expected, rtol=1e-4, atol=1e-4
        )
        small = ps.compress(gpu)
        torch.testing.assert_close(
            small(input_ids=prompt.cuda()).logits.cpu(), expected, rtol=1e-4, atol=1e-4
        )
    assert ps.count_params(small) < ps.count_params(cpu)


def test_widening_projections_on_cuda_keep_only_their_input_rank():
    """gate/up (32 -> 96) are collected on their input; their spectra have at most 32 directions."""
    cpu, gpu = wrapped_pair(tiny_llama(), 1.0)
    for name in ("model.layers.0.mlp.gate_proj", "model.layers.1.mlp.up_proj"):
        a, b = ps.pca_layers_of(cpu)[name], ps.pca_layers_of(gpu)[name]
        assert b.width == 96
        assert int((b.eigenvalues > 1e-9 * b.eigenvalues[0]).sum()) <= 33
        scale = float(a.eigenvalues[0])
        torch.testing.assert_close(b.eigenvalues.cpu(), a.eigenvalues, rtol=1e-5, atol=1e-7 * scale)
        # the projections span the same subspace (signs follow one convention)
        torch.testing.assert_close(
            b.projection_weight.cpu(), a.projection_weight, rtol=1e-4, atol=1e-5
        )


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, 48), nn.Linear(48, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_the_eval_fold_on_cuda_equals_the_float64_reference():
    """The first eval calls project apart, later ones run folded; both are the same map."""
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    wrapped = ps.pca_wrap(Mlp(), 0.6, include=["fc1", "fc2"])
    ps.calibrate(wrapped, x.split(128), device="cuda", progress=False)
    wrapped.eval()
    layers = ps.pca_layers_of(wrapped)
    assert all(layer.in_dim < layer.width for layer in layers.values())
    x = x[:32].cuda()
    with torch.no_grad():
        for _ in range(4):  # 4 x 32 rows: folds once it has seen as many rows as inputs
            h1 = wrapped.fc1(x)
            torch.testing.assert_close(
                h1.double(), reference(wrapped.fc1, layers["fc1"], x), rtol=1e-5, atol=1e-5
            )
            h2 = wrapped.fc2(torch.relu(h1))
            torch.testing.assert_close(
                h2.double(),
                reference(wrapped.fc2, layers["fc2"], torch.relu(h1)),
                rtol=1e-5,
                atol=1e-5,
            )


def test_sequential_compression_computes_each_block_on_the_gpu_and_brings_it_back():
    model, data = tiny_llama(), token_batches(96)
    on_cpu = ps.compress_sequential(copy.deepcopy(model), data, blocks="model.layers.*", remove=0.3)
    on_gpu = ps.compress_sequential(model, data, blocks="model.layers.*", remove=0.3, device="cuda")
    assert {p.device.type for p in on_gpu.parameters()} == {"cpu"}
    assert ps.count_params(on_gpu) == ps.count_params(on_cpu)
    prompt = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(
            on_gpu(input_ids=prompt).logits, on_cpu(input_ids=prompt).logits, atol=1e-4, rtol=1e-4
        )


def _lm_loss(model, batch):
    return model(**batch, labels=batch["input_ids"], use_cache=False).loss


def test_blocks_evaluated_and_weighed_on_the_gpu_give_the_cpus_results():
    model, data = tiny_llama(), token_batches(96)
    logits = lambda m, b: m(**b, use_cache=False).logits  # noqa: E731
    on_cpu = ps.forward_sequential(model, data, blocks="model.layers.*", forward=logits)
    on_gpu = ps.forward_sequential(
        model, data, blocks="model.layers.*", forward=logits, device="cuda"
    )
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert b.device.type == "cpu"
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    weighed = dict(blocks="model.layers.*", loss=_lm_loss, loss_data=token_batches(96, count=2))
    plan_cpu = ps.budget_plan(ps.calibrate_sequential(model, data, **weighed), remove=0.3)
    plan_gpu = ps.budget_plan(
        ps.calibrate_sequential(model, data, device="cuda", **weighed), remove=0.3
    )
    assert list(plan_gpu["k"]) == list(plan_cpu["k"])
