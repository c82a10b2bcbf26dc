"""``mnist-dist`` / ``python -m mnist_dist``: train, doctor, evaluate, predict, report, download.

Bad input of any kind (flags, config files, datasets, weights, images, a launch that formed the
wrong world size) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from mnist_dist.config import DATA_DIR_ENV, SECTIONS, DataConfig, add_config_flags, build_config
from mnist_dist.errors import MnistDistError, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (no usage dump) and exit with exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _add_run_settings(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and a flag per setting of every section."""
    parser.add_argument(
        "--config", metavar="FILE", help="YAML or JSON file with data/optim/train/tracking"
    )
    add_config_flags(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mnist-dist",
        description="Train, evaluate and use the reference MNIST CNN on CPU, GPU, DDP or SLURM.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser(
        "train",
        help="train the reference recipe (plain python or under `accelerate launch`)",
        description="Train. Settings: defaults (the reference recipe) < --config file < flags.",
    )
    _add_run_settings(train)
    train.set_defaults(func=cmd_train)

    doctor = commands.add_parser(
        "doctor",
        help="pre-flight checks for a launch (SLURM layout, processes, port, data, output, W&B)",
        description="Check a launch before it starts: takes the same settings as `train`.",
    )
    doctor.add_argument(
        "--write-env",
        metavar="FILE",
        help="also write the launch plan as shell `export` lines (used by slurm/train.sbatch)",
    )
    _add_run_settings(doctor)
    doctor.set_defaults(func=cmd_doctor)

    data_only = {"data": DataConfig}
    evaluate = commands.add_parser(
        "evaluate", help="test accuracy of saved weights (also under `accelerate launch`)"
    )
    evaluate.add_argument("--weights", required=True, metavar="PATH", help=_WEIGHTS_HELP)
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    add_config_flags(evaluate, data_only)
    evaluate.set_defaults(func=cmd_evaluate)

    predict = commands.add_parser("predict", help="digit and probability for PNG/JPEG images")
    predict.add_argument("--weights", required=True, metavar="PATH", help=_WEIGHTS_HELP)
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    predict.add_argument("--json", action="store_true", help="print one JSON object per image")
    predict.set_defaults(func=cmd_predict)

    report = commands.add_parser(
        "report",
        help="per-epoch table of runs from their metrics.jsonl (no W&B needed), optional PNG",
    )
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    report.add_argument(
        "--plot",
        metavar="PNG",
        help="also draw loss, accuracy and LR curves into this PNG (needs the plot extra)",
    )
    report.set_defaults(func=cmd_report)

    download = commands.add_parser("download", help="fetch MNIST with torchvision")
    download.add_argument(
        "--data-dir",
        default=os.environ.get(DATA_DIR_ENV) or DataConfig().data_dir,
        help=f"where to put MNIST/raw (env {DATA_DIR_ENV}) [default: {DataConfig().data_dir}]",
    )
    download.set_defaults(func=cmd_download)
    return parser


_WEIGHTS_HELP = "model.safetensors from a run, or a torch state_dict (.pth) of the reference"


def cmd_train(args: argparse.Namespace) -> int:
    from mnist_dist.train import train

    train(build_config(args))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from mnist_dist.doctor import doctor

    doctor(build_config(args), args.write_env)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mnist_dist.checkpoint import load_model
    from mnist_dist.data import ensure_raw_files, eval_batches
    from mnist_dist.distributed import make_accelerator
    from mnist_dist.evaluate import evaluate

    data = build_config(args, {"data": SECTIONS["data"]}).data
    model = load_model(args.weights)  # before any process group: a bad file fails fast
    accelerator = make_accelerator("no")
    try:
        ensure_raw_files(accelerator, data, splits=("test",))  # reads no training file
        batches = eval_batches(
            data, accelerator.num_processes, accelerator.process_index, accelerator.device
        )
        result = evaluate(accelerator.prepare(model), batches, accelerator)
        if accelerator.is_main_process:
            if args.json:
                print(
                    json.dumps(
                        {
                            "test_accuracy": result.accuracy,
                            "test_correct": result.correct,
                            "test_total": result.total,
                            "test_loss": result.loss,
                            "world_size": accelerator.num_processes,
                        }
                    )
                )
            else:
                print(
                    f"{args.weights}: test accuracy {result.accuracy:.2%} "
                    f"({result.correct}/{result.total}), loss {result.loss:.4f}, "
                    f"{accelerator.num_processes} process(es)"
                )
    finally:
        accelerator.end_training()
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image, UnidentifiedImageError

    from mnist_dist.checkpoint import load_model
    from mnist_dist.data import reference_transform

    model = load_model(args.weights).eval()
    transform = reference_transform()
    images = []
    for path in args.images:
        try:
            with Image.open(path) as image:
                images.append(transform(image.convert("RGB")))
        except (OSError, UnidentifiedImageError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else "not a PNG/JPEG image"
            raise UsageError(f"cannot read image {path}: {reason}") from None
    with torch.no_grad():
        probabilities = model(torch.stack(images)).softmax(dim=1)
    for path, p in zip(args.images, probabilities, strict=True):
        digit = int(p.argmax())
        if args.json:
            print(json.dumps({"image": path, "digit": digit, "probability": float(p[digit])}))
        else:
            print(f"{path}: {digit} (p={float(p[digit]):.4f})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mnist_dist.report import report

    print(report(args.run_dirs, args.plot))
    if args.plot:
        print(f"curves in {args.plot}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from mnist_dist.data import download_mnist, raw_dir

    download_mnist(args.data_dir)
    print(f"MNIST is in {raw_dir(args.data_dir)} (checksums verified)")
    return 0


def _report(error: MnistDistError) -> None:
    # Under `accelerate launch` every rank hits the same error: print it once per node.
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"mnist-dist: {error.label}: {error}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except MnistDistError as e:
        _report(e)
        return e.exit_code
    except KeyboardInterrupt:
        print("mnist-dist: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
