"""The experiment tracker: W&B on the main process (every wandb call is here), silent elsewhere."""

from __future__ import annotations

import contextlib
import netrc
import os
import secrets
import string
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from accelerate import Accelerator

from mnist_dist import faults
from mnist_dist.config import TrackingConfig
from mnist_dist.distributed import say
from mnist_dist.evaluate import EvalResult
from mnist_dist.layout import WANDB_DIR, RunLayout
from mnist_dist.records import Summary
from mnist_dist.rundir import check_writable

MAX_TABLE_ROWS = 100  # misclassified test images sent to W&B at the end of a run


class Tracker:
    """What the training loop needs from an experiment tracker. This one tracks nothing:
    ``--tracker none``, a disabled mode and every non-main rank."""

    run_id: str | None = None  # the W&B run id to store in checkpoints

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_final(self, summary: Summary, final: EvalResult, model_path: Path) -> None:
        pass

    def finish(self) -> None:
        pass


def has_wandb_credentials() -> bool:
    """Whether W&B would find an API key (``WANDB_API_KEY``, an identity token file, or the
    ``.netrc`` entry of ``wandb login``), without reading it."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return host is not None and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(config: TrackingConfig) -> str:
    """``--wandb-mode``, else a non-empty ``WANDB_MODE``, else online with credentials and
    offline without."""
    return (
        config.wandb_mode
        or os.environ.get("WANDB_MODE")
        or ("online" if has_wandb_credentials() else "offline")
    )


def wants_wandb(config: TrackingConfig) -> bool:
    """Whether the run is recorded in W&B at all (the same answer on every rank)."""
    return config.tracker == "wandb" and wandb_mode(config) != "disabled"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


class WandbTracker(Tracker):
    """W&B through Accelerate's tracker API, on the main process only (one run per job,
    huggingface/accelerate#644).

    The run id comes from ``run_id``, else the run directory's ``wandb-run-id.txt``, else
    ``WANDB_RUN_ID``, else a new one, always opened with ``resume="allow"``: a resumed or
    requeued job continues its W&B run (Lightning-AI/pytorch-lightning#13524). Records carry
    ``global_step`` and W&B plots against it, not its own ``_step``, which a resumed run cannot
    rewind (wandb/wandb#4482). A W&B failure prints one warning and turns tracking off.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        config: TrackingConfig,
        layout: RunLayout,
        run_config: dict[str, Any],
        run_id: str | None = None,
    ) -> None:
        self.accelerator, self.config, self.layout = accelerator, config, layout
        self.active, self.run_id = False, None
        self.run: Any = None  # the wandb Run, once started
        # W&B would silently fall back to a temporary folder when WANDB_DIR is not writable; a
        # run that vanishes with the node's /tmp is worse than a warning, so check it ourselves.
        self.wandb_dir = Path(os.environ.get("WANDB_DIR") or layout.root)
        with contextlib.suppress(OSError):
            run_id = run_id or layout.wandb_run_id.read_text().strip()
        run_id = run_id or os.environ.get("WANDB_RUN_ID")
        mode = wandb_mode(config)
        try:
            check_writable(self.wandb_dir / WANDB_DIR)
            run_id = run_id or _new_run_id()
            try:
                self._start(mode, run_id, run_config)
            except Exception as e:
                if mode != "online":
                    raise
                # An unreachable server raises CommError after the init timeout; record offline.
                self._abandon()
                self._start("offline", run_id, run_config)
                say(
                    f"warning: W&B could not start online ({_one_line(e)}); recording offline "
                    f"in {Path(self.run.dir).parent} instead"
                )
        except Exception as e:  # tracking must never end a training run
            self._stop(e)

    def _start(self, mode: str, run_id: str, run_config: dict[str, Any]) -> None:
        _prepare_wandb_environ(mode)
        import wandb

        c = self.config
        quiet = not any(os.environ.get(k) for k in ("WANDB_SILENT", "WANDB_QUIET"))
        init_kwargs = {
            "id": run_id,
            "resume": "allow",
            "dir": str(self.wandb_dir),
            "mode": mode,
            "entity": c.wandb_entity,
            "name": c.run_name,
            "group": c.wandb_group,
            "tags": list(c.wandb_tags) or None,
            # W&B's own banner would interleave with the progress display; we print the run's
            # place (URL or `wandb sync` command) ourselves.
            "settings": wandb.Settings(silent=True) if quiet else None,
        }
        self.accelerator.init_trackers(
            project_name=c.wandb_project,
            config=run_config,
            init_kwargs={"wandb": {k: v for k, v in init_kwargs.items() if v is not None}},
        )
        self.run = self.accelerator.get_tracker("wandb", unwrap=True)
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")
        self.active, self.run_id = True, self.run.id
        self.layout.wandb_run_id.write_text(self.run.id + "\n")

    def _abandon(self) -> None:
        """Forget a run that failed to start, so that another can start in this process."""
        import wandb

        self.accelerator.trackers = []  # or end_training() would finish a run that never began
        self.run = None
        wandb.teardown()  # else W&B refuses the same run id: "run ID ... is in use"

    def _stop(self, error: BaseException) -> None:
        """Turn tracking off for the rest of the run with one warning."""
        was_active, self.active = self.active, False
        if self.run is None:
            self.run_id = None  # nothing was recorded under it
        say(
            f"warning: W&B tracking stopped ({_one_line(error)}); training goes on, "
            "metrics.jsonl and summary.json stay complete"
        )
        if was_active:
            self._finish_run(report=False)
        self.accelerator.trackers = []

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.active:
            try:
                faults.point("wandb.log")
                self.accelerator.log({"global_step": step, **metrics})
            except Exception as e:
                self._stop(e)

    def log_final(self, summary: Summary, final: EvalResult, model_path: Path) -> None:
        """Summary figures, confusion matrix, misclassified test images and the model."""
        if not self.active:
            return
        try:
            import wandb

            figures = {
                k: v for k, v in summary.to_dict().items() if isinstance(v, (int, float, str))
            }
            self.run.summary.update({f"final/{k}": v for k, v in figures.items()})
            faults.point("wandb.log")
            self.accelerator.log(
                {"global_step": summary.global_step, **_final_charts(wandb, final)}
            )
            artifact = wandb.Artifact(f"mnist-cnn-{self.run.id}", type="model", metadata=figures)
            artifact.add_file(str(model_path))
            self.run.log_artifact(artifact, aliases=["latest", "final"])
        except Exception as e:
            self._stop(e)

    def finish(self) -> None:
        # Not accelerator.end_training(): that also destroys the process group, which every
        # rank does at the very end of a run.
        if self.active:
            self.active = False
            self._finish_run(report=True)
        self.accelerator.trackers = []

    def _finish_run(self, report: bool) -> None:
        """Finish the W&B run, waiting at most ``--wandb-finish-timeout`` (an upload over a dead
        network must not hold the job; an unfinished run can hang the job at exit)."""
        run, errors = self.run, []

        def target() -> None:
            try:
                faults.point("wandb.finish")
                run.finish()
            except BaseException as e:
                errors.append(e)

        worker = threading.Thread(target=target, name="wandb-finish", daemon=True)
        worker.start()
        worker.join(self.config.wandb_finish_timeout)
        place = Path(run.dir).parent
        if worker.is_alive():
            say(
                f"warning: W&B did not finish within {self.config.wandb_finish_timeout:g}s; "
                f"its files are in {place} (`wandb sync {place}`)"
            )
        elif errors and report:
            self._stop(errors[0])
        elif report and run.offline:
            say(f"W&B run {run.id} recorded offline; upload it with: wandb sync {place}")
        elif report:
            say(f"W&B run {run.id}: {run.url}")


def _final_charts(wandb: Any, final: EvalResult) -> dict[str, Any]:
    """The test set's confusion matrix and a table of misclassified images, as W&B objects."""
    # W&B's chart wants one (true, predicted) pair per image; the matrix holds the counts.
    pairs = [
        (true, predicted)
        for true, row in enumerate(final.confusion)
        for predicted, count in enumerate(row)
        for _ in range(count)
    ]
    table = wandb.Table(columns=["index", "image", "true", "predicted", "p_predicted", "p_true"])
    for m in final.misclassified[:MAX_TABLE_ROWS]:
        table.add_data(
            m.index,
            wandb.Image(np.asarray(m.image, dtype=np.uint8)),
            m.true_label,
            m.predicted,
            m.probabilities[m.predicted],
            m.probabilities[m.true_label],
        )
    return {
        "test/confusion_matrix": wandb.plot.confusion_matrix(
            y_true=[t for t, _ in pairs],
            preds=[p for _, p in pairs],
            class_names=[str(d) for d in range(len(final.confusion))],
            title="Test set confusion matrix",
        ),
        "test/misclassified": table,
    }


def _prepare_wandb_environ(mode: str) -> None:
    """Make the environment say what this run decided, before W&B reads it. wandb validates
    every ``WANDB_*`` variable itself, also one passed to ``wandb.init``: with wandb 0.31 an
    empty one (job templates often export ``NAME=``) fails validation and the run never
    starts. An empty variable counts as unset, so it is removed; ``WANDB_MODE`` is set to the
    resolved mode, so that ``--wandb-mode`` wins over an invalid value there."""
    for name in [k for k, v in os.environ.items() if k.startswith("WANDB_") and v == ""]:
        del os.environ[name]
    os.environ["WANDB_MODE"] = mode


def _new_run_id() -> str:
    """Eight random base-36 characters, the shape of W&B's own run ids."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def make_tracker(
    config: TrackingConfig,
    accelerator: Accelerator,
    layout: RunLayout,
    run_config: dict[str, Any],
    run_id: str | None = None,
) -> Tracker:
    """W&B on the main process when the config asks for it and its mode is not disabled;
    otherwise a tracker that makes no calls at all. ``run_id`` continues that W&B run."""
    if wants_wandb(config) and accelerator.is_main_process:
        return WandbTracker(accelerator, config, layout, run_config, run_id=run_id)
    return Tracker()


def namespaced(prefix: str, record: dict[str, Any]) -> dict[str, Any]:
    """``train_loss`` -> ``train/loss`` under ``train``; ``global_step`` is the shared x axis."""
    return {
        f"{prefix}/{k.removeprefix(prefix + '_')}": v
        for k, v in record.items()
        if k != "global_step"
    }
