"""``python -m pcasurgery compress-lm``: the LLM job as one command, on a tiny random Llama.

The model folder holds a tiny random Llama and a byte-level BPE tokenizer
trained on the first lines of tinyshakespeare (both built here, no download).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from models import decoder_config

from pcasurgery.__main__ import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "tinyshakespeare.txt"
SMALL = [
    "--window",
    "32",
    "--calibration",
    "4",
    "--planning",
    "2",
    "--held-out",
    "4",
    "--prompts",
    "2",
    "--new-tokens",
    "6",
    "--batch",
    "2",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("tiny-llama")
    text = TEXT.read_text()[:20_000]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**decoder_config(
        vocab_size=len(fast), hidden_size=48, intermediate_size=96, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    ))  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture()
def text(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT.read_text()[:12_000])
    return path


def test_the_command_writes_a_checkpoint_and_its_reports(model_dir, text, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "compress-lm",
        str(model_dir),
        "--text",
        str(text),
        "--remove",
        "0.3",
        "--out",
        str(out),
    ]
    assert main(argv + SMALL) == 0
    printed = capsys.readouterr().out
    assert "[7/7]" in printed and "held-out perplexity" in printed
    for name in (
        "report.csv",
        "plan.csv",
        "saturation.png",
        "summary.json",
        "model/config.json",
        "model/model.safetensors",
        "model/modeling_pcasurgery.py",
        "model/tokenizer.json",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    windows = summary["windows"]
    spans = [tuple(w) for role in ("calibration", "planning", "held_out") for w in windows[role]]
    assert [len(windows[r]) for r in ("calibration", "planning", "held_out")] == [4, 2, 4]
    assert all(b - a == 32 for a, b in spans)
    ordered = sorted(spans)
    assert all(a[1] <= b[0] for a, b in zip(ordered[:-1], ordered[1:], strict=True))  # disjoint
    cut = int(windows["tokens"] * 0.9)
    assert all(b <= cut for a, b in windows["calibration"] + windows["planning"])
    assert all(a >= cut for a, b in windows["held_out"])
    assert summary["blocks"] == "model.layers.*"
    dense, small = summary["dense"], summary["compressed"]
    assert math.isfinite(dense["perplexity"]) and math.isfinite(small["perplexity"])
    assert small["reloaded_perplexity"] == pytest.approx(small["perplexity"], rel=1e-5)
    assert summary["perplexity_ratio"] == pytest.approx(small["perplexity"] / dense["perplexity"])
    plan = pd.read_csv(out / "plan.csv")
    assert small["block_params"] < dense["block_params"]
    removed = dense["block_params"] - small["block_params"]
    assert removed == (plan["params_before"] - plan["params_after"]).sum()  # the plan delivered
    assert removed >= 0.3 * plan["params_before"].sum()
    assert len(pd.read_csv(out / "report.csv")) == len(plan) == 14
    assert [set(c) for c in summary["continuations"]] == [{"prompt", "dense", "compressed"}] * 2
    assert set(summary["seconds"]) >= {
        "load",
        "dense",
        "calibrate",
        "plan",
        "compress",
        "save",
        "check",
        "total",
    }
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        out / "model", trust_remote_code=True
    )
    assert type(loaded).__name__ == "CompressedLlamaForCausalLM"


def test_from_disk_the_blocks_are_read_one_at_a_time_and_the_checkpoint_written_by_them(
    model_dir, text, tmp_path, capsys, monkeypatch
):
    import pcasurgery.analysis.sequential as sequential

    resident = []  # the blocks whose weights are in memory, at each block's call
    original = sequential._loaded

    def loaded(model, name, reader):
        block = original(model, name, reader)
        layers = model.get_submodule(name.rpartition(".")[0])
        resident.append(sum(not next(b.parameters()).is_meta for b in layers))
        return block

    monkeypatch.setattr(sequential, "_loaded", loaded)
    out = tmp_path / "out"
    argv = ["compress-lm", str(model_dir), "--text", str(text), "--remove", "0.3"]
    assert main([*argv, "--out", str(out), "--from-disk", *SMALL]) == 0
    assert "[7/7]" in capsys.readouterr().out
    assert resident and max(resident) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["from_disk"] and summary["continuations"] == []
    for name in ("report.csv", "plan.csv", "saturation.png", "model/tokenizer.json"):
        assert (out / name).is_file(), name
    # the perplexities, against the whole models in memory
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text.read_text()).input_ids
    held = torch.tensor([ids[a:b] for a, b in summary["windows"]["held_out"]])

    def plain_perplexity(model):
        with torch.no_grad():
            loss = model(input_ids=held, labels=held, use_cache=False).loss
        return math.exp(float(loss))

    dense = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    small = transformers.AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True)
    assert summary["dense"]["perplexity"] == pytest.approx(plain_perplexity(dense), rel=1e-5)
    compressed = summary["compressed"]
    assert compressed["perplexity"] == pytest.approx(plain_perplexity(small), rel=1e-5)
    assert compressed["reloaded_perplexity"] == pytest.approx(compressed["perplexity"], rel=1e-5)
    plan = pd.read_csv(out / "plan.csv")
    removed = summary["dense"]["block_params"] - compressed["block_params"]
    assert removed == (plan["params_before"] - plan["params_after"]).sum()  # the plan delivered
    assert removed >= 0.3 * plan["params_before"].sum()
    assert ps_count(small) == compressed["params"]
    # the job in memory plans and compresses the same
    memory = tmp_path / "in-memory"
    assert main([*argv, "--out", str(memory), "--no-check", *SMALL]) == 0
    # (its eigenvalues come with its eigenvectors, from another LAPACK routine: equal to rounding)
    in_memory = pd.read_csv(memory / "plan.csv")
    pd.testing.assert_frame_equal(
        in_memory.drop(columns="explained"), plan.drop(columns="explained")
    )
    np.testing.assert_allclose(in_memory["explained"], plan["explained"], rtol=1e-12)
    again = json.loads((memory / "summary.json").read_text())
    assert again["compressed"]["perplexity"] == pytest.approx(compressed["perplexity"], rel=1e-5)


def ps_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _bad_inputs(model_dir: Path, text: Path, tmp_path: Path):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    no_safetensors = tmp_path / "no-safetensors"
    no_safetensors.mkdir()
    (no_safetensors / "config.json").write_text((model_dir / "config.json").read_text())
    taken = tmp_path / "taken"
    (taken / "model").mkdir(parents=True)
    (taken / "model" / "config.json").write_text("{}")
    ok = {
        "model": str(model_dir),
        "--text": str(text),
        "--remove": "0.2",
        "--out": str(tmp_path / "o"),
    }
    return {
        "missing model": ({"model": str(tmp_path / "nothing")}, "MODEL .*no such file"),
        "folder without config": ({"model": str(tmp_path)}, "without config.json"),
        "not gguf": ({"model": str(text)}, "not a .gguf file"),
        "missing text": ({"--text": str(tmp_path / "none.txt")}, "--text .*no such file"),
        "text too short": ({"--text": str(short)}, "--text has \\d+ tokens.*give a longer text"),
        "no blocks": (
            {"--blocks": "model.nothing.*"},
            "--blocks 'model.nothing.\\*' matches no module",
        ),
        "out is a file": ({"--out": str(a_file)}, "--out=.*is a file"),
        "out unwritable": ({"--out": str(a_file / "sub")}, "--out=.*cannot be written"),
        "budget 0": ({"--remove": "0"}, "--remove must be a fraction in \\(0, 1\\), got 0.0"),
        "budget 1": ({"--remove": "1.0"}, "--remove must be a fraction in \\(0, 1\\)"),
        "budget 2": ({"--remove": "2"}, "--remove must be a fraction"),
        "from disk, no safetensors": (
            {"model": str(no_safetensors), "--from-disk": None},
            "--from-disk reads the blocks from a transformers folder of safetensors",
        ),
        "from disk, model folder taken": (
            {"--out": str(taken), "--from-disk": None},
            "--out .*already holds a model folder",
        ),
    }, ok


@pytest.mark.parametrize(
    "case",
    [
        "missing model",
        "folder without config",
        "not gguf",
        "missing text",
        "text too short",
        "no blocks",
        "out is a file",
        "out unwritable",
        "budget 0",
        "budget 1",
        "budget 2",
        "from disk, no safetensors",
        "from disk, model folder taken",
    ],
)
def test_bad_input_is_a_clear_error_before_any_long_work(
    case, model_dir, text, tmp_path, capsys, monkeypatch
):
    def never(*args, **kwargs):
        raise AssertionError("the job started its long work")

    monkeypatch.setattr("pcasurgery._compress_lm.perplexity", never)
    monkeypatch.setattr("pcasurgery._compress_lm.calibrate", never)
    monkeypatch.setattr("pcasurgery._compress_lm.calibrate_sequential", never)
    cases, ok = _bad_inputs(model_dir, text, tmp_path)
    change, message = cases[case]
    args = {**ok, **change}
    model = args.pop("model")
    flags = [x for kv in args.items() for x in kv if x is not None]
    argv = ["compress-lm", model, *flags, *SMALL]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bars
    assert err.startswith("pcasurgery compress-lm: error: ")
    assert re.search(message, err), err
