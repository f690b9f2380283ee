"""Compression quality and speed on real data: scikit-learn's digits.

Two models trained in seconds on the CPU (an MLP 64-256-256-10 and a CNN with
convolutions 32-64-128 and two linear layers) are wrapped, calibrated on the
training split and compressed at several thresholds. One table per model:
threshold -> test accuracy, parameters, MACs per example, and onnxruntime
latency speed-up over the original at batch 1 and 256, for PCA folding and, at
the same per-layer ranks, for the data-free baseline (truncated SVD of each
weight matrix). Thresholds are chosen on the validation split; accuracies are
on the test split.

Usage: python benchmarks/bench_compression.py [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import pcasurgery as ps
from pcasurgery._digits import DigitsCNN, DigitsMLP, accuracy, load_digits_split, train

THRESHOLDS = (0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)


def svd_baseline(original: nn.Module, wrapped: nn.Module) -> nn.Module:
    """Truncated SVD of each wrapped layer's weights at the PCA layer's rank (data-free)."""
    model = copy.deepcopy(original)
    actions = ps.compression_plan(wrapped).set_index("layer")["action"]
    for name, layer in ps.pca_layers_of(wrapped).items():
        module = model.get_submodule(name)
        k = layer.in_dim
        w = module.weight.detach().double().reshape(module.weight.shape[0], -1)
        u, s, vt = torch.linalg.svd(w, full_matrices=False)
        low = (u[:, :k] * s[:k]) @ vt[:k]
        with torch.no_grad():
            if actions[name] != "factorised":
                module.weight.copy_(low.reshape(module.weight.shape))
                continue
            conv = isinstance(module, nn.Conv2d)
            if conv:
                down = nn.Conv2d(module.in_channels, k, module.kernel_size, module.stride, module.padding,
                                 module.dilation)  # fmt: skip
                up = nn.Conv2d(k, module.out_channels, 1)
            else:
                down, up = nn.Linear(module.in_features, k), nn.Linear(k, module.out_features)
            down.weight.copy_((s[:k, None] * vt[:k]).reshape(down.weight.shape).float())
            up.weight.copy_(u[:, :k].reshape(up.weight.shape).float())
            down.bias.zero_()  # same parameter count as PCA's down-projection
            up.bias.copy_(module.bias)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, nn.Sequential(down, up))
    return model.eval()


class Latency:
    """onnxruntime latency of a model at a batch size (median of runs)."""

    def __init__(self, folder: Path, threads: int):
        self.folder, self.threads, self.count = folder, threads, 0

    def session(self, model: nn.Module, example: torch.Tensor):
        import onnxruntime as ort

        self.count += 1
        path = ps.export_onnx(model, example, self.folder / f"m{self.count}.onnx", check=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # two sessions are timed alternately: idle threads must not spin on the cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    @staticmethod
    def seconds(session, x: np.ndarray, budget: float = 0.25) -> float:
        """Median seconds per run over about ``budget`` seconds of runs (at least 5)."""
        name = session.get_inputs()[0].name
        session.run(None, {name: x})
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < 5 or time.perf_counter() - start < budget:
            t = time.perf_counter()
            session.run(None, {name: x})
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def speedups(
        self, original, candidate, example, batches=(1, 256), rounds: int = 5
    ) -> list[float]:
        """Original latency / candidate latency at each batch size, timed in alternating rounds."""
        a, b = self.session(original, example), self.session(candidate, example)
        out = []
        for batch in batches:
            x = np.random.default_rng(0).random((batch, *example.shape[1:]), dtype=np.float32)
            ta, tb = [], []
            for _ in range(rounds):
                ta.append(self.seconds(a, x))
                tb.append(self.seconds(b, x))
            out.append(statistics.median(ta) / statistics.median(tb))
        return out


def run_model(name, factory, split, latency: Latency, quick: bool, epochs: int):
    torch.manual_seed(0)
    model = train(factory(), split, epochs=epochs)
    example = split.x_test[:1]
    base = {
        "val": accuracy(model, split.x_val, split.y_val),
        "test": accuracy(model, split.x_test, split.y_test),
        "params": ps.count_params(model),
        "macs": ps.count_macs(model, example),
    }
    wrapped = ps.calibrate(ps.pca_wrap(model, 0.99), split.batches(), progress=False)
    print(f"\n== {name}: test accuracy {base['test']:.2%}, {base['params']:,} parameters, "
          f"{base['macs']:,} MACs per example ==")  # fmt: skip
    header = (f"{'threshold':>9} | {'PCA acc':>7} {'params':>7} {'x fewer':>7} {'MACs':>9} {'x fewer':>7} "
              f"{'ort x b1':>8} {'ort x b256':>10} | {'SVD acc':>7}")  # fmt: skip
    print(header)
    print("-" * len(header))
    rows = []
    for t in THRESHOLDS[::2] if quick else THRESHOLDS:
        ps.set_threshold(wrapped, t)
        small = ps.compress(wrapped)
        svd = svd_baseline(model, wrapped)
        row = {
            "threshold": t,
            "val": accuracy(wrapped, split.x_val, split.y_val),
            "test": accuracy(small, split.x_test, split.y_test),
            "svd": accuracy(svd, split.x_test, split.y_test),
            "params": ps.count_params(small),
            "svd_params": ps.count_params(svd),
            "macs": ps.count_macs(small, example),
            "small": small,
        }
        row["b1"], row["b256"] = latency.speedups(model, small, example)
        rows.append(row)
        print(f"{t:9.3f} | {row['test']:7.2%} {row['params']:7,} {base['params'] / row['params']:7.1f} "
              f"{row['macs']:9,} {base['macs'] / row['macs']:7.1f} {row['b1']:8.2f} {row['b256']:10.2f} | "
              f"{row['svd']:7.2%}")  # fmt: skip
        assert row["params"] == row["svd_params"], "SVD baseline must match PCA's parameter count"
    ok = [r for r in rows if r["val"] >= base["val"] - 0.01]
    chosen = min(ok, key=lambda r: r["params"]) if ok else None
    summary = {"name": name, "base": base, "rows": rows, "chosen": chosen}
    if chosen:
        print(f"chosen on validation (<= 1 point below the original there): threshold {chosen['threshold']}: "
              f"test {chosen['test']:.2%} ({100 * (chosen['test'] - base['test']):+.1f} points), "
              f"{base['params'] / chosen['params']:.1f}x fewer parameters, "
              f"{base['macs'] / chosen['macs']:.1f}x fewer MACs, onnxruntime {chosen['b256']:.2f}x faster "
              f"at batch 256")  # fmt: skip
    if name == "CNN":
        ps.set_threshold(wrapped, 1.0)
        steps = ps.allocate(
            wrapped, lambda m: accuracy(m, split.x_val, split.y_val), 0.01, example_inputs=example
        )
        small = ps.compress(wrapped)
        test = accuracy(small, split.x_test, split.y_test)
        macs = ps.count_macs(small, example)
        b1, b256 = latency.speedups(model, small, example)
        summary["allocate"] = {
            "test": test,
            "macs": macs,
            "params": ps.count_params(small),
            "b256": b256,
        }
        print(f"allocate (max_drop 1 point on validation, {len(steps) - 1} steps): test {test:.2%} "
              f"({100 * (test - base['test']):+.1f} points), {base['macs'] / macs:.1f}x fewer MACs, "
              f"{base['params'] / ps.count_params(small):.1f}x fewer parameters, onnxruntime {b256:.2f}x "
              f"faster at batch 256")  # fmt: skip
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="fewer thresholds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    split = load_digits_split()
    with tempfile.TemporaryDirectory() as folder:
        latency = Latency(Path(folder), args.threads)
        results = [
            run_model("MLP", DigitsMLP, split, latency, args.quick, args.epochs),
            run_model("CNN", DigitsCNN, split, latency, args.quick, args.epochs),
        ]
    print("\n== goals ==")
    for r in results:
        c = r["chosen"]
        if c is None:
            print(f"{r['name']}: no threshold within 1 point on validation")
            continue
        fewer = r["base"]["params"] / c["params"]
        loss = 100 * (r["base"]["test"] - c["test"])
        print(f"{r['name']}: {fewer:.1f}x fewer parameters (goal >= 6x) at {loss:.1f} points test loss "
              f"(goal <= 1); onnxruntime {c['b256']:.2f}x faster at batch 256 (goal >= 2x)")  # fmt: skip
        wins = all(row["test"] >= row["svd"] for row in r["rows"])
        print(f"{r['name']}: PCA at least as accurate as SVD at every threshold: {wins}")
    cnn = results[1].get("allocate")
    if cnn:
        print(
            f"CNN with allocate: {results[1]['base']['macs'] / cnn['macs']:.1f}x fewer MACs (goal >= 4x)"
        )


if __name__ == "__main__":
    main()
