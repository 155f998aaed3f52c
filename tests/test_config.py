"""DPOConfig: parsing (YAML, flags, aliases), validation, DeepSpeed "auto" filling."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import trl
import yaml
from transformers.trainer_utils import HubStrategy, IntervalStrategy, SaveStrategy, SchedulerType
from transformers.training_args import OptimizerNames

from dpo_ds.config import ConfigError, DPOConfig, field_docs
from dpo_ds.losses import LossConfig
from dpo_ds.ds_config import (
    DEFAULT_DEEPSPEED_CONFIG,
    DEFAULT_HIDDEN_SIZE,
    load_deepspeed_config,
    reference_deepspeed_config,
    reference_setup,
)
from dpo_ds.parser import parse_args, parse_known
from dpo_ds.trl_fields import TRL_ONLY_DEFAULTS

REPO = Path(__file__).resolve().parents[1]


def write_yaml(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def write_json(tmp_path, data, name="ds.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


# ----------------------------------------------------------------------------- docs and help


def test_every_field_has_a_one_line_doc():
    docs = field_docs()
    names = [f.name for f in dataclasses.fields(DPOConfig) if f.name not in TRL_ONLY_DEFAULTS]
    assert list(docs) == names
    for name, doc in docs.items():
        assert doc.strip() and "\n" not in doc, name


def test_help_lists_every_field_with_default_and_doc(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--bogus", "--help"])  # help wins over errors in the other flags
    assert exc.value.code == 0
    out = capsys.readouterr().out
    flat = "".join(out.split())  # argparse wraps lines, also at hyphens
    for name, doc in field_docs().items():
        assert f"--{name} " in out and "".join(doc.split()) in flat, name
    assert "(default:auto)" in flat and "(default:1024)" in flat
    assert "--no_disable_dropout" in out  # TRL's negation of a true-by-default boolean


# ----------------------------------------------------------------------------- YAML + flags


def test_defaults_match_trl_names_and_brief():
    c = DPOConfig()
    assert (c.model_name_or_path, c.dataset_name, c.loss_type, c.beta) == ("builtin", "builtin", "sigmoid", 0.1)
    assert (c.ref_zero_stage, c.ref_offload, c.max_length, c.learning_rate) == (None, "auto", 1024, 1e-6)
    assert c.report_to == [] and c.model_init_kwargs == {}
    assert c.eval_strategy == "no" and c.eval_steps is None
    c = DPOConfig(eval_strategy="steps")
    assert c.eval_steps == c.logging_steps == 10  # None resolves to logging_steps, as in transformers


def test_yaml_then_flags_precedence(tmp_path):
    path = write_yaml(tmp_path, {"beta": 0.3, "learning_rate": 2e-5, "max_steps": 7, "output_dir": "o"})
    c = parse_args(["--beta", "0.5", "--config", path, "--max_steps=9"])
    assert c.beta == 0.5  # flag wins over YAML regardless of order
    assert c.learning_rate == 2e-5  # from YAML
    assert c.max_steps == 9
    assert c.output_dir == "o"
    assert c.seed == 42  # default
    c = parse_args(["--max_steps", "3", "--max_steps", "4"])
    assert c.max_steps == 4  # the last flag wins


def test_yaml_scientific_notation_without_dot(tmp_path):
    # PyYAML reads 5e-6 as a string (YAML 1.1 wants a dot); float fields must still accept it.
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 5e-6\nadam_epsilon: 1e-8\n")
    c = parse_args(["--config", str(path)])
    assert c.learning_rate == 5e-6 and c.adam_epsilon == 1e-8


def test_default_example_yaml():
    c = parse_args(["--config", str(REPO / "examples/default.yaml")])
    assert (c.model_name_or_path, c.dataset_name, c.dataset_test_split) == ("builtin", "builtin", "test")
    assert (c.per_device_train_batch_size, c.gradient_accumulation_steps) == (4, 1)
    assert (c.max_length, c.max_prompt_length, c.learning_rate) == (192, 96, 5e-6)
    assert (c.max_steps, c.eval_steps, c.logging_steps, c.save_steps) == (40, 20, 5, 20)
    assert (c.beta, c.warmup_ratio, c.lr_scheduler_type, c.output_dir) == (0.1, 0.1, "linear", "outputs/default")
    # No deepspeed key: the built-in ZeRO-3 default applies wherever the run is launched from.
    assert c.deepspeed is None and "deepspeed" not in yaml.safe_load((REPO / "examples/default.yaml").read_text())


@pytest.mark.parametrize("flag,value,field,expected", [
    ("--model_name_or_path", "Qwen/Qwen3-0.6B", "model_name_or_path", "Qwen/Qwen3-0.6B"),
    ("--dataset_name", "trl-lib/ultrafeedback_binarized", "dataset_name", "trl-lib/ultrafeedback_binarized"),
    ("--dataset_train_split", "train_prefs", "dataset_train_split", "train_prefs"),
    ("--dataset_test_split", "test_prefs", "dataset_test_split", "test_prefs"),
    ("--model-name-or-path", "m", "model_name_or_path", "m"),  # dashes work like underscores
])
def test_trl_script_flags(flag, value, field, expected):
    assert getattr(parse_args([flag, value]), field) == expected


def test_trl_deepspeed_flag(tmp_path):
    path = write_json(tmp_path, {"zero_optimization": {"stage": 2}})
    assert parse_args(["--deepspeed", path]).deepspeed == path


@pytest.mark.parametrize("argv", [
    ["--local_rank=1"], ["--local_rank", "1"], ["--local-rank=0"], ["--local-rank", "0"],
])
def test_launcher_local_rank_is_ignored(argv):
    assert parse_args(argv + ["--beta", "0.2"]) == DPOConfig(beta=0.2)


def test_trl_model_flags_fold_into_model_init_kwargs(tmp_path):
    c = parse_args(["--dtype", "bfloat16", "--model_revision", "v2"])
    assert c.model_init_kwargs == {"dtype": "bfloat16", "revision": "v2"}
    assert parse_args(["--torch_dtype", "float16"]).model_init_kwargs == {"dtype": "float16"}
    path = write_yaml(tmp_path, {"model_init_kwargs": {"low_cpu_mem_usage": True}, "dtype": "float32"})
    assert parse_args(["--config", path]).model_init_kwargs == {"low_cpu_mem_usage": True, "dtype": "float32"}
    # a flag alias adds to the YAML mapping instead of replacing it
    assert parse_args(["--config", path, "--dtype", "bfloat16"]).model_init_kwargs == {
        "low_cpu_mem_usage": True, "dtype": "bfloat16"}


@pytest.mark.parametrize("argv,expected", [
    (["--bf16"], True),
    (["--bf16", "true"], True),
    (["--bf16", "True"], True),
    (["--bf16=1"], True),
    (["--bf16", "false"], False),
    (["--bf16=no"], False),
])
def test_bool_flags(argv, expected):
    assert parse_args(argv).bf16 is expected


def test_bool_flag_followed_by_other_flag_or_word():
    c = parse_args(["--use_peft", "--bf16"])
    assert c.use_peft and c.bf16
    c, rest = parse_known(["train", "--bf16"])
    assert c.bf16 and rest == ["train"]
    assert parse_args(["--disable_dropout", "false"]).disable_dropout is False


def test_list_flags_space_separated_and_yaml_lists(tmp_path):
    assert parse_args(["--lora_target_modules", "q_proj", "v_proj"]).lora_target_modules == ["q_proj", "v_proj"]
    path = write_yaml(tmp_path, {"lora_target_modules": ["q_proj", "k_proj"]})
    assert parse_args(["--config", path]).lora_target_modules == ["q_proj", "k_proj"]
    path = write_yaml(tmp_path, {"lora_target_modules": "all-linear"}, "one.yaml")  # one word: a one-item list
    assert parse_args(["--config", path]).lora_target_modules == ["all-linear"]
    assert parse_args(["--lora_target_modules", "none"]).lora_target_modules is None
    with pytest.raises(ConfigError, match=r"\['q_proj,v_proj'\]: expected module names as a YAML list"):
        parse_args(["--lora_target_modules", "q_proj,v_proj"])
    assert parse_args(["--report_to", "tensorboard", "wandb"]).report_to == ["tensorboard", "wandb"]
    assert parse_args(["--report_to", "none"]).report_to == []
    assert parse_args(["--report_to", "all"]).report_to == ["all"]  # every installed tracker (dpo_ds.metrics)
    c = parse_args(["--loss_type", "sigmoid", "sft", "--loss_weights", "0.8", "0.2"])
    assert c.loss_type == ["sigmoid", "sft"] and c.loss_weights == [0.8, 0.2]


def test_loss_type_keeps_user_value_and_loss_types_is_a_tuple():
    c = parse_args(["--loss_type", "ipo"])
    assert c.loss_type == ["ipo"] and LossConfig.from_config(c).loss_types == ("ipo",)  # a list, as TRL's loss_type
    assert DPOConfig(loss_type="ipo").loss_type == "ipo"
    with pytest.raises(ConfigError, match="unknown loss type 'sigmoid,sft'"):  # a list is a list, as in TRL
        DPOConfig(loss_type="sigmoid,sft")
    assert LossConfig.from_config(DPOConfig(loss_type=["hinge"])).loss_types == ("hinge",)


def test_dict_flag_is_json():
    c = parse_args(["--model_init_kwargs", '{"dtype": "bfloat16", "low_cpu_mem_usage": true}'])
    assert c.model_init_kwargs == {"dtype": "bfloat16", "low_cpu_mem_usage": True}
    with pytest.raises(ConfigError, match=r"--model_init_kwargs.*: invalid _json_object value"):
        parse_args(["--model_init_kwargs", "{dtype: bf16"])
    with pytest.raises(ConfigError, match="--model_init_kwargs"):
        parse_args(["--model_init_kwargs", "[1, 2]"])


def test_none_for_optional_fields(tmp_path):
    c = parse_args(["--max_length", "none", "--dataset_test_split", "None", "--eval_steps", "null",
                    "--eval_strategy", "steps"])
    assert c.max_length is None and c.dataset_test_split is None and c.eval_steps == c.logging_steps
    path = write_yaml(tmp_path, {"max_length": None, "rpo_alpha": None})
    c = parse_args(["--config", path])
    assert c.max_length is None and c.rpo_alpha is None
    with pytest.raises(ConfigError, match=r"--beta: invalid float value: 'none'"):
        parse_args(["--beta", "none"])
    with pytest.raises(ConfigError, match=r"'beta' = None: expected a value of type float \(none is not allowed\)"):
        parse_args(["--config", write_yaml(tmp_path, {"beta": None}, "b.yaml")])


def test_parse_known_returns_subcommand_flags_in_order():
    c, rest = parse_known(["--json", "--beta", "0.2", "--show", "5", "extra", "--max_steps=3"])
    assert c.beta == 0.2 and c.max_steps == 3
    assert rest == ["--json", "--show", "5", "extra"]


# ----------------------------------------------------------------------------- error messages


def test_unknown_flag_suggests_closest_key():
    with pytest.raises(ConfigError) as exc:
        parse_args(["--learning_rat", "1e-5"])
    msg = str(exc.value)
    assert "'learning_rat'" in msg and "command line" in msg and "did you mean 'learning_rate'" in msg


def test_unknown_yaml_key_names_file_and_suggests(tmp_path):
    path = write_yaml(tmp_path, {"per_device_train_batchsize": 4})
    with pytest.raises(ConfigError) as exc:
        parse_args(["--config", path])
    msg = str(exc.value)
    assert "'per_device_train_batchsize'" in msg and path in msg
    assert "did you mean 'per_device_train_batch_size'" in msg


def test_unknown_key_without_close_match_points_to_help():
    with pytest.raises(ConfigError, match="'zzzz'.*--help"):
        parse_args(["--zzzz", "1"])


def test_stray_word_is_an_error():
    with pytest.raises(ConfigError, match="unexpected argument 'oops'"):
        parse_args(["--beta", "0.2", "oops"])


def test_flag_without_value():
    with pytest.raises(ConfigError, match="--max_steps.*: expected one argument"):
        parse_args(["--max_steps", "--beta", "0.1"])


@pytest.mark.parametrize("argv,pattern", [
    (["--max_steps", "ten"], r"--max_steps.*: invalid int value: 'ten' \(on the command line\)"),
    (["--beta", "high"], r"--beta: invalid float value: 'high'"),
    (["--bf16=maybe"], r"--bf16: Truthy value expected: got maybe"),
    (["--truncation_mode", "middle"], r"'truncation_mode' = 'middle': expected one of keep_start, keep_end"),
    (["--report_to", "mlflow"], r"'report_to' = 'mlflow': expected one of tensorboard, wandb, trackio, all, none"),
])
def test_bad_value_names_key_value_and_allowed(argv, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_args(argv)


def test_bad_yaml_value_names_the_file(tmp_path):
    path = write_yaml(tmp_path, {"per_device_train_batch_size": "four"})
    with pytest.raises(ConfigError, match=rf"--per_device_train_batch_size.*invalid int value: 'four' \(set in {path}\)"):
        parse_args(["--config", path])
    path = write_yaml(tmp_path, {"bf16": [True]}, "b.yaml")
    with pytest.raises(ConfigError, match="'bf16' = \\[True\\]: expected a value of type bool"):
        parse_args(["--config", path])


def test_missing_and_invalid_yaml_name_the_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=f"{missing}.*does not exist"):
        parse_args(["--config", missing])
    broken = tmp_path / "broken.yaml"
    broken.write_text("beta: [0.1\n")
    with pytest.raises(ConfigError, match=f"{broken}.*not valid YAML"):
        parse_args(["--config", str(broken)])
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- beta\n")
    with pytest.raises(ConfigError, match=f"{scalar}.*mapping"):
        parse_args(["--config", str(scalar)])


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("name,value", [
    ("padding_side", "top"), ("on_bad_row", "ignore"), ("ref_offload", "gpu"),
    ("lr_scheduler_type", "cosine_min"), ("eval_strategy", "best"), ("truncation_mode", "keep_middle"),
    ("save_strategy", "always"), ("logging_strategy", "best"), ("optim", "adamw"), ("hub_strategy", "never"),
])
def test_choices(name, value):
    with pytest.raises(ConfigError, match=rf"'{name}' = '{value}': expected one of "):
        DPOConfig(**{name: value})


@pytest.mark.parametrize("name", [
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "logging_steps", "save_steps", "eval_steps", "save_total_limit", "ref_model_sync_steps", "lora_r",
    "lora_alpha", "dataset_num_proc", "max_length", "max_prompt_length", "max_completion_length",
    "pad_to_multiple_of",
])
def test_positive_ints(name):
    with pytest.raises(ConfigError, match=rf"'{name}' = 0: expected an integer >= 1"):
        DPOConfig(**{name: 0})


def test_precompute_batch_size_positive():
    with pytest.raises(ConfigError, match="'precompute_ref_batch_size' = -2"):
        DPOConfig(precompute_ref_log_probs=True, precompute_ref_batch_size=-2)


@pytest.mark.parametrize("kwargs,pattern", [
    ({"max_steps": 0}, "'max_steps' = 0"),
    ({"num_train_epochs": 0.0}, "'num_train_epochs' = 0.0"),
    ({"ref_zero_stage": 4}, "'ref_zero_stage' = 4: expected 0, 1, 2 or 3"),
    ({"eval_fraction": 1.0}, r"'eval_fraction' = 1.0: expected a number in \[0.0, 1.0\)"),
    ({"warmup_ratio": 1.5}, "'warmup_ratio' = 1.5"),
    ({"learning_rate": -1e-5}, "'learning_rate'"),
    ({"adam_beta2": 1.0}, "'adam_beta2'"),
    ({"adam_epsilon": 0.0}, "'adam_epsilon'"),
    ({"temperature": 0.0}, "'temperature'"),
    ({"logit_softcap": -30.0}, "'logit_softcap'"),
    ({"lora_dropout": 1.0}, "'lora_dropout'"),
    ({"ref_model_mixup_alpha": 1.2}, "'ref_model_mixup_alpha'"),
    ({"max_grad_norm": -1.0}, "'max_grad_norm'"),
    ({"warmup_steps": -3}, "'warmup_steps'"),
    ({"report_to": ["none", "wandb"]}, "'report_to'.*none or all alone"),
    ({"chat_template_path": "/nonexistent/t.jinja"}, "'chat_template_path'.*existing .jinja file"),
    ({"deepspeed": "/nonexistent/ds.json"}, "'deepspeed'.*existing file"),
    ({"resume_from_checkpoint": "/nonexistent/ckpt"}, "'resume_from_checkpoint'.*auto"),
])
def test_value_ranges(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        DPOConfig(**kwargs)


def test_valid_edges_are_accepted(tmp_path):
    c = DPOConfig(max_grad_norm=0.0, warmup_ratio=1.0, ref_zero_stage=0, ref_offload="none",
                  resume_from_checkpoint="auto", max_steps=-1, eval_fraction=0.0)
    assert c.ref_zero_stage == 0
    assert DPOConfig(resume_from_checkpoint=str(tmp_path)).resume_from_checkpoint == str(tmp_path)


@pytest.mark.parametrize("kwargs,pattern", [
    ({"bf16": True, "fp16": True}, "bf16 and fp16 are both true"),
    ({"ref_offload": "cpu", "ref_zero_stage": 2}, "ref_offload='cpu' needs ref_zero_stage=3 \\(got 2\\)"),
    ({"ref_offload": "nvme", "ref_zero_stage": 0, "ref_nvme_path": "/nvme"}, "ref_offload='nvme' needs ref_zero"),
    ({"ref_offload": "nvme"}, "ref_offload='nvme' needs ref_nvme_path"),
    ({"ref_offload": "cpu", "ref_nvme_path": "/nvme"}, "ref_nvme_path='/nvme' is only used with ref_offload='nvme'"),
    ({"max_length": 128, "max_prompt_length": 128}, "max_prompt_length=128 must be smaller than max_length=128"),
    ({"warmup_steps": 10, "warmup_ratio": 0.1}, "warmup_steps=10 and warmup_ratio=0.1"),
    ({"precompute_ref_batch_size": 8}, "precompute_ref_batch_size is set but precompute_ref_log_probs is false"),
    ({"sync_ref_model": True, "precompute_ref_log_probs": True}, "sync_ref_model=true cannot.*precompute"),
    ({"sync_ref_model": True, "use_peft": True}, "sync_ref_model=true cannot.*use_peft"),
    ({"reference_free": True, "precompute_ref_log_probs": True}, "reference_free=true.*precompute_ref_log_probs"),
    ({"reference_free": True, "ref_model_name_or_path": "m"}, "reference_free=true.*ref_model_name_or_path"),
    ({"model_init_kwargs": {"attn_implementation": "eager"}}, "contradicts attn_implementation='sdpa'"),
])
def test_cross_field_rejections(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        DPOConfig(**kwargs)


def test_cross_field_error_from_flags_names_the_source():
    with pytest.raises(ConfigError, match=r"needs ref_zero_stage=3.*\(ref_offload set on the command line; ref_zero_stage set on the "
                       r"command line\)$"):
        parse_args(["--ref_offload", "cpu", "--ref_zero_stage", "1"])


def test_loss_module_checks_run_in_post_init():
    with pytest.raises(ConfigError, match="bogus"):
        DPOConfig(loss_type="bogus")
    with pytest.raises(ConfigError, match="loss_weights"):
        DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0])


def test_warmup_steps():
    assert DPOConfig(warmup_ratio=0.1).get_warmup_steps(45) == 5  # ceil(4.5)
    assert DPOConfig(warmup_steps=7).get_warmup_steps(45) == 7
    assert DPOConfig().get_warmup_steps(45) == 0


# ----------------------------------------------------------------------------- save / load


def test_save_load_roundtrip(tmp_path):
    c = parse_args(["--loss_type", "sigmoid", "sft", "--loss_weights", "1", "0.5", "--bf16", "--max_length", "none",
                    "--lora_target_modules", "q_proj", "v_proj", "--dtype", "bfloat16", "--report_to", "tensorboard",
                    "--learning_rate", "3e-7", "--ref_offload", "none", "--ref_zero_stage", "0"])
    path = tmp_path / "out" / "config.yaml"
    c.save(str(path))
    assert parse_args(["--config", str(path)]) == c
    assert DPOConfig.load(str(path)) == c
    assert yaml.safe_load(path.read_text()) == c.to_dict()
    assert list(c.to_dict()) == [f.name for f in dataclasses.fields(DPOConfig) if f.name not in TRL_ONLY_DEFAULTS]


# ----------------------------------------------------------------------------- DeepSpeed


def test_builtin_default_is_zero3_without_offload():
    ds = load_deepspeed_config(DPOConfig(), world_size=2)
    assert ds["zero_optimization"]["stage"] == 3
    assert "offload_param" not in ds["zero_optimization"] and "offload_optimizer" not in ds["zero_optimization"]
    assert DEFAULT_DEEPSPEED_CONFIG["train_batch_size"] == "auto"  # the module constant is not mutated
    assert reference_setup(DPOConfig(), ds, on_cpu=True) == (3, "cpu")  # several ranks: sharded and offloaded


def test_builtin_default_on_one_rank():
    """fp32 on one rank: a stage-0 policy, and on a CPU a stage-0 reference (on a GPU it stays offloaded);
    mixed precision keeps ZeRO-3; a JSON file is never changed."""
    args = DPOConfig()
    ds = load_deepspeed_config(args, world_size=1)
    assert ds["zero_optimization"] == {"stage": 0}
    assert reference_setup(args, ds, on_cpu=True) == (0, "none")
    assert reference_setup(args, ds, on_cpu=False) == (3, "cpu")
    assert reference_deepspeed_config(args, ds, on_cpu=True)["zero_optimization"] == {"stage": 0}
    # An explicit reference setting wins over the one-rank default.
    assert reference_setup(DPOConfig(ref_offload="cpu"), ds, on_cpu=True) == (3, "cpu")
    assert reference_setup(DPOConfig(ref_zero_stage=3), ds, on_cpu=True) == (3, "cpu")
    assert reference_setup(DPOConfig(ref_zero_stage=3, ref_offload="none"), ds, on_cpu=True) == (3, "none")
    for half in ({"bf16": True}, {"fp16": True}):
        ds = load_deepspeed_config(DPOConfig(**half), world_size=1)
        assert ds["zero_optimization"]["stage"] == 3, half
        assert reference_setup(DPOConfig(**half), ds, on_cpu=True) == (3, "cpu")
    zero3 = str(REPO / "ds_configs" / "zero3.json")
    ds = load_deepspeed_config(DPOConfig(deepspeed=zero3), world_size=1)
    assert ds["zero_optimization"]["stage"] == 3
    assert reference_setup(DPOConfig(deepspeed=zero3), ds, on_cpu=True) == (3, "cpu")


def test_auto_filling(tmp_path):
    auto_ds = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                   "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                          "warmup_num_steps": "auto", "total_num_steps": "auto"}},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                              "stage3_param_persistence_threshold": "auto"},
    }
    args = DPOConfig(deepspeed=write_json(tmp_path, auto_ds), per_device_train_batch_size=3,
                     gradient_accumulation_steps=5, max_grad_norm=0.5, learning_rate=2e-6, adam_beta1=0.8,
                     adam_beta2=0.95, adam_epsilon=1e-6, weight_decay=0.01, bf16=True, max_steps=30,
                     warmup_ratio=0.25)
    ds = load_deepspeed_config(args, world_size=4, hidden_size=64)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 60  # 3 * 5 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["optimizer"]["params"] == {"lr": 2e-6, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.01}
    assert ds["scheduler"]["params"] == {"warmup_min_lr": 0, "warmup_max_lr": 2e-6,
                                         "warmup_num_steps": 8, "total_num_steps": 30}  # ceil(30 * 0.25) = 8
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == 4096  # 64 * 64
    assert zero["stage3_prefetch_bucket_size"] == 3686  # int(0.9 * 64 * 64)
    assert zero["stage3_param_persistence_threshold"] == 640  # 10 * 64


def test_auto_sizes_without_hidden_size_use_default():
    zero = load_deepspeed_config(DPOConfig(), world_size=2)["zero_optimization"]
    assert DEFAULT_HIDDEN_SIZE == 4096
    assert zero["reduce_bucket_size"] == 16_777_216
    assert zero["stage3_prefetch_bucket_size"] == 15_099_494
    assert zero["stage3_param_persistence_threshold"] == 40_960


def test_warmup_without_warmup_is_one_step_and_total_steps_can_be_given(tmp_path):
    path = write_json(tmp_path, {"scheduler": {"type": "WarmupLR", "params": {
        "warmup_num_steps": "auto", "warmup_max_lr": "auto", "warmup_min_lr": "auto"}}})
    ds = load_deepspeed_config(DPOConfig(deepspeed=path), world_size=1, num_training_steps=100)
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 1  # DeepSpeed rejects 0
    path = write_json(tmp_path, {"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto"}}})
    with pytest.raises(ConfigError, match="num_training_steps or max_steps > 0.*scheduler.params.total_num_steps"):
        load_deepspeed_config(DPOConfig(deepspeed=path), world_size=1)


def test_missing_batch_keys_and_clipping_are_added(tmp_path):
    args = DPOConfig(deepspeed=write_json(tmp_path, {"zero_optimization": {"stage": 2}}), bf16=True,
                     per_device_train_batch_size=2, gradient_accumulation_steps=3)
    ds = load_deepspeed_config(args, world_size=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 3, 12)
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"] == {"enabled": True}


def test_explicit_consistent_values_pass(tmp_path):
    path = write_json(tmp_path, {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 4, "bf16": {
        "enabled": False}, "optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.999], "lr": 1e-6}}})
    ds = load_deepspeed_config(DPOConfig(deepspeed=path, per_device_train_batch_size=2), world_size=2)
    assert ds["train_batch_size"] == 4 and ds["optimizer"]["params"]["betas"] == [0.9, 0.999]


def test_contradiction_names_both_sides(tmp_path):
    path = write_json(tmp_path, {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0,
                                 "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}})
    with pytest.raises(ConfigError) as exc:
        load_deepspeed_config(DPOConfig(deepspeed=path, per_device_train_batch_size=2), world_size=1)
    msg = str(exc.value)
    assert path in msg
    assert "train_micro_batch_size_per_gpu=8 in the DeepSpeed config vs per_device_train_batch_size=2" in msg
    assert "bf16.enabled=True in the DeepSpeed config vs bf16=False" in msg
    assert "optimizer.params.lr=0.0001 in the DeepSpeed config vs learning_rate=1e-06" in msg
    assert "gradient_clipping" not in msg  # 1.0 agrees with max_grad_norm


def test_train_batch_size_contradiction_depends_on_world_size(tmp_path):
    path = write_json(tmp_path, {"train_batch_size": 4})
    config = DPOConfig(deepspeed=path, per_device_train_batch_size=2)
    assert load_deepspeed_config(config, world_size=2)["train_batch_size"] == 4
    with pytest.raises(ConfigError, match=r"train_batch_size=4 .* \(2\*1\*4\)=8"):
        load_deepspeed_config(config, world_size=4)


def test_unfillable_auto_is_an_error(tmp_path):
    path = write_json(tmp_path, {"zero_optimization": {"stage": 3, "sub_group_size": "auto"}})
    with pytest.raises(ConfigError, match="zero_optimization.sub_group_size"):
        load_deepspeed_config(DPOConfig(deepspeed=path), world_size=1)


def test_deepspeed_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 4,}')
    args = DPOConfig(deepspeed=str(bad))
    with pytest.raises(ConfigError, match=f"{bad}.*not valid JSON.*line 1"):
        load_deepspeed_config(args, world_size=1)
    bad.unlink()
    with pytest.raises(ConfigError, match=f"{bad}.*does not exist"):
        load_deepspeed_config(args, world_size=1)
    arr = tmp_path / "arr.json"
    arr.write_text("[1]")
    with pytest.raises(ConfigError, match=f"{arr}.*JSON object"):
        load_deepspeed_config(DPOConfig(deepspeed=str(arr)), world_size=1)


def test_repo_ds_configs_fill_completely():
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        ds = load_deepspeed_config(DPOConfig(deepspeed=str(path), fp16=True), world_size=2, hidden_size=32)
        assert ds["fp16"]["enabled"] is True and ds["train_batch_size"] == 16, path.name  # 8 per rank
        assert "auto" not in json.dumps(ds), path.name


def _policy(world_size=2, **kwargs):
    args = DPOConfig(bf16=True, per_device_train_batch_size=3, **kwargs)
    return args, load_deepspeed_config(args, world_size=world_size, hidden_size=32)


def test_reference_config_cpu_offload():
    args, policy = _policy()
    ref = reference_deepspeed_config(args, policy)
    assert ref["zero_optimization"]["stage"] == 3
    assert ref["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert ref["zero_optimization"]["stage3_param_persistence_threshold"] == 320
    assert ref["bf16"] == {"enabled": True}
    assert (ref["train_micro_batch_size_per_gpu"], ref["train_batch_size"]) == (3, 6)
    assert "optimizer" not in ref and "scheduler" not in ref and "gradient_clipping" not in ref


def test_reference_config_nvme_offload(tmp_path):
    args, policy = _policy(ref_offload="nvme", ref_nvme_path=str(tmp_path))
    ref = reference_deepspeed_config(args, policy)
    assert ref["zero_optimization"]["offload_param"] == {"device": "nvme", "pin_memory": True,
                                                          "nvme_path": str(tmp_path)}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_reference_config_no_offload(stage):
    args, policy = _policy(ref_offload="none", ref_zero_stage=stage)
    ref = reference_deepspeed_config(args, policy)
    assert ref["zero_optimization"]["stage"] == stage
    assert "offload_param" not in ref["zero_optimization"]
    if stage < 3:
        assert not any(k.startswith("stage3_") for k in ref["zero_optimization"])


def test_reference_config_keeps_policy_untouched_and_optimizer_out(tmp_path):
    path = write_json(tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
                                 "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}})
    args = DPOConfig(deepspeed=path)
    policy = load_deepspeed_config(args, world_size=1)
    before = json.dumps(policy, sort_keys=True)
    ref = reference_deepspeed_config(args, policy)
    assert json.dumps(policy, sort_keys=True) == before
    assert "optimizer" not in ref and "offload_optimizer" not in ref["zero_optimization"]


def test_deepspeed_accepts_filled_configs():
    """DeepSpeed's own parser (independent of ours) reads the policy and reference configs."""
    from deepspeed.runtime.config import DeepSpeedConfig

    args, policy = _policy(world_size=1, gradient_accumulation_steps=2)  # no process group: world size 1
    parsed = DeepSpeedConfig(policy)
    assert (parsed.train_batch_size, parsed.gradient_accumulation_steps) == (6, 2)
    assert parsed.zero_config.stage == 3 and parsed.bfloat16_config.enabled
    ref = DeepSpeedConfig(reference_deepspeed_config(args, policy))
    assert ref.zero_config.offload_param.device == "cpu"
    assert math.isclose(parsed.gradient_clipping, 1.0)


