"""TRL 1.16's own `trl/scripts/dpo.py` command lines run unchanged on launch/train.py.

Only the model and the dataset are swapped for local ones (a tiny model built from config, a
JSONL file), plus `--max_steps 2` at the end (the last flag wins) to keep the runs short.
"""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import trl.scripts.dpo

from test_trainer import write_learnable_data

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def trl_command_lines() -> list[list[str]]:
    """The arguments of each ```bash block in the installed TRL's dpo.py docstring."""
    blocks = re.findall(r"```bash\n(.*?)```", trl.scripts.dpo.__doc__, flags=re.S)
    commands = [shlex.split(block.replace("\\\n", " "))[2:] for block in blocks]  # drop "python trl/scripts/dpo.py"
    assert len(commands) == 2 and all("--no_remove_unused_columns" in c for c in commands)
    return commands


def localized(argv: list[str], model: str, data: str) -> list[str]:
    out = list(argv)
    out[out.index("--model_name_or_path") + 1] = model
    out[out.index("--dataset_name") + 1] = data
    return out + ["--max_steps", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "python"])
@pytest.mark.parametrize("which", [0, 1], ids=["full", "peft"])
def test_trl_docstring_command_line_runs(launcher, which, tmp_path, tiny_model_dir):
    """Each command line under each launcher (every run costs 1-2 minutes on 2 CPU cores)."""
    data = write_learnable_data(tmp_path / "prefs.jsonl", 40, seed=0)
    args = localized(trl_command_lines()[which], tiny_model_dir, str(data))
    if launcher == "python":
        cmd = [sys.executable, str(ROOT / "launch" / "train.py"), *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
               "--master_port", str(29600 + os.getpid() % 1000), str(ROOT / "launch" / "train.py"), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "  remove_unused_columns: False  (command line)" in proc.stdout  # the resolved config, then why
    assert "remove_unused_columns=False has no effect in dpo_ds" in proc.stdout + proc.stderr
    assert "  learning_rate: 5e-0" in proc.stdout and "(command line)" in proc.stdout
    out = tmp_path / args[args.index("--output_dir") + 1]  # TRL's relative output_dir, unchanged
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("global_step", 0) for r in steps) == 2
