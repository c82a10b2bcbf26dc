"""``mnist-dist`` / ``python -m mnist_dist``: train, doctor, evaluate, predict, report, download.

Bad input of any kind (flags, config files, datasets, weights, images, a launch that formed the
wrong world size) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from mnist_dist.config import DataConfig, add_config_flags, build_config
from mnist_dist.errors import MnistDistError, UsageError, leave_for_launcher


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (no usage dump) that point to the sub-command's own
    help, exit with exit code 2, and a flag is never taken for a longer one it is a prefix of."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # argparse would take `--epoch 1` as `--epochs 1` without a word; a typo in a flag must
        # be an error (with a suggestion), and a flag added later must not change what an old
        # abbreviation meant.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # A sub-command's parser receives every argument after the sub-command's name, so
        # anything it does not know is unknown for good: report it here, where the help to point
        # to is the sub-command's, not the top-level parser's.
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}{self._suggestion(extras)}")
        return parsed, extras

    def _suggestion(self, extras: list[str]) -> str:
        """A "did you mean --epochs?" for the first unknown flag close to known ones: the flags
        it is a prefix of (what argparse would have guessed), else the nearest by spelling."""
        flags = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
        for extra in extras:
            if extra.startswith("--") and len(extra) > 2:
                name = extra.split("=", 1)[0]
                close = [f for f in flags if f.startswith(name)] or difflib.get_close_matches(
                    name, flags, n=1
                )
                if len(close) == 1:
                    return f"; did you mean {close[0]}?"
                if close:
                    return f"; did you mean one of {', '.join(close)}?"
        return ""


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

    evaluate = commands.add_parser(
        "evaluate", help="test accuracy of saved weights (also under `accelerate launch`)"
    )
    evaluate.add_argument("--weights", required=True, metavar="PATH", help=_WEIGHTS_HELP)
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    add_config_flags(evaluate, _DATA, only=EVALUATE_SETTINGS)
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
    add_config_flags(download, _DATA, only={"data_dir"})
    download.set_defaults(func=cmd_download)
    return parser


_WEIGHTS_HELP = "model.safetensors from a run, or a torch state_dict (.pth) of the reference"
_DATA: dict[str, type] = {"data": DataConfig}
# The data settings `evaluate` uses: the test split only, so no training-set flags.
EVALUATE_SETTINGS = {
    "data_dir",
    "loader",
    "num_workers",
    "max_eval_samples",
    "eval_batch_size",
    "download",
}


def cmd_train(args: argparse.Namespace) -> int:
    from mnist_dist.train import train

    train(build_config(args))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from mnist_dist.doctor import doctor

    doctor(build_config(args), args.write_env)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mnist_dist.data import ensure_raw_files, eval_batches
    from mnist_dist.distributed import make_accelerator
    from mnist_dist.evaluate import evaluate
    from mnist_dist.weights import load_model

    data = build_config(args, _DATA).data
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

    from mnist_dist.data import reference_transform
    from mnist_dist.weights import load_model

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

    data_dir = build_config(args, _DATA).data.data_dir
    download_mnist(data_dir)
    print(f"MNIST is in {raw_dir(data_dir)} (checksums verified)")
    return 0


def _report(line: str) -> None:
    # Under `accelerate launch` every rank hits the same error: print it once per node, and have
    # the launcher repeat it in its failure summary.
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)
    leave_for_launcher(line)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except MnistDistError as e:
        _report(f"mnist-dist: {e.label}: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        _report("mnist-dist: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
