"""dpo_ds.metrics: cross-rank weighted means (two real gloo processes) and the sinks."""
import importlib.util
import json
import logging
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dpo_ds.losses import LossOutput, PairLogps
from dpo_ds.metrics import MeanAccumulator, MetricsSink, pair_metrics, token_metrics

# Per rank: micro-batches of token sums/counts, and one batch of pairs. Ranks have unequal token and
# pair counts, so a mean of per-rank means would differ from the global weighted mean.
TOKEN_BATCHES = {
    0: [dict(entropy_sum=6.0, entropy_count=3, top1_sum=2, top1_count=3, chosen_logit_sum=1.5, chosen_count=2,
             rejected_logit_sum=-1.0, rejected_count=1),
        dict(entropy_sum=4.0, entropy_count=1, top1_sum=1, top1_count=1, chosen_logit_sum=0.5, chosen_count=1,
             rejected_logit_sum=0.0, rejected_count=0)],
    1: [dict(entropy_sum=10.0, entropy_count=6, top1_sum=0, top1_count=4, chosen_logit_sum=3.0, chosen_count=4,
             rejected_logit_sum=2.0, rejected_count=2)],
}
PAIRS = {
    0: dict(per_pair=[0.4, 0.8], chosen_rewards=[0.5, -0.25], rejected_rewards=[0.1, 0.0],
            chosen=[-10.0, -20.0], rejected=[-12.0, -15.0]),
    1: dict(per_pair=[1.0, 0.5, 0.6], chosen_rewards=[0.2, 0.3, -0.1], rejected_rewards=[0.3, 0.1, -0.1],
            chosen=[-5.0, -6.0, -7.0], rejected=[-8.0, -9.0, -10.0]),
}
# Worked by hand from the tables above.
EXPECTED = {
    "entropy": (6 + 4 + 10) / (3 + 1 + 6),  # 2.0, not mean(10/4, 10/6)
    "mean_token_accuracy": (2 + 1 + 0) / (3 + 1 + 4),  # 0.375
    "logits/chosen": (1.5 + 0.5 + 3.0) / (2 + 1 + 4),
    "logits/rejected": (-1.0 + 0.0 + 2.0) / (1 + 0 + 2),
    "loss": (0.4 + 0.8 + 1.0 + 0.5 + 0.6) / 5,  # 0.66, not mean(0.6, 0.7)
    "rewards/chosen": (0.5 - 0.25 + 0.2 + 0.3 - 0.1) / 5,
    "rewards/rejected": (0.1 + 0.0 + 0.3 + 0.1 - 0.1) / 5,
    "rewards/accuracies": 2 / 5,  # 0.5>0.1 and 0.3>0.1; the tie -0.1 vs -0.1 is not a win
    "rewards/margins": ((0.5 - 0.25 + 0.2 + 0.3 - 0.1) - (0.1 + 0.0 + 0.3 + 0.1 - 0.1)) / 5,
    "logps/chosen": (-10 - 20 - 5 - 6 - 7) / 5,
    "logps/rejected": (-12 - 15 - 8 - 9 - 10) / 5,
}


def _add_rank_metrics(acc, rank):
    pairs = PAIRS[rank]
    per_pair = torch.tensor(pairs["per_pair"])
    out = LossOutput(per_pair.mean(), per_pair, torch.tensor(pairs["chosen_rewards"]),
                     torch.tensor(pairs["rejected_rewards"]))
    n = len(pairs["chosen"])
    policy = PairLogps(torch.tensor(pairs["chosen"]), torch.tensor(pairs["rejected"]), torch.ones(n), torch.ones(n))
    batches = TOKEN_BATCHES[rank]
    if rank == 1:  # a different order of names on each rank must not matter
        pair_metrics(acc, out, policy)
    for batch in batches:
        token_metrics(acc, **{k: torch.tensor(v) if k.endswith("sum") else v for k, v in batch.items()})
    if rank == 0:
        pair_metrics(acc, out, policy)


def _worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        calls = []
        real_all_reduce = dist.all_reduce

        def counting_all_reduce(*args, **kwargs):
            calls.append(args[0].numel())
            return real_all_reduce(*args, **kwargs)

        dist.all_reduce = counting_all_reduce
        acc = MeanAccumulator()
        _add_rank_metrics(acc, rank)
        result = acc.reduce()
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"metrics": result, "all_reduce_calls": calls}, f)
    finally:
        dist.all_reduce = real_all_reduce
        dist.destroy_process_group()


