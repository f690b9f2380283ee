"""calibrate's ``skip_tail``: an LLM's output layer runs on the first batch only, and every
statistic is the same as with every batch run whole."""

from __future__ import annotations

import warnings

import pytest
import torch
from models import decoder_config, token_batches
from torch import nn

import pcasurgery as ps


def _runs(module: nn.Module) -> list[int]:
    """A counter of ``module``'s completed forwards."""
    runs = [0]
    module.register_forward_hook(lambda *_: runs.__setitem__(0, runs[0] + 1))
    return runs


def _statistics(model: nn.Module) -> dict[str, tuple[int, torch.Tensor, torch.Tensor]]:
    return {
        name: (int(layer.sample_count), layer.eigenvalues.clone(), layer.mean.clone())
        for name, layer in ps.pca_layers_of(model).items()
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][0] == b[name][0], name
        assert torch.equal(a[name][1], b[name][1]), name
        assert torch.equal(a[name][2], b[name][2]), name


def _calibrated(model: nn.Module, batches: list, **kwargs) -> tuple[dict, int]:
    """The statistics after calibrating a fresh wrap of ``model``, and the output layer's runs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tied output layer left alone
        wrapped = ps.pca_wrap(model, 0.9, exclude="*head")
    runs = _runs(wrapped.get_output_embeddings())
    ps.calibrate(wrapped, batches, progress=False, **kwargs)
    return _statistics(wrapped), runs[0]


def test_an_llms_output_layer_runs_on_the_first_batch_only_for_the_same_statistics():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**decoder_config(num_hidden_layers=2))
    model = transformers.LlamaForCausalLM(config).eval()
    batches = token_batches(96, count=4)
    skipped, runs = _calibrated(model, batches)
    whole, whole_runs = _calibrated(model, batches, skip_tail=False)
    assert (runs, whole_runs) == (1, 4)
    assert len(skipped) == 14  # q, k, v, o, gate, up, down of two blocks
    _assert_same(skipped, whole)
    # and the statistics are those of the activations (float64 reference)
    captured = []
    block = model.model.layers[1].mlp.down_proj
    handle = block.register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    rows = torch.cat(
        [o[b["attention_mask"].bool()] for o, b in zip(captured, batches, strict=True)]
    )
    rows = rows.double()
    reference = torch.linalg.eigvalsh(torch.cov(rows.T, correction=0)).flip(0)
    name = "model.layers.1.mlp.down_proj"
    assert skipped[name][0] == len(rows)
    torch.testing.assert_close(skipped[name][1], reference, rtol=1e-5, atol=1e-7)


class _TinyLM(nn.Module):
    """An embedding, two residual blocks, a norm and an output layer; ``paths`` picks
    how a batch runs the blocks, as a model whose control flow depends on the data does."""

    def __init__(self, paths: str = "fixed", vocab: int = 40, width: int = 8):
        super().__init__()
        self.paths = paths
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(2))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        h = self.embed(input_ids)
        late = int(input_ids[0, 0]) % 2 == 1  # differs from batch to batch
        if self.paths == "early exit" and not late:
            return self.head(self.norm(self.blocks[0](h)))
        if self.paths == "head between" and late:
            self.head(h)  # an early read-out, then the rest of the blocks
        repeats = 2 if self.paths == "repeat" and late else 1
        for block in self.blocks:
            for _ in range(repeats):
                h = h + block(h)
        if self.paths == "catching":
            try:
                return self.head(self.norm(h))
            except BaseException:
                return h
        return self.head(self.norm(h))


def _lm_batches() -> list[dict]:
    """Four batches, the first with an even leading token, the others odd, even, odd."""
    batches = token_batches(40, count=4, batch=3, length=6)
    for i, batch in enumerate(batches):
        batch["input_ids"][0, 0] = 4 + i
    return batches


@pytest.mark.parametrize(
    ("paths", "runs"),
    [
        ("fixed", 1),
        ("early exit", 4),  # the first batch leaves block 1 unreached: all run whole
        ("repeat", 3),  # batches 1 and 3 call the blocks twice: they run whole
        ("head between", 1),  # batches 1 and 3 call it before the blocks too: runs there
        ("catching", 3),  # the model caught the stop in batch 1: the later ones run whole
    ],
)
def test_the_output_layer_runs_wherever_a_pca_layer_could_still_follow(paths, runs):
    torch.manual_seed(0)
    model = _TinyLM(paths).eval()
    skipped, skipped_runs = _calibrated(model, _lm_batches())
    whole, whole_runs = _calibrated(model, _lm_batches(), skip_tail=False)
    assert whole_runs == 4 + (paths == "head between") * 2
    assert skipped_runs == runs + (paths == "head between") * 2
    _assert_same(skipped, whole)


def test_the_output_layer_runs_with_a_custom_forward_and_bad_skip_tail_is_named():
    torch.manual_seed(0)
    model = _TinyLM().eval()
    batches = _lm_batches()
    custom, runs = _calibrated(model, batches, forward=lambda m, b: m(b["input_ids"]))
    assert runs == 4
    with pytest.raises(TypeError, match="skip_tail"):
        ps.calibrate(ps.pca_wrap(model), batches, skip_tail="yes", progress=False)


def _architecture(name: str) -> tuple[nn.Module, list[dict]]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    size = dict(vocab_size=64)
    if name == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, **size)
        model = transformers.GPT2LMHeadModel(config)
    elif name == "bert":
        config = transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **size
        )
        model = transformers.BertForMaskedLM(config)
    else:
        config = transformers.T5Config(
            d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, **size
        )
        model = transformers.T5ForConditionalGeneration(config)
    batches = token_batches(64, count=3, batch=2, length=10)
    if name == "t5":
        for batch in batches:
            batch["decoder_input_ids"] = batch["input_ids"][:, :6]
    return model.eval(), batches


@pytest.mark.filterwarnings("ignore:.*saw fewer samples")  # tiny batches: the spectra are theirs
@pytest.mark.parametrize("name", ["gpt2", "bert", "t5"])
def test_tied_heads_of_other_architectures_run_once_for_the_same_statistics(name):
    """GPT-2's and T5's LM heads, BERT's masked-LM decoder (after its wrapped transform)."""
    model, batches = _architecture(name)
    statistics, runs = [], []
    for skip_tail in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tied output layer left alone
            wrapped = ps.pca_wrap(model, 0.9)
        head = _runs(wrapped.get_output_embeddings())
        ps.calibrate(wrapped, batches, progress=False, skip_tail=skip_tail)
        statistics.append(_statistics(wrapped))
        runs.append(head[0])
    assert runs == [1, 3]
    _assert_same(*statistics)
