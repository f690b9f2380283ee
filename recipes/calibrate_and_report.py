"""Wrap a model with PCA layers, calibrate it and report every layer's saturation.

Examples:
    python recipes/calibrate_and_report.py                        # the digits CNN
    python recipes/calibrate_and_report.py --model mypkg.nets:resnet18 \\
        --checkpoint ckpt.pt --data mypkg.data:calibration_loader --threshold 0.99 --out report
"""

import argparse
from pathlib import Path

import pcasurgery as ps
from pcasurgery.recipe_support import add_common_arguments, load_data, load_model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_common_arguments(parser)
    parser.add_argument("--threshold", type=float, default=0.99, help="variance kept per layer")
    parser.add_argument("--out", default="report", help="folder for report.csv and saturation.png")
    args = parser.parse_args(argv)
    model = load_model(args)
    wrapped = ps.calibrate(ps.pca_wrap(model, args.threshold), load_data(args), device=args.device,
                           max_batches=args.max_batches)  # fmt: skip
    table = ps.report(wrapped)
    print(table.to_string(index=False))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "report.csv", index=False)
    ps.plot_saturation(table, out / "saturation.png")
    print(f"wrote {out / 'report.csv'} and {out / 'saturation.png'}")


if __name__ == "__main__":
    main()
