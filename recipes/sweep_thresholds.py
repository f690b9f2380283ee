"""Sweep variance thresholds against your metric and print the size of the compressed model.

Examples:
    python recipes/sweep_thresholds.py                                   # the digits CNN
    python recipes/sweep_thresholds.py --model mypkg.nets:Net --checkpoint ckpt.pt \\
        --data mypkg.data:calibration --metric mypkg.eval:accuracy --thresholds 0.9 0.95 0.99
"""

import pcasurgery as ps
from pcasurgery._recipes import (
    calibrated,
    example_input,
    load_metric,
    recipe_parser,
    writable,
)


def main(argv=None) -> None:
    parser = recipe_parser(__doc__, metric=True)
    parser.add_argument(
        "--thresholds", type=float, nargs="+", default=[0.9, 0.95, 0.97, 0.98, 0.99, 0.999]
    )
    parser.add_argument("--out", default="sweep.csv", help="CSV file for the table")
    args = parser.parse_args(argv)
    writable(parser, args.out, folder=False)
    model, batches, wrapped = calibrated(args, 0.99)
    evaluate = load_metric(args)
    table = ps.sweep(wrapped, args.thresholds, evaluate, example_inputs=example_input(batches))
    print(f"original model: metric {evaluate(model):.4g}, {ps.count_params(model):,} parameters")
    print(table.to_string(index=False))
    table.to_csv(args.out, index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
