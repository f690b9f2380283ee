"""Wrap a model with PCA layers, calibrate it and report every layer's saturation.

Examples:
    python recipes/calibrate_and_report.py                        # the digits CNN
    python recipes/calibrate_and_report.py --model mypkg.nets:resnet18 \\
        --checkpoint ckpt.pt --data mypkg.data:calibration_loader --threshold 0.99 --out report
"""

import pcasurgery as ps
from pcasurgery._recipes import calibrated, recipe_parser, writable


def main(argv=None) -> None:
    parser = recipe_parser(__doc__)
    parser.add_argument("--threshold", type=float, default=0.99, help="variance kept per layer")
    parser.add_argument("--out", default="report", help="folder for report.csv and saturation.png")
    args = parser.parse_args(argv)
    out = writable(parser, args.out, folder=True)
    _, _, wrapped = calibrated(args, args.threshold)
    table = ps.report(wrapped)
    print(table.to_string(index=False))
    table.to_csv(out / "report.csv", index=False)
    ps.plot_saturation(table, out / "saturation.png")
    print(f"wrote {out / 'report.csv'} and {out / 'saturation.png'}")


if __name__ == "__main__":
    main()
