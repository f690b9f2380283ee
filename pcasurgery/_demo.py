"""The end-to-end demo: ``pcasurgery demo [--out DIR]`` (also ``python -m pcasurgery demo``).

Trains a small CNN on scikit-learn's digits, wraps it with PCA layers,
calibrates them, prints the saturation table, sweeps thresholds against
accuracy, picks the smallest model within 1 point of the original accuracy
(on the validation split), compresses it, exports it to ONNX, checks it in
onnxruntime and prints a before/after summary. Everything is seeded.

Files written into ``out``: ``report.csv``, ``saturation.png``, ``sweep.csv``,
``accuracy_vs_parameters.png``, ``compression.csv``, ``digits_cnn.onnx``
(original), ``digits_cnn_compressed.onnx`` and ``summary.json``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ._digits import DigitsCNN, Split, accuracy, load_digits_split, train
from ._validation import check_writable
from .analysis import plot_saturation, report, sweep
from .compression import compress, compression_plan, count_macs, count_params, export_onnx
from .layers import set_threshold
from .surgery import calibrate, pca_wrap

__all__ = ["DEFAULT_THRESHOLDS", "onnx_latency", "run_demo"]

DEFAULT_THRESHOLDS = (0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)


def onnx_latency(
    paths: list[str | Path], batch: torch.Tensor, runs: int = 50, rounds: int = 3, threads: int = 2
) -> list[float]:
    """Median seconds of one onnxruntime (CPU) run of each model on ``batch``.

    The models are timed in alternating rounds (``runs`` runs each), so that
    the machine's drifts hit them alike; idle threads do not spin.
    """
    import onnxruntime as ort

    sessions = []
    for path in paths:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: batch.numpy()}
        session.run(None, feed)
        sessions.append((session, feed))
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, (session, feed) in enumerate(sessions):
            for _ in range(runs):
                t = time.perf_counter()
                session.run(None, feed)
                times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def _plot_tradeoff(table, chosen: float, original: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(table["params"], 100 * table["test_accuracy"], "o-", label="compressed (PCA)")
    for _, row in table.iterrows():
        ax.annotate(
            f"{row['threshold']:g}",
            (row["params"], 100 * row["test_accuracy"]),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize=7,
        )
    ax.axhline(100 * original["test_accuracy"], color="grey", ls="--", label="original accuracy")
    ax.axvline(original["params"], color="grey", ls=":", label="original parameters")
    pick = table[table["threshold"] == chosen].iloc[0]
    ax.plot(
        [pick["params"]], [100 * pick["test_accuracy"]], "r*", ms=14, label=f"chosen (t={chosen:g})"
    )
    ax.set_xscale("log")
    ax.set_xlabel("parameters of the compressed model")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Digits CNN: accuracy vs size, by variance threshold")
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=120)


def run_demo(
    out: str | Path = "demo-out",
    *,
    epochs: int = 30,
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
    max_drop: float = 0.01,
    progress: bool = True,
    latency_runs: int = 50,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the whole pipeline on the digits and write its files into ``out``.

    Returns:
        The summary printed at the end (also written to ``summary.json``).
    """
    out = check_writable(out, "out", folder=True)  # before minutes of work, not after
    started = time.perf_counter()
    split = load_digits_split(seed=seed)
    model, original = _train(split, epochs, seed)
    wrapped = _calibrate_and_report(model, split, out, progress)
    chosen = _sweep(wrapped, split, original, thresholds, max_drop, out)
    small = _compress(wrapped, chosen, out)
    latency = _export(model, small, split, latency_runs, out)
    after = {
        "test_accuracy": accuracy(small, split.x_test, split.y_test),
        "params": count_params(small),
        "macs": count_macs(small, split.x_test[:1]),
    }
    summary: dict[str, Any] = {
        "threshold": chosen,
        "original": original,
        "compressed": after,
        "onnx_latency_ms": {
            str(b): {"original": 1e3 * t0, "compressed": 1e3 * t1}
            for b, (t0, t1) in latency.items()
        },
        "files": sorted(p.name for p in out.iterdir()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["files"] = sorted(p.name for p in out.iterdir())
    _print_summary(summary, out)
    return summary


def _train(split: Split, epochs: int, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    n_train, n_val, n_test = len(split.x_train), len(split.x_val), len(split.x_test)
    print(
        f"[1/6] training a small CNN on scikit-learn's digits ({n_train} train / {n_val} validation / "
        f"{n_test} test images, {epochs} epochs)"
    )
    torch.manual_seed(seed)  # the initial weights too
    model = train(DigitsCNN(), split, epochs=epochs, seed=seed)
    original = {
        "test_accuracy": accuracy(model, split.x_test, split.y_test),
        "val_accuracy": accuracy(model, split.x_val, split.y_val),
        "params": count_params(model),
        "macs": count_macs(model, split.x_test[:1]),
    }
    print(
        f"      test accuracy {original['test_accuracy']:.2%} (validation {original['val_accuracy']:.2%}), "
        f"{original['params']:,} parameters, "
        f"{original['macs']:,} multiply-accumulates per image"
    )
    return model, original


def _calibrate_and_report(
    model: torch.nn.Module, split: Split, out: Path, progress: bool
) -> torch.nn.Module:
    print(
        "[2/6] wrapping every conv and linear layer with a PCA layer and calibrating on the training images"
    )
    wrapped = calibrate(pca_wrap(model, 0.99), split.batches(128), progress=progress)
    table = report(wrapped)
    columns = ["layer", "kind", "width", "idim", "saturation", "explained", "samples"]
    print(table[columns].to_string(index=False))
    table.to_csv(out / "report.csv", index=False)
    plot_saturation(table, out / "saturation.png")
    return wrapped


def _sweep(
    wrapped: torch.nn.Module,
    split: Split,
    original: dict[str, Any],
    thresholds: tuple[float, ...],
    max_drop: float,
    out: Path,
) -> float:
    """Sweep the thresholds; the smallest model within ``max_drop`` of the validation accuracy."""
    print("[3/6] sweeping thresholds against accuracy (no eigendecomposition is recomputed)")

    def evaluate(m):
        return {
            "val_accuracy": accuracy(m, split.x_val, split.y_val),
            "test_accuracy": accuracy(m, split.x_test, split.y_test),
        }

    swept = sweep(wrapped, thresholds, evaluate, example_inputs=split.x_test[:1])
    print(swept.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    swept.to_csv(out / "sweep.csv", index=False)
    ok = swept[swept["val_accuracy"] >= original["val_accuracy"] - max_drop]
    chosen = float((ok if len(ok) else swept).sort_values("params").iloc[0]["threshold"])
    _plot_tradeoff(swept, chosen, original, out / "accuracy_vs_parameters.png")
    print(
        f"      smallest model within {100 * max_drop:g} point of the original validation accuracy: "
        f"threshold {chosen:g}"
    )
    return chosen


def _compress(wrapped: torch.nn.Module, chosen: float, out: Path) -> torch.nn.Module:
    print(
        f"[4/6] compressing at threshold {chosen:g}: folding the kept eigendirections into the layers"
    )
    set_threshold(wrapped, chosen)
    plan = compression_plan(wrapped)
    print(plan.to_string(index=False))
    plan.to_csv(out / "compression.csv", index=False)
    return compress(wrapped)


def _export(
    model: torch.nn.Module, small: torch.nn.Module, split: Split, latency_runs: int, out: Path
) -> dict[int, tuple[float, ...]]:
    print("[5/6] exporting both models to ONNX and checking them in onnxruntime")
    example = split.x_test[:1]
    before_path = export_onnx(model, example, out / "digits_cnn.onnx")
    after_path = export_onnx(small, example, out / "digits_cnn_compressed.onnx")
    latency = {}
    for batch in (1, 256):
        x = split.x_test.repeat(2, 1, 1, 1)[:batch].contiguous()
        runs = latency_runs if batch == 1 else max(3, latency_runs // 5)
        latency[batch] = tuple(onnx_latency([before_path, after_path], x, runs))
    return latency


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    original, after = summary["original"], summary["compressed"]
    print("[6/6] summary")
    rows = [
        ("test accuracy", f"{original['test_accuracy']:.2%}", f"{after['test_accuracy']:.2%}", ""),
        (
            "parameters",
            f"{original['params']:,}",
            f"{after['params']:,}",
            f"{original['params'] / after['params']:.1f}x fewer",
        ),
        (
            "MACs per image",
            f"{original['macs']:,}",
            f"{after['macs']:,}",
            f"{original['macs'] / after['macs']:.1f}x fewer",
        ),
    ]
    for b, times in summary["onnx_latency_ms"].items():
        t0, t1 = times["original"], times["compressed"]
        rows.append(
            (f"onnxruntime, batch {b}", f"{t0:.3f} ms", f"{t1:.3f} ms", f"{t0 / t1:.2f}x faster")
        )
    print(f"      {'':24s} {'original':>12s} {'compressed':>12s}")
    for name, a, b, note in rows:
        print(f"      {name:24s} {a:>12s} {b:>12s}  {note}")
    print(f"      files in {out}/: {', '.join(summary['files'])}")
    print(f"      done in {summary['seconds']} s")
