"""Training-time tracking cost: a tracked training step relative to an untracked one.

The VGG-style CNN of bench_calibration.py (batch 64, 32x32, two CPU threads);
one step is forward + backward + SGD. Every conv and linear layer is tracked
(channelwise, stat ``lsat``). Ours and the seed library's (delve 0.1.50, when
importable, see bench_calibration.py) are measured in one run, each timing
paired with an untracked step just before it; the median paired ratio is
reported.

Usage: python benchmarks/bench_tracking.py [--repeats 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from bench_calibration import vgg

from pcasurgery import CheckLayerSat


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="training steps per timing")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    folder = tempfile.mkdtemp()

    def make():
        torch.manual_seed(0)
        model = vgg().train()
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def steps(model, optimizer):
        def run():
            for _ in range(args.steps):
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()

        return run

    plain = steps(*make())
    model, optimizer = make()
    ours_tracker = CheckLayerSat(f"{folder}/ours", "csv", model, device="cpu")
    runs = {"ours": steps(model, optimizer)}
    try:
        from delve import SaturationTracker as SeedCheckLayerSat  # 0.1.50's exported name

        seed_model, seed_optimizer = make()
        seed_tracker = SeedCheckLayerSat(f"{folder}/seed", "csv", seed_model, device="cpu")
        runs["seed"] = steps(seed_model, seed_optimizer)
    except ImportError:
        seed_tracker = None
        print("delve is not importable: the seed's ratio is skipped (see bench_calibration.py)")

    plain()
    for fn in runs.values():
        fn()
    paired: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            plain()
            t1 = time.perf_counter()
            fn()
            t2 = time.perf_counter()
            paired[name].append((t2 - t1) / (t1 - t0))
        ours_tracker.add_saturations()  # each epoch ends with the stats, as in training
        if seed_tracker is not None:
            seed_tracker.add_saturations()
    ratios = {name: statistics.median(r) for name, r in paired.items()}
    print(f"VGG-style CNN training step (forward + backward + SGD), batch 64, 32x32, {args.threads} threads, "
          f"{args.repeats} paired repeats of {args.steps} steps")  # fmt: skip
    for name, r in ratios.items():
        print(f"{name:5s} tracked step: {r:.3f}x the untracked step")
    verdict = "meets" if ratios["ours"] <= 1.15 else "MISSES"
    print(f"ours: {ratios['ours']:.3f}x, {verdict} the goal of <= 1.15x")
    return ratios


if __name__ == "__main__":
    main()
