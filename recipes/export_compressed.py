"""Calibrate, compress at a threshold and export the small model to ONNX, checked in onnxruntime.

Examples:
    python recipes/export_compressed.py --threshold 0.98 --out digits_small.onnx
    python recipes/export_compressed.py --model mypkg.nets:Net --checkpoint ckpt.pt \\
        --data mypkg.data:calibration --threshold 0.99 --out small.onnx --save-state small.pt
"""

import torch

import pcasurgery as ps
from pcasurgery._recipes import calibrated, example_input, recipe_parser, writable


def main(argv=None) -> None:
    parser = recipe_parser(__doc__)
    parser.add_argument("--threshold", type=float, default=0.99, help="variance kept per layer")
    parser.add_argument("--out", default="compressed.onnx", help="the ONNX file to write")
    parser.add_argument(
        "--save-state", help="also save the compressed model (torch.save of the module)"
    )
    args = parser.parse_args(argv)
    writable(parser, args.out, folder=False)
    if args.save_state:
        writable(parser, args.save_state, folder=False)
    model, batches, wrapped = calibrated(args, args.threshold)
    small = ps.compress(wrapped.cpu())
    table = small.compression_report
    print(table.to_string(index=False))
    path = ps.export_onnx(small, example_input(batches, 2), args.out)
    print(f"{ps.count_params(model):,} -> {ps.count_params(small):,} parameters; "
          f"wrote {path} (checked in onnxruntime at two batch sizes)")  # fmt: skip
    if args.save_state:
        torch.save(small, args.save_state)
        print(f"wrote {args.save_state}")


if __name__ == "__main__":
    main()
