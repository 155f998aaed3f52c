"""Published DPO recipes (alignment-handbook style YAML) run as --config files unchanged but for
model, data and push_to_hub (tests/recipes/*.yaml; MODEL and DATA are filled in here)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpo_ds.parser import ConfigParser
from dpo_ds.trl_fields import ALIASES, NO_EFFECT
from test_trainer import write_learnable_data

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "tests" / "recipes").glob("*.yaml"))


def localized(recipe: Path, tmp_path: Path, model: str) -> Path:
    data = write_learnable_data(tmp_path / "prefs.jsonl", 40, seed=0)
    text = recipe.read_text().replace("model_name_or_path: MODEL", f"model_name_or_path: {model}")
    path = tmp_path / recipe.name
    path.write_text(text.replace("dataset_name: DATA", f"dataset_name: {data}").replace("data_files: DATA",
                                                                                          f"data_files: {data}"))
    return path


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_resolves_with_every_key_honoured_or_explained(recipe, tmp_path):
    path = localized(recipe, tmp_path, "unused-model-id")
    raw = yaml.safe_load(path.read_text())
    parser = ConfigParser()
    config, sources, _ = parser.parse(["--config", str(path)])
    for key in raw:  # a DPOConfig field, a key folded into one, or a key whose value has no effect
        assert key in sources or key in ALIASES or key in NO_EFFECT, key
    assert config.beta == raw["beta"] and config.learning_rate == raw["learning_rate"]
    assert config.eval_strategy == raw.get("evaluation_strategy", raw.get("eval_strategy"))
    assert config.lr_scheduler_type == raw["lr_scheduler_type"] and config.optim == raw.get("optim", config.optim)
    assert "log_level" in config.no_effect_keys  # set away from TRL's default: one warning line


@pytest.mark.slow
def test_zephyr_full_recipe_trains(tmp_path, tiny_model_dir):
    path = localized(ROOT / "tests" / "recipes" / "zephyr_dpo_full.yaml", tmp_path, tiny_model_dir)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(path),
                           "--max_steps", "1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (tmp_path / "data/zephyr-7b-dpo-full/metrics.jsonl").read_text().splitlines()]
    assert max(r.get("global_step", 0) for r in rows) == 1