@pytest.mark.slow  # starts two ranks
def test_two_rank_reduction_is_globally_weighted(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["all_reduce_calls"] == [2 * len(EXPECTED)]  # one all-reduce of every sum and count
        assert got["metrics"].keys() == EXPECTED.keys()
        for name, value in EXPECTED.items():
            assert got["metrics"][name] == pytest.approx(value, abs=1e-6), name


def test_single_process_reduce():
    acc = MeanAccumulator()
    acc.add("a", 3.0, 2)
    acc.add("a", torch.tensor(5.0), torch.tensor(2))
    acc.add("empty", 0.0, 0)
    assert acc.reduce() == {"a": 2.0, "empty": 0.0}
    assert MeanAccumulator().reduce() == {}


def test_large_token_counts_stay_exact():
    acc = MeanAccumulator()
    for _ in range(3):  # float32 cannot hold 3 * (2**24 + 1) exactly
        acc.add("n", torch.tensor(2**24 + 1, dtype=torch.long), 1)
    assert acc.reduce()["n"] == 2**24 + 1


def test_accumulator_rejects_non_scalars():
    acc = MeanAccumulator()
    with pytest.raises(ValueError, match="'x': total"):
        acc.add("x", torch.ones(3), 3)
    with pytest.raises(TypeError, match="'x': count"):
        acc.add("x", 1.0, "3")


def test_pair_metrics_prefix():
    acc = MeanAccumulator()
    per_pair = torch.tensor([1.0, 3.0])
    out = LossOutput(per_pair.mean(), per_pair, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    pair_metrics(acc, out, PairLogps(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]),
                                     torch.ones(2), torch.ones(2)), prefix="eval_")
    got = acc.reduce()
    assert got["eval_loss"] == 2.0 and got["eval_rewards/accuracies"] == 0.5 and got["eval_logps/chosen"] == -2.0
    assert all(name.startswith("eval_") for name in got)


# ---------------------------------------------------------------- sinks
def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_sink_appends_one_object_per_call(tmp_path):
    with MetricsSink(tmp_path, report_to="none") as sink:
        assert sink.trackers == []
        sink.log({"loss": torch.tensor(0.5), "epoch": 0.25, "global_step": 1}, step=1)
        sink.log({"loss": float("nan"), "grad_norm": math.inf}, step=2)
        # flushed at once: readable before close
        assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 2
    with MetricsSink(tmp_path, report_to=[]) as sink:
        sink.log({"loss": 0.25}, step=3)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows == [
        {"step": 1, "loss": 0.5, "epoch": 0.25, "global_step": 1},
        {"step": 2, "loss": None, "grad_norm": None},
        {"step": 3, "loss": 0.25},
    ]


def test_tensorboard_sink_event_file_reads_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = MetricsSink(tmp_path, report_to=["tensorboard"], run_name="run1", config={"beta": 0.1})
    assert sink.trackers == ["tensorboard"]
    sink.log({"loss": 0.75, "rewards/margins": torch.tensor(0.125), "note": "text is not a scalar"}, step=10)
    sink.log({"loss": 0.5, "rewards/margins": 0.25}, step=20)
    sink.close()
    sink.close()
    events = EventAccumulator(str(tmp_path / "runs" / "run1"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "rewards/margins"}
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(10, 0.75), (20, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("rewards/margins")] == [(10, 0.125), (20, 0.25)]
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 2


@pytest.mark.parametrize("tracker", ["wandb", "trackio"])
def test_requested_tracker_not_installed_warns_once(tmp_path, caplog, tracker):
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed")
    with caplog.at_level(logging.WARNING, logger="dpo_ds.metrics"):
        sink = MetricsSink(tmp_path, report_to=[tracker, "tensorboard"])
        assert sink.trackers == ["tensorboard"]
        sink.log({"loss": 1.0}, step=1)
        sink.log({"loss": 1.0}, step=2)
        sink.close()
    warnings = [r for r in caplog.records if tracker in r.getMessage()]
    assert len(warnings) == 1
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 2


def test_report_to_all_uses_installed_trackers_silently(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with caplog.at_level(logging.WARNING, logger="dpo_ds.metrics"):
        with MetricsSink(tmp_path, report_to="all") as sink:
            installed = [n for n in ("tensorboard", "wandb", "trackio") if importlib.util.find_spec(n) is not None]
            assert sink.trackers == installed
    assert not caplog.records


def test_unknown_report_to_raises(tmp_path):
    with pytest.raises(ValueError, match="report_to.*mlflow"):
        MetricsSink(tmp_path, report_to=["mlflow"])


def test_pair_metrics_weights_exclude_filler_pairs():
    """A pair with weight 0 (eval padding) changes no pair metric; the others are exact means."""
    out = LossOutput(torch.tensor(0.0), torch.tensor([1.0, 3.0, 100.0]), torch.tensor([0.5, -1.0, 9.0]),
                     torch.tensor([0.0, 1.0, -9.0]))
    policy = PairLogps(torch.tensor([-1.0, -3.0, 50.0]), torch.tensor([-2.0, -2.0, 50.0]),
                       torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0]))
    acc = MeanAccumulator()
    pair_metrics(acc, out, policy, weights=torch.tensor([1.0, 1.0, 0.0]))
    got = acc.reduce()
    assert got["loss"] == 2.0
    assert got["rewards/accuracies"] == 0.5  # 0.5 > 0 wins, -1 < 1 loses; the filler's win is ignored
    assert got["rewards/margins"] == (0.5 + -2.0) / 2
    assert got["logps/chosen"] == -2.0 and got["logps/rejected"] == -2.0


