"""Wrap a model before fine-tuning and watch its saturation move.

PCA layers behave as the seed library's do: in training mode they pass the
activations through and collect their statistics; in eval mode they project
onto the eigendirections of the last training epoch. Here a digits CNN that
saw only a little training is wrapped and trained further: each epoch's eval
pass reports how many directions every layer uses, and the accuracy with and
without the projection.
"""

import argparse

import torch

import pcasurgery as ps
from pcasurgery._digits import DigitsCNN, accuracy, load_digits_split, train


def main(epochs: int = 5, threshold: float = 0.99) -> list[dict]:
    split = load_digits_split()
    torch.manual_seed(0)
    model = train(DigitsCNN(), split, epochs=1)  # a barely trained starting point
    wrapped = ps.pca_wrap(model, threshold)
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=2e-3)
    history = []
    for epoch in range(epochs):
        wrapped.train()  # PCA layers: identity + statistics (a fresh covariance each epoch)
        for x, y in split.batches(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(wrapped(x), y).backward()
            optimizer.step()
        wrapped.eval()  # PCA layers: project onto this epoch's eigendirections
        projected = accuracy(wrapped, split.x_test, split.y_test)
        table = ps.report(wrapped)
        ps.set_threshold(wrapped, 1.0)
        plain = accuracy(wrapped, split.x_test, split.y_test)
        ps.set_threshold(wrapped, threshold)
        row = {"epoch": epoch, "accuracy": plain, "projected": projected,
               **{f"k {name}": k for name, k in zip(table["layer"], table["idim"], strict=True)}}  # fmt: skip
        history.append(row)
        ks = ", ".join(
            f"{name} {k}/{w}"
            for name, k, w in zip(table["layer"], table["idim"], table["width"], strict=True)
        )
        print(
            f"epoch {epoch}: accuracy {plain:.2%}, projected at {threshold}: {projected:.2%}; k: {ks}"
        )
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.99)
    args = parser.parse_args()
    main(args.epochs, args.threshold)
