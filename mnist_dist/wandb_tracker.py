"""The experiment tracker: W&B on the main process (every wandb call is here), silent elsewhere."""

from __future__ import annotations

import contextlib
import netrc
import os
import secrets
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


def wandb_mode(config: TrackingConfig) -> str:
    """``--wandb-mode``, else a non-empty ``WANDB_MODE``, else online with W&B credentials (an API
    key or identity token in the environment, or ``wandb login``'s ``.netrc`` entry)."""
    if mode := config.wandb_mode or os.environ.get("WANDB_MODE"):
        return mode
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "online"
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    with contextlib.suppress(OSError, netrc.NetrcParseError):
        if host is not None and netrc.netrc(path).authenticators(host) is not None:
            return "online"
    return "offline"


def wants_wandb(config: TrackingConfig) -> bool:
    """Whether the run is recorded in W&B at all (the same answer on every rank)."""
    return config.tracker == "wandb" and wandb_mode(config) != "disabled"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


class Tracker:
    """W&B through Accelerate's tracker API when the config asks for it, on the main process
    only (one run per job, huggingface/accelerate#644); no calls at all elsewhere.

    The run id comes from ``run_id``, else the run directory's ``wandb-run-id.txt``, else
    ``WANDB_RUN_ID``, else a new one, always opened with ``resume="allow"``: a resumed or
    requeued job continues its W&B run (Lightning-AI/pytorch-lightning#13524). Records carry
    ``global_step`` and W&B plots against it, not its own ``_step``, which a resumed run cannot
    rewind (wandb/wandb#4482). A W&B failure prints one warning and turns tracking off."""

    def __init__(
        self,
        config: TrackingConfig,
        accelerator: Accelerator,
        layout: RunLayout,
        run_config: dict[str, Any],
        run_id: str | None = None,
    ) -> None:
        self.accelerator, self.config, self.layout = accelerator, config, layout
        self.run_id: str | None = None  # the W&B run id to store in checkpoints
        self.run: Any = None  # the wandb Run while tracking is on
        if not (accelerator.is_main_process and config.tracker == "wandb"):
            return
        if (mode := wandb_mode(config)) == "disabled":
            return
        # W&B would silently fall back to a temporary folder when WANDB_DIR is not writable; a
        # run that vanishes with the node's /tmp is worse than a warning, so check it ourselves.
        self.wandb_dir = Path(os.environ.get("WANDB_DIR") or layout.root)
        with contextlib.suppress(OSError):
            run_id = run_id or layout.wandb_run_id.read_text().strip()
        # A new id: eight lower-case characters, like W&B's own.
        run_id = run_id or os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4)
        try:
            check_writable(self.wandb_dir / WANDB_DIR)
            try:
                self._start(mode, run_id, run_config)
            except Exception as e:
                if mode != "online":
                    raise
                # An unreachable server raises CommError after the init timeout; record offline.
                import wandb

                self.accelerator.trackers = []  # or end_training() would finish a failed start
                self.run, self.run_id = None, None
                wandb.teardown()  # else W&B refuses the same run id: "run ID ... is in use"
                self._start("offline", run_id, run_config)
                say(
                    f"warning: W&B could not start online ({_one_line(e)}); recording offline "
                    f"in {Path(self.run.dir).parent} instead"
                )
        except Exception as e:  # tracking must never end a training run
            self._stop(e)

    def _start(self, mode: str, run_id: str, run_config: dict[str, Any]) -> None:
        # wandb 0.31 rejects an empty WANDB_* variable (job templates export NAME=), even one
        # given to wandb.init: empty is unset. WANDB_MODE is set, so that --wandb-mode wins.
        for name in [k for k, v in os.environ.items() if k.startswith("WANDB_") and v == ""]:
            del os.environ[name]
        os.environ["WANDB_MODE"] = mode
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
            # W&B's banner would break the progress display; we say where the run is ourselves.
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
        self.run_id = self.run.id
        self.layout.wandb_run_id.write_text(self.run.id + "\n")

    def _stop(self, error: BaseException) -> None:
        say(
            f"warning: W&B tracking stopped ({_one_line(error)}); training goes on, "
            "metrics.jsonl and summary.json stay complete"
        )
        self.finish(report=False)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            try:
                faults.point("wandb.log")
                self.accelerator.log({"global_step": step, **metrics})
            except Exception as e:
                self._stop(e)

    def log_final(self, summary: Summary, final: EvalResult, model_path: Path) -> None:
        """Summary figures, confusion matrix, misclassified test images and the model."""
        if self.run is None:
            return
        try:
            import wandb

            figures = summary.to_dict()  # every field is a number or a string
            self.run.summary.update({f"final/{k}": v for k, v in figures.items()})
            # W&B's chart wants one (true, predicted) pair per image; the matrix holds counts.
            counts, classes = np.asarray(final.confusion).ravel(), len(final.confusion)
            confusion = wandb.plot.confusion_matrix(
                y_true=np.repeat(np.arange(counts.size) // classes, counts).tolist(),
                preds=np.repeat(np.arange(counts.size) % classes, counts).tolist(),
                class_names=[str(d) for d in range(classes)],
                title="Test set confusion matrix",
            )
            columns = ["index", "image", "true", "predicted", "p_predicted", "p_true"]
            table = wandb.Table(columns=columns)
            for m in final.misclassified[:MAX_TABLE_ROWS]:
                image, p = wandb.Image(np.asarray(m.image, dtype=np.uint8)), m.probabilities
                table.add_data(
                    m.index, image, m.true_label, m.predicted, p[m.predicted], p[m.true_label]
                )
            charts = {"test/confusion_matrix": confusion, "test/misclassified": table}
            faults.point("wandb.log")
            self.accelerator.log({"global_step": summary.global_step, **charts})
            artifact = wandb.Artifact(f"mnist-cnn-{self.run.id}", type="model", metadata=figures)
            artifact.add_file(str(model_path))
            self.run.log_artifact(artifact, aliases=["latest", "final"])
        except Exception as e:
            self._stop(e)

    def finish(self, report: bool = True) -> None:
        """Finish an active W&B run within ``--wandb-finish-timeout`` (an upload over a dead
        network must not hold the job); ``report``: say where the run is, or warn of a failure.
        Not ``accelerator.end_training()``: that also destroys the process group."""
        run, self.run, errors = self.run, None, []
        self.accelerator.trackers = []
        if run is None:
            return

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


def namespaced(prefix: str, record: dict[str, Any]) -> dict[str, Any]:
    """``train_loss`` -> ``train/loss`` under ``train``; ``global_step`` is the shared x axis."""
    return {
        f"{prefix}/{k.removeprefix(prefix + '_')}": v
        for k, v in record.items()
        if k != "global_step"
    }
