"""``compress_sequential``: a stack of blocks calibrated and compressed one block at a time.

References built from the whole-model API: with the dense activations passed
on and a global plan it equals whole-model calibration, ``apply_plan`` and
``compress``; with the compressed activations passed on it equals wrapping,
calibrating and compressing the whole model's blocks one after another.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from models import decoder_config, token_batches

import pcasurgery as ps

transformers = pytest.importorskip("transformers")


def _llama(layers: int = 3):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**decoder_config(num_hidden_layers=layers))
    return transformers.LlamaForCausalLM(config).eval()


def _logits(model, prompt):
    with torch.no_grad():
        return model(input_ids=prompt, use_cache=False).logits


def _whole_model(model, data, remove):
    """The whole-model procedure: its plan and the compressed model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = ps.pca_wrap(model, include="model.layers.*")
    ps.calibrate(wrapped, data, progress=False)
    plan = ps.budget_plan(wrapped, remove=remove)
    ps.apply_plan(wrapped, plan)
    return plan, ps.compress(wrapped)


PROMPT = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(4))


def test_passing_the_dense_activations_on_equals_whole_model_compression():
    model, data = _llama(), token_batches(96)
    plan, whole = _whole_model(model, data, remove=0.3)
    sequential = ps.compress_sequential(
        copy.deepcopy(model), data, blocks="model.layers.*", plan=plan, propagate="original"
    )
    assert list(sequential.compression_report["layer"]) == list(whole.compression_report["layer"])
    assert list(sequential.compression_report["k"]) == list(plan["k"])
    assert ps.count_params(sequential) == ps.count_params(whole) < ps.count_params(model)
    torch.testing.assert_close(
        _logits(sequential, PROMPT), _logits(whole, PROMPT), atol=1e-5, rtol=1e-5
    )


def test_passing_the_compressed_activations_on_equals_compressing_block_after_block():
    model, data = _llama(), token_batches(96)
    reference = copy.deepcopy(model)
    for i in range(3):  # each block calibrated in the model whose earlier blocks are compressed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = ps.pca_wrap(reference, include=f"model.layers.{i}.*")
        ps.calibrate(wrapped, data, progress=False)
        ps.apply_plan(wrapped, ps.budget_plan(wrapped, remove=0.3))
        reference = ps.compress(wrapped)
    sequential = ps.compress_sequential(
        copy.deepcopy(model), data, blocks="model.layers.*", remove=0.3, budget="per-block"
    )
    assert ps.count_params(sequential) == ps.count_params(reference) < ps.count_params(model)
    torch.testing.assert_close(
        _logits(sequential, PROMPT), _logits(reference, PROMPT), atol=1e-5, rtol=1e-5
    )
    # and it differs from passing the dense activations on
    dense_on = ps.compress_sequential(
        copy.deepcopy(model),
        data,
        blocks="model.layers.*",
        remove=0.3,
        budget="per-block",
        propagate="original",
    )
    assert not torch.allclose(_logits(dense_on, PROMPT), _logits(sequential, PROMPT), atol=1e-4)


def test_one_block_is_calibrated_at_a_time_and_the_result_ships(monkeypatch, tmp_path):
    model, data = _llama(), token_batches(96)
    seen = []
    calibrate = ps.analysis.sequential.calibrate

    def counting(wrapped, *args, **kwargs):
        seen.append(len(ps.pca_layers_of(wrapped)))
        return calibrate(wrapped, *args, **kwargs)

    monkeypatch.setattr(ps.analysis.sequential, "calibrate", counting)
    small = ps.compress_sequential(model, data, blocks="model.layers.*", remove=0.3)
    assert seen == [7] * 6  # q, k, v, o, gate, up, down of one block; two passes (global budget)
    assert not ps.pca_layers_of(small)
    small.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert ps.count_params(again) == ps.count_params(small)
    torch.testing.assert_close(_logits(again, PROMPT), _logits(small, PROMPT))


def test_bad_arguments_are_named():
    model, data = _llama(1), token_batches(96)
    with pytest.raises(ValueError, match="either remove .* or plan"):
        ps.compress_sequential(model, data, blocks="model.layers.*")
    with pytest.raises(ValueError, match="propagate must be one of"):
        ps.compress_sequential(model, data, blocks="model.layers.*", remove=0.2, propagate="dense")
    with pytest.raises(ValueError, match="blocks='decoder.\\*' matches no module"):
        ps.compress_sequential(model, data, blocks="decoder.*", remove=0.2)
    with pytest.raises(ValueError, match="at least one batch"):
        ps.compress_sequential(model, [], blocks="model.layers.*", remove=0.2)


def test_a_global_budget_from_the_eigenvalues_of_a_first_pass_equals_the_whole_models():
    model, data = _llama(), token_batches(96)
    plan, whole = _whole_model(model, data, remove=0.3)
    sequential = ps.compress_sequential(
        copy.deepcopy(model), data, blocks="model.layers.*", remove=0.3, propagate="original"
    )
    assert list(sequential.compression_report["k"]) == list(plan["k"])  # the same allocation
    assert ps.count_params(sequential) == ps.count_params(whole)
    torch.testing.assert_close(
        _logits(sequential, PROMPT), _logits(whole, PROMPT), atol=1e-5, rtol=1e-5
    )
    per_block = ps.compress_sequential(
        copy.deepcopy(model), data, blocks="model.layers.*", remove=0.3, budget="per-block"
    )
    assert list(per_block.compression_report["k"]) != list(plan["k"])