# --- throughput and MFU ----------------------------------------------------------------------

# A 2-layer Llama: hidden 32, 4 heads of 8 dims, 2 KV heads, MLP 64, vocabulary 97, tied head.
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=97, tie_word_embeddings=True)


def _hand_forward_flops(s: int, vocab: int = 97) -> int:
    """One forward's FLOPs per token of TINY at sequence length s, from the dimensions alone."""
    h, layers, heads, kv, d, inter = 32, 2, 4, 2, 8, 64
    per_layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * inter  # q, k+v, o, gate+up+down
    n = layers * per_layer + vocab * h  # the tied head is a matmul; the embedding lookup is not
    return 2 * n + 4 * layers * heads * d * s  # QK^T and AV: 2 FLOPs per multiply-add each


def test_mfu_by_hand_for_a_tiny_model_with_a_given_peak():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dpo_ds.metrics import Throughput

    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY))
    lengths = [5, 7, 7, 12]  # real tokens of four sequences (padding never counts)
    seconds, world, peak = 0.25, 2, 1e-6
    # Policy: forward + backward (2 forwards) + recompute (1); the reference: 1 forward of its own.
    expected = sum(s * 5 * _hand_forward_flops(s) for s in lengths) / (seconds * world * peak * 1e12)
    got = Throughput(model, reference=model, recompute=True, peak_tflops=peak).metrics(
        sum(lengths), sum(s * s for s in lengths), seconds, world)
    assert got["mfu"] == pytest.approx(expected, rel=1e-12)
    assert got["tokens_per_second_per_device"] == pytest.approx(31 / 0.5)
    # Without recomputation and reference: 3 forwards per token.
    plain = Throughput(model, peak_tflops=peak).metrics(31, sum(s * s for s in lengths), seconds, world)
    assert plain["mfu"] == pytest.approx(sum(s * 3 * _hand_forward_flops(s) for s in lengths) / 0.5e6, rel=1e-12)


def test_no_mfu_on_cpu_without_a_peak():
    from transformers import LlamaConfig

    from dpo_ds.metrics import Throughput

    got = Throughput(LlamaConfig(**TINY), device="cpu").metrics(100, 2500, 2.0, 1)
    assert got == {"tokens_per_second_per_device": 50.0}


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.05), ("NVIDIA A10G", 125.0),
    ("NVIDIA GeForce RTX 4090", 165.2), ("AMD Instinct MI300X", 1307.4), ("NVIDIA GeForce GTX 1080", None),
])
def test_peak_bf16_tflops_by_device_name(name, peak):
    from dpo_ds.metrics import peak_bf16_tflops

    assert peak_bf16_tflops(name) == peak


def test_peak_tflops_must_be_positive():
    from dpo_ds.config import ConfigError, DPOConfig

    with pytest.raises(ConfigError, match="peak_tflops"):
        DPOConfig(peak_tflops=0)


@pytest.mark.slow
def test_trainer_logs_mfu_and_per_device_throughput(tmp_path, tiny_model_dir, builtin_tokenizer):
    """Two CPU ranks, peak_tflops given: every logged mfu is the hand count over the logged rate.

    Every row has the same prompt and one-token answers, so every sequence has the same length L,
    which the log itself gives (tokens over sequences) and which must be a whole number."""
    from test_trainer import read_metrics, run_train

    assert len(builtin_tokenizer(" yes")["input_ids"]) == len(builtin_tokenizer(" no")["input_ids"]) == 1
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": "Is water wet?", "chosen": " yes", "rejected": " no"}) + "\n"
                            for _ in range(16)))
    run_train(tmp_path, tiny_model_dir, "--max_steps", "2", "--save_steps", "none", "--peak_tflops", "1e-6",
              "--gradient_checkpointing", "false")  # no recompute: the hand count below
    rows = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2
    for row in rows:
        length = row["tokens_per_second"] / (2 * row["samples_per_second"])
        assert length == pytest.approx(round(length), abs=1e-6) and length > 3
        assert row["tokens_per_second_per_device"] == pytest.approx(row["tokens_per_second"] / 2)
        # Online reference, no recomputation: 3 policy forwards + 1 reference forward per token.
        vocab = len(builtin_tokenizer)
        expected = row["tokens_per_second_per_device"] * 4 * _hand_forward_flops(round(length), vocab) / 1e6
        assert row["mfu"] == pytest.approx(expected, rel=1e-9)
