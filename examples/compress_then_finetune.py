"""Compress aggressively, then fine-tune the small model to win the accuracy back.

The compressed model is made of plain torch layers, so it trains like any
model: a few epochs of fine-tuning recover most of what an aggressive
threshold cost, at the compressed size.
"""

import argparse

import torch

import pcasurgery as ps
from pcasurgery._digits import DigitsCNN, accuracy, load_digits_split, train


def main(threshold: float = 0.9, epochs: int = 3) -> dict:
    split = load_digits_split()
    torch.manual_seed(0)
    model = train(DigitsCNN(), split)
    wrapped = ps.calibrate(ps.pca_wrap(model, threshold), split.batches(), progress=False)
    small = ps.compress(wrapped)
    result = {
        "original": accuracy(model, split.x_test, split.y_test),
        "compressed": accuracy(small, split.x_test, split.y_test),
        "params": (ps.count_params(model), ps.count_params(small)),
    }
    train(small, split, epochs=epochs, lr=1e-3)  # plain layers: fine-tune as usual
    result["fine_tuned"] = accuracy(small, split.x_test, split.y_test)
    print(f"original {result['original']:.2%} with {result['params'][0]:,} parameters")
    print(
        f"compressed at {threshold}: {result['compressed']:.2%} with {result['params'][1]:,} parameters"
    )
    print(f"after {epochs} epochs of fine-tuning: {result['fine_tuned']:.2%}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    main(args.threshold, args.epochs)