def test_policy_param_offload_below_stage3_is_rejected(tmp_path):
    """DeepSpeed ignores offload_param under ZeRO-1/2; asking for it is an error, not a silent no-op."""
    path = tmp_path / "z2_offload.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}))
    with pytest.raises(ConfigError, match="offload_param.*needs stage 3"):
        load_deepspeed_config(DPOConfig(deepspeed=str(path)), world_size=1)


@pytest.mark.parametrize("name,values", [
    ("lr_scheduler_type", [s.value for s in SchedulerType]),
    ("optim", [o.value for o in OptimizerNames]),
    ("eval_strategy", [s.value for s in IntervalStrategy]),
    ("logging_strategy", [s.value for s in IntervalStrategy]),
    ("save_strategy", [s.value for s in SaveStrategy]),
    ("hub_strategy", [s.value for s in HubStrategy]),
])
def test_every_transformers_value_accepted(name, values):
    """Each value transformers' own enum allows is a valid value here too (e.g. cosine_with_min_lr, epoch, best)."""
    for value in values:
        assert getattr(DPOConfig(**{name: value}), name) == value


def test_evaluation_strategy_is_the_old_name_of_eval_strategy():
    assert DPOConfig(evaluation_strategy="epoch").eval_strategy == "epoch"
    assert DPOConfig(evaluation_strategy="no", eval_strategy="no").eval_strategy == "no"
    with pytest.raises(ConfigError, match="evaluation_strategy='no' and eval_strategy='epoch' disagree"):
        DPOConfig(evaluation_strategy="no", eval_strategy="epoch")


