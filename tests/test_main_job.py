"""The demo, the recipes and the examples, on reduced budgets."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from pcasurgery import _digits as digits
from pcasurgery._demo import run_demo

ROOT = Path(__file__).resolve().parents[1]


def test_demo_pipeline_on_a_reduced_budget(tmp_path, capsys):
    summary = run_demo(
        tmp_path, epochs=3, thresholds=(0.9, 0.99, 0.999), progress=False, latency_runs=3
    )
    printed = capsys.readouterr().out
    expected = {"report.csv", "saturation.png", "sweep.csv", "accuracy_vs_parameters.png", "compression.csv",
                "digits_cnn.onnx", "digits_cnn_compressed.onnx", "summary.json"}  # fmt: skip
    assert expected <= set(summary["files"])
    for name in expected:
        assert (tmp_path / name).stat().st_size > 0, name
    assert (
        json.loads((tmp_path / "summary.json").read_text())["compressed"] == summary["compressed"]
    )
    # the numbers printed are the numbers written
    assert f"{summary['compressed']['params']:,}" in printed
    assert f"{summary['original']['test_accuracy']:.2%}" in printed
    sweep = pd.read_csv(tmp_path / "sweep.csv")
    assert sweep["threshold"].tolist() == [0.9, 0.99, 0.999]
    chosen = sweep[sweep["threshold"] == summary["threshold"]].iloc[0]
    assert chosen["params"] == summary["compressed"]["params"]
    assert pd.read_csv(tmp_path / "report.csv")["layer"].tolist() == [
        "conv1",
        "conv2",
        "conv3",
        "fc1",
        "fc2",
    ]


def test_command_line_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "pcasurgery", "demo", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--out" in result.stdout


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = digits.train(digits.DigitsCNN(), digits.load_digits_split(), epochs=2)
    path = tmp_path_factory.mktemp("ckpt") / "digits_cnn.pt"
    torch.save(model.state_dict(), path)
    return path


def run_script(path: Path, *args: str, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [path.name, *args])
    runpy.run_path(str(path), run_name="__main__")


def test_recipes_run_on_the_default_model(tmp_path, checkpoint, monkeypatch, capsys):
    recipes = ROOT / "recipes"
    run_script(recipes / "calibrate_and_report.py", "--checkpoint", str(checkpoint), "--out",
               str(tmp_path / "rep"), monkeypatch=monkeypatch)  # fmt: skip
    assert (tmp_path / "rep" / "saturation.png").exists()
    assert len(pd.read_csv(tmp_path / "rep" / "report.csv")) == 5
    run_script(recipes / "sweep_thresholds.py", "--checkpoint", str(checkpoint), "--thresholds", "0.9", "0.99",
               "--out", str(tmp_path / "sweep.csv"), monkeypatch=monkeypatch)  # fmt: skip
    table = pd.read_csv(tmp_path / "sweep.csv")
    assert table["threshold"].tolist() == [0.9, 0.99] and "metric" in table
    run_script(recipes / "export_compressed.py", "--checkpoint", str(checkpoint), "--threshold", "0.95",
               "--out", str(tmp_path / "small.onnx"), monkeypatch=monkeypatch)  # fmt: skip
    assert (tmp_path / "small.onnx").stat().st_size > 1000
    assert "checked in onnxruntime" in capsys.readouterr().out


@pytest.mark.parametrize(
    "script", ["calibrate_and_report.py", "sweep_thresholds.py", "export_compressed.py"]
)
def test_recipes_have_help(script):
    result = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / script), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--model" in result.stdout and "--checkpoint" in result.stdout


def test_recipe_model_spec_errors_are_clear(monkeypatch):
    with pytest.raises(ValueError, match="--model must look like package.module:attribute"):
        run_script(
            ROOT / "recipes" / "calibrate_and_report.py",
            "--model",
            "nocolon",
            monkeypatch=monkeypatch,
        )
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        run_script(ROOT / "recipes" / "calibrate_and_report.py", "--model", "pcasurgery._digits:Nope",
                   monkeypatch=monkeypatch)  # fmt: skip


def test_examples_run(monkeypatch):
    history = runpy.run_path(str(ROOT / "examples" / "wrap_before_finetuning.py"))["main"](epochs=2)
    assert len(history) == 2 and all(0 < row["k conv1"] <= 32 for row in history)
    result = runpy.run_path(str(ROOT / "examples" / "compress_then_finetune.py"))["main"](
        threshold=0.9, epochs=2
    )
    assert result["params"][1] < result["params"][0] / 5
    assert result["fine_tuned"] > result["compressed"]
