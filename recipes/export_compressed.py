"""Calibrate, compress at a threshold and export the small model to ONNX, checked in onnxruntime.

Examples:
    python recipes/export_compressed.py --threshold 0.98 --out digits_small.onnx
    python recipes/export_compressed.py --model mypkg.nets:Net --checkpoint ckpt.pt \\
        --data mypkg.data:calibration --threshold 0.99 --out small.onnx --save-state small.pt
"""

import argparse

import torch

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
    parser.add_argument("--out", default="compressed.onnx", help="the ONNX file to write")
    parser.add_argument(
        "--save-state", help="also save the compressed model (torch.save of the module)"
    )
    args = parser.parse_args(argv)
    model = load_model(args)
    batches = load_data(args)
    wrapped = ps.calibrate(ps.pca_wrap(model, args.threshold), batches, device=args.device,
                           max_batches=args.max_batches)  # fmt: skip
    small, table = ps.compress(wrapped.cpu(), report=True)
    print(table.to_string(index=False))
    first = next(iter(batches))
    example = (first[0] if isinstance(first, (tuple, list)) else first)[:2].cpu()
    path = ps.export_onnx(small, example, args.out)
    print(f"{ps.count_params(model):,} -> {ps.count_params(small):,} parameters; "
          f"wrote {path} (checked in onnxruntime at two batch sizes)")  # fmt: skip
    if args.save_state:
        torch.save(small, args.save_state)
        print(f"wrote {args.save_state}")


if __name__ == "__main__":
    main()