def test_trl_training_argument_defaults():
    """The fields added for the trainer carry TRL 1.16's DPOConfig defaults."""
    trl_defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(trl.DPOConfig)}
    ours = DPOConfig()
    for name in ("optim", "optim_args", "lr_scheduler_kwargs", "save_strategy", "logging_strategy",
                 "logging_first_step", "eval_on_start", "load_best_model_at_end", "metric_for_best_model",
                 "greater_is_better", "save_only_model", "gradient_checkpointing_kwargs", "data_seed",
                 "dataloader_num_workers", "tf32", "torch_empty_cache_steps", "router_aux_loss_coef",
                 "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "hub_token",
                 "f_alpha_divergence_coef", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon"):
        assert getattr(ours, name) == trl_defaults[name], name


def test_torch_dtype_in_model_init_kwargs_saves_as_yaml(tmp_path):
    import torch

    c = DPOConfig(model_init_kwargs={"dtype": torch.bfloat16}, ref_model_init_kwargs={"dtype": torch.float16})
    path = tmp_path / "config.yaml"
    c.save(str(path))  # was yaml.representer.RepresenterError on torch.bfloat16
    assert yaml.safe_load(path.read_text())["model_init_kwargs"] == {"dtype": "bfloat16"}
    assert parse_args(["--config", str(path)]) == c
    assert getattr(torch, c.model_init_kwargs["dtype"]) is torch.bfloat16


def test_chat_template_path_takes_a_hub_id_or_tokenizer_dir(tmp_path):
    assert DPOConfig(chat_template_path="HuggingFaceTB/SmolLM3-3B").chat_template_path == "HuggingFaceTB/SmolLM3-3B"
    assert DPOConfig(chat_template_path=str(tmp_path)).chat_template_path == str(tmp_path)


def test_builtin_deepspeed_default_is_ds_configs_zero3():
    """The package-data copy the library loads equals the ds_configs/zero3.json users see."""
    assert DEFAULT_DEEPSPEED_CONFIG == json.loads((REPO / "ds_configs/zero3.json").read_text())
