"""Sweep variance thresholds against your metric and print the size of the compressed model.

Examples:
    python recipes/sweep_thresholds.py                                   # the digits CNN
    python recipes/sweep_thresholds.py --model mypkg.nets:Net --checkpoint ckpt.pt \\
        --data mypkg.data:calibration --metric mypkg.eval:accuracy --thresholds 0.9 0.95 0.99
"""

import argparse

import pcasurgery as ps
from pcasurgery.recipe_support import add_common_arguments, load_data, load_metric, load_model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_common_arguments(parser, metric=True)
    parser.add_argument(
        "--thresholds", type=float, nargs="+", default=[0.9, 0.95, 0.97, 0.98, 0.99, 0.999]
    )
    parser.add_argument("--out", default="sweep.csv", help="CSV file for the table")
    args = parser.parse_args(argv)
    model = load_model(args)
    batches = load_data(args)
    wrapped = ps.calibrate(
        ps.pca_wrap(model, 0.99), batches, device=args.device, max_batches=args.max_batches
    )
    evaluate = load_metric(args)
    first = next(iter(batches))
    example = first[0] if isinstance(first, (tuple, list)) else first
    table = ps.sweep(wrapped, args.thresholds, evaluate, example_inputs=example[:1])
    baseline = evaluate(model)
    print(f"original model: metric {baseline:.4g}, {ps.count_params(model):,} parameters")
    print(table.to_string(index=False))
    table.to_csv(args.out, index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
