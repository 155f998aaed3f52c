"""launch/train.py's command line: the embedded default only without run arguments, TRL's defaults otherwise."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpo_ds.config import DPOConfig
from dpo_ds.trainer import DEFAULT_CONFIG, resolve_config

REPO = Path(__file__).resolve().parents[1]


def test_run_arguments_without_config_keep_dpoconfig_defaults():
    config, sources = resolve_config(["--model_name_or_path", "X", "--dataset_name", "Y"])
    assert config == DPOConfig(model_name_or_path="X", dataset_name="Y")
    assert config.max_length == 1024 and config.max_prompt_length is None and config.max_steps == -1
    changed = {k for k, v in sources.items() if v != "default"}
    assert changed == {"model_name_or_path", "dataset_name"}
    assert sources["model_name_or_path"] == "command line"


def test_no_run_arguments_is_the_embedded_default():
    embedded = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for argv in ([], ["--local_rank=0"], ["--local-rank", "1"]):
        config, sources = resolve_config(argv)
        assert config == dataclasses.replace(DPOConfig(), **embedded), argv
        assert {k for k, v in sources.items() if v != "default"} == set(embedded)
        assert sources["max_steps"] == str(DEFAULT_CONFIG)


@pytest.mark.slow  # starts a subprocess
def test_train_py_prints_where_each_non_default_value_came_from(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("beta: 0.25\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "launch/train.py", "--config", str(run), "--model_name_or_path", str(tmp_path / "none"),
         "--dataset_name", str(tmp_path / "none.jsonl")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:  # the config is printed before any model loads; the rest of the run does not matter here
        lines = [proc.stdout.readline() for _ in range(4)]
    finally:
        proc.kill()
        proc.wait()
    assert lines == ["resolved config (values that differ from DPOConfig's defaults):\n",
                     f"  model_name_or_path: {str(tmp_path / 'none')!r}  (command line)\n",
                     f"  dataset_name: {str(tmp_path / 'none.jsonl')!r}  (command line)\n",
                     f"  beta: 0.25  ({run})\n"]
