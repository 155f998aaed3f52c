"""Every TRL 1.16 / transformers option is classified (a honoured, b no effect, c refused) and documented."""
import dataclasses
import re
from pathlib import Path

import pytest
import trl
import yaml
from transformers import TrainingArguments
from trl.scripts.utils import DatasetMixtureConfig

from dpo_ds.config import ConfigError, DPOConfig, field_docs
from dpo_ds.parser import ConfigParser
from dpo_ds.trl_fields import ALIAS_DEFAULTS, ALIASES, NO_EFFECT, REFUSED, TRL_ONLY_DEFAULTS

REPO = Path(__file__).resolve().parents[1]
TRL_CLASSES = (trl.DPOConfig, TrainingArguments, trl.ModelConfig, trl.ScriptArguments, DatasetMixtureConfig)
OURS = set(field_docs())  # DPOConfig's own options; the TRL-only keys are inherited fields


def trl_defaults() -> dict:
    out = {}
    for cls in TRL_CLASSES:
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out.setdefault(f.name, default)
    return out


def test_every_installed_trl_and_transformers_field_is_classified():
    classified = OURS | set(ALIASES) | set(NO_EFFECT) | set(REFUSED)
    missing = sorted(set(trl_defaults()) - classified)
    assert not missing, f"unclassified TRL/transformers fields (add them to dpo_ds/trl_fields.py): {missing}"


def test_classes_are_disjoint_and_aliases_point_at_fields():
    groups = [OURS, set(ALIASES), set(NO_EFFECT), set(REFUSED)]
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            assert not a & b, a & b
    assert set(ALIAS_DEFAULTS) == set(ALIASES)
    assert {target for target, _ in ALIASES.values()} <= OURS
    assert {f.name for f in dataclasses.fields(DPOConfig)} == OURS | set(TRL_ONLY_DEFAULTS)


def test_no_effect_and_refused_defaults_are_trls():
    trl = trl_defaults()
    for name, (default, _) in {**NO_EFFECT, **REFUSED}.items():
        if name in trl:
            assert default == trl[name], name


def test_docs_table_lists_every_key_with_its_class():
    text = (REPO / "docs/trl_fields.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| [^|]+ \| ([abc]) \|", text, flags=re.M))
    expected = {name: "a" for name in (set(trl_defaults()) & OURS) | set(ALIASES)}
    expected.update({name: "b" for name in NO_EFFECT})
    expected.update({name: "c" for name in REFUSED})
    assert rows == expected
    texts = dict(re.findall(r"^\| `(\w+)` \| [^|]+ \| a \| (.*) \|$", text, flags=re.M))
    for name in set(texts) & OURS:  # an option's row repeats its documentation (--help's text)
        assert texts[name] == field_docs()[name], name
    assert "docs/trl_fields.md" in (REPO / "README.md").read_text()


def _other_value(default):
    return (not default) if isinstance(default, bool) else "x"


def test_no_effect_keys_are_accepted_with_one_warning_each(tmp_path):
    keys = {k: _other_value(d) for k, (d, _) in NO_EFFECT.items() if k != "local_rank"}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(keys))
    parser = ConfigParser()
    config, _, _ = parser.parse(["--config", str(path)])
    assert config == DPOConfig(**keys) and config.no_effect_keys == list(keys)  # one warning line each
    config, sources, _ = parser.parse(["--config", str(path), "--no_remove_unused_columns"])
    assert config.no_effect_keys.count("remove_unused_columns") == 1
    assert not config.remove_unused_columns and sources["remove_unused_columns"] == "command line"
    assert parser.parse(["--do_eval", "false"])[0].no_effect_keys == []  # TRL's default: nothing to say


def test_trl_keys_work_from_python_as_in_trl():
    """TRL users build DPOConfig in Python with transformers' keys: accepted, folded, noted or refused."""
    config = DPOConfig(remove_unused_columns=False, do_eval=True, torch_dtype="bfloat16", model_revision="v2",
                       test_split_size=0.1, local_rank=3)
    assert config.no_effect_keys == ["remove_unused_columns", "do_eval"]
    assert config.model_init_kwargs == {"dtype": "bfloat16", "revision": "v2"} and config.eval_fraction == 0.1
    assert config.torch_dtype is None  # folded, so saving and reloading does not fold it twice
    assert DPOConfig(remove_unused_columns=True).no_effect_keys == []
    with pytest.raises(ConfigError, match="neftune_noise_alpha=5 is not supported"):
        DPOConfig(neftune_noise_alpha=5)
    saved = config.to_dict()
    assert saved["remove_unused_columns"] is False and "label_names" not in saved  # TRL defaults left out
    assert DPOConfig(**saved) == config


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_refused_keys_fail_away_from_trls_default(key, tmp_path):
    default, why = REFUSED[key]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({key: default}))
    assert ConfigParser().parse(["--config", str(path)])[0] == DPOConfig()
    path.write_text(yaml.safe_dump({key: _other_value(default)}))
    with pytest.raises(ConfigError, match=re.escape(why)):
        ConfigParser().parse(["--config", str(path)])


def test_aliases_fold_into_their_field():
    config, sources, _ = ConfigParser().parse(
        ["--use_peft", "--use_dora", "--lora_modules_to_save", "[lm_head]", "--torch_dtype", "bfloat16",
         "--model_revision", "v2", "--test_split_size", "0.1"])
    assert config.peft_config == {"use_dora": True, "modules_to_save": ["lm_head"]}
    assert config.model_init_kwargs == {"dtype": "bfloat16", "revision": "v2"}
    assert config.eval_fraction == 0.1
    assert sources["peft_config"] == sources["eval_fraction"] == "command line"


def test_documented_default_differences_are_the_real_ones():
    """docs/trl_fields.md lists exactly the DPOConfig options whose default differs from the one TRL declares
    (in DPOConfig, else ModelConfig or ScriptArguments), and the README names the deliberate ones."""
    trl = {}
    for cls in (__import__("trl").DPOConfig, __import__("trl").ModelConfig, __import__("trl").ScriptArguments):
        trl.update({f.name: f for f in dataclasses.fields(cls) if f.name not in trl})
    ours = {f.name: f for f in dataclasses.fields(DPOConfig)}

    def default(f):
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    differing = {name for name in (ours.keys() & trl.keys()) - set(TRL_ONLY_DEFAULTS)
                 if default(ours[name]) != default(trl[name])}
    text = (REPO / "docs/trl_fields.md").read_text().split("## Defaults that differ from TRL 1.16")[1]
    assert set(re.findall(r"^\| `(\w+)` \|", text, flags=re.M)) == differing
    deliberate = re.findall(r"^\| `(\w+)` \|[^\n]*\| deliberate: ", text, flags=re.M)
    readme = (REPO / "README.md").read_text()
    assert deliberate and all(f"`{name}`" in readme.split("### Configuration")[1] for name in deliberate)
