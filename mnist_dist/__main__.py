"""``mnist-dist``: its commands, and one line on stderr with an exit code for every error."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mnist_dist.cli import build_config, build_parser
from mnist_dist.errors import EXIT_INTERRUPTED, MnistDistError, UsageError


def cmd_train(args: argparse.Namespace) -> None:
    from mnist_dist.train import train

    train(build_config(args))


def cmd_doctor(args: argparse.Namespace) -> None:
    from mnist_dist.doctor import doctor

    doctor(build_config(args), args.write_env)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from mnist_dist.data import ensure_raw_files, eval_batches
    from mnist_dist.distributed import make_accelerator, process_group
    from mnist_dist.evaluate import evaluate
    from mnist_dist.weights import load_model

    data = build_config(args).data
    model = load_model(args.weights)  # before any process group: a bad file fails fast
    accelerator = make_accelerator("no")
    with process_group(accelerator):
        ensure_raw_files(accelerator, data, splits=("test",))  # reads no training file
        world = accelerator.num_processes
        batches = eval_batches(data, world, accelerator.process_index, accelerator.device)
        r = evaluate(accelerator.prepare(model), batches, accelerator)
        summary = {"test_accuracy": r.accuracy, "test_correct": r.correct, "test_total": r.total}
        if accelerator.is_main_process:
            print(
                json.dumps({**summary, "test_loss": r.loss, "world_size": world})
                if args.json
                else f"{args.weights}: test accuracy {r.accuracy:.2%} ({r.correct}/{r.total}), "
                f"loss {r.loss:.4f}, {world} process(es)"
            )


def cmd_predict(args: argparse.Namespace) -> None:
    import torch
    from PIL import Image

    from mnist_dist.data import as_light_on_dark, reference_transform
    from mnist_dist.weights import load_model

    model = load_model(args.weights).eval()
    transform = reference_transform()
    images, inverted = [], []
    for path in args.images:
        try:
            with Image.open(path) as image:
                light_on_dark, was_inverted = as_light_on_dark(image)
        except OSError as e:  # PIL's UnidentifiedImageError is one, without a strerror
            reason = e.strerror or "not a PNG/JPEG image"
            raise UsageError(f"cannot read image {path}: {reason}") from None
        images.append(transform(light_on_dark))
        inverted.append(was_inverted)
    with torch.no_grad():
        probabilities = model(torch.stack(images)).softmax(dim=1)
    for path, p, was_inverted in zip(args.images, probabilities, inverted, strict=True):
        digit, probability = int(p.argmax()), float(p.max())
        if args.json:
            prediction = {"image": path, "digit": digit, "probability": probability}
            print(json.dumps({**prediction, "inverted": was_inverted}))
        else:
            note = ", read as a dark digit on a light background (inverted)" if was_inverted else ""
            print(f"{path}: {digit} (p={probability:.4f}){note}")


def cmd_report(args: argparse.Namespace) -> None:
    from mnist_dist.report import report

    print(report(args.run_dirs, args.plot))
    if args.plot:
        print(f"curves in {args.plot}")


def cmd_download(args: argparse.Namespace) -> None:
    from mnist_dist.data import download_mnist, raw_dir

    data_dir = build_config(args).data.data_dir
    download_mnist(data_dir)
    print(f"MNIST is in {raw_dir(data_dir)} (checksums verified)")


def main(argv: Sequence[str] | None = None) -> int:
    handlers = {  # one per command of build_parser
        "train": cmd_train,
        "doctor": cmd_doctor,
        "evaluate": cmd_evaluate,
        "predict": cmd_predict,
        "report": cmd_report,
        "download": cmd_download,
    }
    try:
        args = build_parser().parse_args(argv)
        handlers[args.command](args)
        return 0
    except MnistDistError as e:
        line, code = f"mnist-dist: {e.label}: {e}", e.exit_code
    except KeyboardInterrupt:
        line, code = "mnist-dist: interrupted", EXIT_INTERRUPTED
    # Under `accelerate launch` every rank hits the same error: print it once per node, and
    # write it where torchelastic's failure summary shows it (TORCHELASTIC_ERROR_FILE, "" when
    # it keeps no logs) instead of its bare "To enable traceback see: ...".
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)
    if path := os.environ.get("TORCHELASTIC_ERROR_FILE"):
        with contextlib.suppress(OSError):  # the line is on stderr already
            Path(path).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
    return code


if __name__ == "__main__":
    sys.exit(main())
