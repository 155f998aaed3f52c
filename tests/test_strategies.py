"""transformers' evaluation/saving/logging strategies, load_best_model_at_end, save_total_limit,
save_only_model and reduce_lr_on_plateau, through DPOTrainer (one process, three short runs)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_trainer import ROOT, read_metrics, write_learnable_data


@pytest.mark.slow
def test_strategies_best_model_rotation_and_plateau(tmp_path, tiny_model_dir):
    data = write_learnable_data(tmp_path / "prefs.jsonl", 22, seed=1)
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "strategies_probe.py"), tiny_model_dir,
                           str(data), str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads((out / "probe.json").read_text())
    from safetensors.torch import load_file

    # eval_on_start (step 0), then every eval_steps=2; training rows at logging_first_step, every 4, the last.
    best = read_metrics(out / "best" / "metrics.jsonl")
    evals = {r["global_step"]: r["eval_loss"] for r in best if "eval_loss" in r}
    assert sorted(evals) == [0, 2, 4, 6]
    assert [r["global_step"] for r in best if "loss" in r] == [1, 4, 6]
    # greater_is_better with eval loss: the best checkpoint is the one with the highest eval loss among the saved
    # ones (2, 4, 6). save_total_limit=1 keeps it and the newest; the final model is its weights.
    best_step = max((2, 4, 6), key=evals.get)
    assert got["best"]["state"]["best_model_checkpoint"].endswith(f"checkpoint-{best_step}")
    assert got["best"]["state"]["best_metric"] == pytest.approx(evals[best_step])
    kept = sorted(p.name for p in (out / "best").glob("checkpoint-*"))
    assert kept == sorted({f"checkpoint-{best_step}", "checkpoint-6"})
    final, chosen = load_file(out / "best" / "model.safetensors"), load_file(
        out / "best" / f"checkpoint-{best_step}" / "model.safetensors")
    newest = load_file(out / "best" / "checkpoint-6" / "model.safetensors")
    assert final.keys() == chosen.keys()
    assert all(torch.equal(final[k], chosen[k]) for k in final)
    assert best_step == 6 or not all(torch.equal(final[k], newest[k]) for k in final)

    # Epoch strategies: 16 rows / batch 2 = 8 steps an epoch; save_only_model checkpoints hold only the model.
    epoch = read_metrics(out / "epoch" / "metrics.jsonl")
    assert [r["global_step"] for r in epoch if "loss" in r] == [8, 16]
    assert [r["global_step"] for r in epoch if "eval_loss" in r] == [8, 16]
    for step in (8, 16):
        folder = out / "epoch" / f"checkpoint-{step}"
        assert (folder / "model.safetensors").exists() and not list(folder.glob("*.pt"))
    assert "save_only_model=True" in got["model_only_resume_error"]

    # reduce_lr_on_plateau (mode max, patience 0, factor 0.5) stepped with eval_loss after each evaluation, as
    # torch's ReduceLROnPlateau steps on the same losses.
    plateau = read_metrics(out / "plateau" / "metrics.jsonl")
    losses = [r["eval_loss"] for r in plateau if "eval_loss" in r]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=0, factor=0.5)
    expected = []
    for loss in losses:
        expected.append(optimizer.param_groups[0]["lr"])
        reference.step(loss)
    assert [r["learning_rate"] for r in plateau if "loss" in r] == pytest.approx(expected)
    assert expected[-1] < expected[0]  # the schedule did act
