"""scripts/gpu_check.sh --dry-run: the GPU check, rehearsed end to end on the CPU so that it cannot rot."""
import json
import math
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NO_GPU = "not measured (no GPU)"


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_the_report(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=400)
    report = json.loads((tmp_path / "results.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["environment", "build", "correctness", "kernels", "training"]
    failed = {name: s.get("error") for name, s in steps.items() if s["status"] != "ok"}
    assert not failed and proc.returncode == 0, (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    assert report["mode"] == "dry-run" and report["wheels"]
    for name, step in steps.items():
        assert 0 < step["seconds"] <= step["limit_seconds"], name
        assert (tmp_path / f"log-{name}.txt").exists(), name

    env = steps["environment"]["result"]
    assert env["versions"]["torch"] and env["versions"]["deepspeed"] and env["versions"]["trl"] == "1.16.0"
    assert env["gpu"] == env["hbm_gbs"] == env["bf16_matmul_tflops"] == NO_GPU
    build = steps["build"]["result"]
    assert build["cuda"] == build["triton"] == NO_GPU and build["cpp"]["seconds"] > 0

    tests = steps["correctness"]["result"]
    assert tests["passed"] > 0 and tests["failures"] == tests["errors"] == 0 and not tests["failing"]

    rows = steps["kernels"]["result"]["linear"]
    assert [r["name"] for r in rows] == ["naive", "cpp"]
    for row in rows:
        assert row["ms"] > 0 and row["max_abs_err"] < 1e-4 and row["roofline_pct"] == NO_GPU

    training = steps["training"]["result"]
    runs = training["dpo_ds"] + training["mfu"]
    assert [r["run"] for r in runs] == ["reference offloaded to CPU", "reference on GPU", "precomputed reference",
                                        "MFU job, precomputed reference"]
    for run in runs:
        # Policy == reference at step 1: ln 2 whichever way the reference is run.
        assert run["step1_loss"] == pytest.approx(math.log(2), abs=1e-5), run["run"]
        assert run["tokens_per_second_per_device"] > 0 and run["step_seconds"] > 0
        assert run["mfu"] == run["peak_memory_gib"] == NO_GPU
    assert training["mfu_batch_estimate"] >= 1
    assert [r["label"] for r in training["trl"]] == ["trl", "dpo_ds zero3"]
    assert training["trl"][0]["step1_loss"] == pytest.approx(math.log(2), abs=1e-5)

    # The targets are listed, none judged without a GPU.
    assert len(report["targets"]) == 5 and all(t["met"] is None for t in report["targets"])
    assert [t["measured"] for t in report["targets"][:4]] == [NO_GPU] * 4

    markdown = (tmp_path / "results.md").read_text()
    for heading in ("## Environment", "## Build", "## Correctness", "## Kernels: linear variant",
                    "## Training (dpo_ds)", "## TRL 1.16 vs dpo_ds"):
        assert heading in markdown
    assert NO_GPU in markdown


def test_unknown_argument_is_refused():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--fast"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr
