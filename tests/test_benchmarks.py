"""The benchmark scripts run end to end (on tiny data: the figures here mean nothing, the
shape of the output does) so they do not rot between measurements."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, _env, make_tiny_mnist

from mnist_dist.config import DataConfig, OptimConfig, TrainConfig
from mnist_dist.data import Sharding
from mnist_dist.model import MnistCNN

GPU_CHECK_PARTS = ["env", "evaluate", "recipe", "determinism", "throughput", "profile", "pytest"]


def run_script(*args: str, env: dict[str, str] | None = None, timeout: int = 600):
    """A benchmark script in a new process, on the CPU like every process the tests start."""
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env=_env(env),
    )  # fmt: skip


def without_module(module: str, folder: Path) -> dict[str, str]:
    """Environment whose processes behave as if ``module`` were not installed: importing it
    fails and ``importlib.util.find_spec`` returns None, which is how accelerate checks."""
    folder.mkdir(parents=True)
    (folder / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n")
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path}


def load_benchmark(name: str):
    """A script of benchmarks/ (a folder of scripts, not a package) as a module."""
    if str(ROOT / "benchmarks") not in sys.path:  # as for a script: its siblings importable
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_throughput_compares_every_row_to_a_and_b(tmp_path):
    data = make_tiny_mnist(tmp_path / "data", n_train=512)
    out = tmp_path / "t.json"
    proc = run_script(
        "benchmarks/throughput.py", "--data-dir", str(data), "--epochs", "2",
        "--rows", "plain,plain-tensor,captured,tensor,ddp2", "--json-out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Row (c) needs CUDA: one line says so, and the others run.
    [line] = [x for x in proc.stdout.splitlines() if "not available" in x]
    assert line == (
        "(c) plain PyTorch, step in one CUDA graph: not available here: "
        "a CUDA graph needs a CUDA GPU and none is visible"
    )
    saved = json.loads(out.read_text())
    assert saved["unavailable"] == {"captured": line.rsplit(": ", 1)[1]}
    assert saved["failed"] == {}
    rows = {r["row"]: r for r in saved["rows"]}
    assert list(rows) == ["plain", "plain-tensor", "tensor", "ddp2"]
    assert all(row["ratio_to_captured"] is None for row in rows.values())
    assert "vs (c)" not in proc.stdout
    assert rows["plain"]["ratio_to_plain"] == 1.0
    assert rows["plain-tensor"]["ratio_to_plain_tensor"] == 1.0
    for row in rows.values():
        assert row["images_per_second"] > 0 and row["test_accuracy"] > 0.1
    assert rows["ddp2"]["runs"][0]["extra"]["world_size"] == 2
    # Every row ran in a process of its own, (a) and (b) included.
    assert all(row["process_seconds"] > 0 for row in rows.values())
    # (b) and mnist-dist train on the same batches with the same options: same accuracy.
    assert rows["plain-tensor"]["test_accuracy"] == rows["tensor"]["test_accuracy"]
    assert "vs (b)" in proc.stdout


def test_throughput_repeats_rotate_the_row_order(tmp_path):
    data = make_tiny_mnist(tmp_path / "data", n_train=256)
    out = tmp_path / "t.json"
    proc = run_script(
        "benchmarks/throughput.py", "--data-dir", str(data), "--epochs", "1", "--repeats", "2",
        "--rows", "plain-tensor,tensor", "--json-out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    started = [line.split(" ...")[0] for line in proc.stdout.splitlines() if " ..." in line]
    assert started == [
        "[1/2] (b) plain PyTorch, device tensors",
        "[1/2] mnist-dist (default)",
        "[2/2] mnist-dist (default)",
        "[2/2] (b) plain PyTorch, device tensors",
    ]
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert [len(r["runs"]) for r in rows.values()] == [2, 2]
    # Paired by repeat, whatever the order: each ratio to (b) is that repeat's own.
    tensor, loop = rows["tensor"]["runs"], rows["plain-tensor"]["runs"]
    ratios = [
        t["images_per_second"] / b["images_per_second"] for t, b in zip(tensor, loop, strict=True)
    ]
    assert rows["tensor"]["ratio_to_plain_tensor_range"] == [min(ratios), max(ratios)]


def test_profile_step_counts_ops_per_step(tmp_path):
    data = make_tiny_mnist(tmp_path / "data", n_train=512)
    proc = run_script(
        "benchmarks/profile_step.py", "--data-dir", str(data), "--steps", "5", "--warmup", "2",
        "--versus-plain", "3", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 5 and summary["device"] == "cpu"
    assert summary["cuda_kernels_per_step"] is None and summary["gpu_kernel_ms_per_step"] is None
    assert summary["host_ms_per_step"] > 0
    assert 10 < summary["top_level_ops_per_step"] <= summary["aten_ops_per_step"]
    # 3 rounds of 5 steps each way: more steps than the 8 batches of an epoch of 512 images,
    # so both step functions run on into later epochs.
    assert summary["versus_plain_rounds"] == 3
    assert summary["plain_ms_per_step"] > 0 and summary["harness_ms_per_step"] > 0
    low, high = summary["harness_speed_vs_plain_range"]
    assert low <= summary["harness_speed_vs_plain"] <= high


def test_profile_step_counts_the_captured_steps_ops_against_row_c():
    proc = run_script("benchmarks/profile_step.py", "--captured-ops", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 10 < counts["row_c_top_level_ops"] <= counts["row_c_aten_ops"]
    # What the captured step adds to row (c) is the epoch figures (loss and accuracy, written
    # at the step's row): a few ops, never an indexed write or a sort.
    extra = counts["captured_minus_row_c"]
    assert counts["captured_top_level_ops"] <= counts["row_c_top_level_ops"] + 6, extra
    assert counts["captured_short_batch_top_level_ops"] <= counts["row_c_top_level_ops"] + 6
    assert not {"aten::index_copy_", "aten::index_put_", "aten::sort", "aten::mul"} & set(extra)


def test_gpu_check_judges_checkpointing_and_resume_against_the_uninterrupted_run():
    gpu_check = load_benchmark("gpu_check")
    figures = {
        "flags": [], "epochs": 2, "train_images": 16000, "step_engine": "cuda-graph",
        "step_engines": ["cuda-graph"], "deterministic": True, "resumed_engine": "cuda-graph",
        "resumed_from": "epoch-002-step-000050", "images_per_second": 1.0,
        "rerun_identical": True, "rerun_max_abs_difference": 0.0,
        "checkpointing_identical": False, "checkpointing_max_abs_difference": 3e-8,
        "resume_identical": True, "resume_max_abs_difference": 0.0,
    }  # fmt: skip
    nondet = {**figures, "step_engines": ["cuda-graph", "eager"], "deterministic": False}

    def verdicts(smoke: bool) -> dict[str, str]:
        items = [
            {"id": "determinism:on", "status": "ok", "reason": None, "figures": figures},
            {"id": "determinism:off", "status": "ok", "reason": None, "figures": nondet},
        ]
        report = {"smoke": smoke, "parts": {"determinism": {"status": "ok", "reason": None,
                                                            "items": items}}}  # fmt: skip
        lines = gpu_check.determinism_lines(gpu_check.Findings(report))
        return {line.what: line.verdict for line in lines}

    got = verdicts(smoke=False)
    assert got == {
        "deterministic: rerun": "met",
        "deterministic: checkpointing mid-epoch": "NOT MET",
        "deterministic: resume from epoch-002-step-000050": "met",
        # Without determinism no identity is promised, but every run must capture.
        "--no-deterministic: rerun": "NOT MET",
        "--no-deterministic: checkpointing mid-epoch": "NOT MET",
        "--no-deterministic: resume from epoch-002-step-000050": "NOT MET",
    }
    assert set(verdicts(smoke=True).values()) == {"not measured (smoke run)"}


def test_row_c_step_pads_the_short_last_batch_to_the_mean_over_its_images():
    # Row (c)'s step, run eagerly on the CPU: a graph replays exactly these ops. 96 images are a
    # full batch of 64 and a short one of 32, padded to 64 with image 0 at weight 0; each
    # step's gradient must be that of the plain mean loss over its real images.
    baselines = load_benchmark("baselines")
    torch.manual_seed(0)
    images, labels = torch.rand(96, 1, 28, 28), torch.randint(0, 10, (96,))
    model = MnistCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # steps, but keeps the weights
    step = baselines.CapturableStep(model, optimizer, images, labels, batch_size=64)
    order = torch.randperm(96)
    step.load_epoch(order)
    assert step.weights[1, 32:].eq(0).all() and step.indices[1, 32:].eq(0).all()
    for batch in order.split(64):
        optimizer.zero_grad(set_to_none=True)
        step()
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images[batch]), labels[batch]).backward()
        for got, expected in zip(grads, (p.grad for p in model.parameters()), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert step.step_index.item() == 2


def test_row_a_writes_out_the_recipe_that_mnist_dist_defaults_to():
    # Row (a) spells the reference recipe out as its author did, on purpose not read from
    # mnist-dist; mnist-dist's defaults are that recipe, so a change to either shows here.
    baselines = load_benchmark("baselines")
    train, optim = TrainConfig(), OptimConfig()
    defaults = baselines.ReferenceRecipe(
        seed=train.seed,
        batch_size=train.global_batch_size,
        eval_batch_size=DataConfig().eval_batch_size,
        lr=optim.lr,
        lr_milestones=optim.lr_milestones,
        lr_gamma=optim.lr_gamma,
    )
    assert defaults == baselines.REFERENCE


def test_rows_b_and_c_shuffle_each_epoch_as_mnist_dist_does():
    baselines = load_benchmark("baselines")
    sharding = Sharding(100, 64, world_size=1, rank=0, seed=TrainConfig().seed)
    for epoch in (1, 2, 7):
        assert torch.equal(baselines.epoch_order(100, epoch), sharding.permutation(epoch))


@pytest.mark.slow  # about 30 processes, each importing torch: minutes
def test_gpu_check_smoke_runs_every_part_on_the_cpu_without_wandb(tmp_path, reference_weights):
    # The GPU check's own code paths, on the CPU with tiny settings, with wandb made
    # unimportable as on a GPU machine that installed the project --no-deps.
    data = make_tiny_mnist(tmp_path / "data", n_train=320)
    out = tmp_path / "check.json"
    proc = run_script(
        "benchmarks/gpu_check.py", "--smoke", "--data-dir", str(data),
        "--reference-weights", str(reference_weights), "--out", str(out),
        env=without_module("wandb", tmp_path / "no-wandb"), timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] is True and list(report["parts"]) == GPU_CHECK_PARTS
    assert {name: p["status"] for name, p in report["parts"].items()} == dict.fromkeys(
        GPU_CHECK_PARTS, "ok"
    ), proc.stderr[-3000:]
    items = {i["id"]: i for p in report["parts"].values() for i in p["items"]}
    figures = {k: i["figures"] for k, i in items.items()}
    failed = {k: i["reason"] for k, i in items.items() if i["status"] == "failed"}

    assert figures["env"]["gpu"] is None and figures["env"]["wandb"] is None
    assert figures["evaluate"]["device"] == "cpu" and figures["evaluate"]["test_total"] == 128
    # Every run of the recipe ran on the CPU's eager engine, except fp16: refused without a
    # GPU, recorded with mnist-dist's one line, and the check went on.
    assert failed.pop("recipe:fp16").startswith("mnist-dist: error: --mixed-precision fp16")
    for run in ("fp32", "bf16", "eager-fp32"):
        assert figures[f"recipe:{run}"]["step_engine"] == "eager"
        assert figures[f"recipe:{run}"]["train_images"] == 256
    # Deterministic on the CPU, with or without the flag: rerun and mid-epoch resume agree.
    for mode in ("on", "off"):
        d = figures[f"determinism:{mode}"]
        assert d["rerun_identical"] and d["resume_identical"] and d["checkpointing_identical"]
        assert d["resumed_from"] == "epoch-002-step-000002"  # global step 7, 5 steps per epoch
    assert figures["determinism:on"]["deterministic"] is True
    assert figures["determinism:off"]["deterministic"] is False
    # Row (c) is the one throughput row a CPU cannot run.
    assert "CUDA GPU" in failed.pop("throughput:captured")
    assert figures["throughput:tensor"]["ratio_to_plain"] > 0
    assert figures["profile"]["host_ms_per_step"] > 0
    assert figures["pytest"]["passed"] == 0 and figures["pytest"]["failed"] == 0
    assert figures["pytest"]["skipped"] >= 5
    assert figures["pytest"]["skip_reasons"] == ["needs a CUDA GPU and none is visible"]
    assert failed == {}

    # One table; in a smoke run no target is judged, met or not.
    assert proc.stdout.count("verdict") == 1
    verdicts = [line["verdict"] for line in report["table"] if line["target"] != "-"]
    assert len(verdicts) >= 10
    assert all(v == "not measured (smoke run)" for v in verdicts)
