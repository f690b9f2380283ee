"""Wrap a model with PCA layers, calibrate it and report every layer's saturation.

Examples:
    python recipes/calibrate_and_report.py                        # the digits CNN
    python recipes/calibrate_and_report.py --model mypkg.nets:resnet18 \\
        --checkpoint ckpt.pt --data mypkg.data:calibration_loader --threshold 0.99 --out report
"""

from pathlib import Path

import pcasurgery as ps
from pcasurgery.recipe_support import calibrated, recipe_parser


def main(argv=None) -> None:
    parser = recipe_parser(__doc__)
    parser.add_argument("--threshold", type=float, default=0.99, help="variance kept per layer")
    parser.add_argument("--out", default="report", help="folder for report.csv and saturation.png")
    args = parser.parse_args(argv)
    _, _, wrapped = calibrated(args, args.threshold)
    table = ps.report(wrapped)
    print(table.to_string(index=False))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "report.csv", index=False)
    ps.plot_saturation(table, out / "saturation.png")
    print(f"wrote {out / 'report.csv'} and {out / 'saturation.png'}")


if __name__ == "__main__":
    main()
