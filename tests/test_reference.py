"""Reference strategies: precomputed log-probs (cache key, resume, equality with the online engine),
reference-free runs, TR-DPO mixing under ZeRO-3.

The multi-rank part runs this file as a script under the deepspeed launcher (see `probe`).
"""
import gc
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from dpo_ds.collate import PreferenceCollator  # noqa: E402
from dpo_ds.config import DPOConfig  # noqa: E402
from dpo_ds.engines import PreferenceModel, mix_weights, release_gathered, weights_digest  # noqa: E402
from dpo_ds.packing import model_inputs  # noqa: E402
from dpo_ds.reference import (CachedReference, EngineReference, NoReference, build_reference,  # noqa: E402
                              cache_key, dataset_fingerprint, load_table, precompute)
from test_packing import alone_logps, random_rows, tiny  # noqa: E402
from test_trainer import ENV, write_learnable_data  # noqa: E402


class Forbidden(AssertionError):
    pass


def forbidden(*_):
    raise Forbidden("a reference model was requested")


@pytest.mark.parametrize("kw", [dict(loss_type="simpo"), dict(loss_type="cpo"), dict(loss_type="orpo"),
                                dict(loss_type="sigmoid", reference_free=True),
                                dict(loss_type="sigmoid", reference_free=True, use_peft=True)])
def test_reference_free_losses_never_build_a_reference(kw):
    args = DPOConfig(**kw)
    strategy, engine = build_reference(args, policy=None, load_reference=forbidden, ref_ds_config={},
                                       splits={}, batches=forbidden, batch_sizes={}, separate_model=False)
    assert type(strategy) is NoReference and engine is None
    assert strategy.pair_logps({}, None, "train") is None


def test_a_reference_loss_does_ask_for_the_reference_model():
    """The control for the test above: the same call with DPO's sigmoid loss loads a reference."""
    policy = SimpleNamespace(module=SimpleNamespace(model=torch.nn.Linear(1, 1)))
    with pytest.raises(Forbidden):
        build_reference(DPOConfig(loss_type="sigmoid"), policy=policy, load_reference=forbidden,
                        ref_ds_config={}, splits={}, batches=forbidden, batch_sizes={}, separate_model=True)


def test_weights_digest_follows_every_bit_of_every_weight():
    model = tiny("llama", "sdpa")
    base = weights_digest(model.named_parameters())
    assert base == weights_digest(list(model.named_parameters())[::-1])  # order-free
    w = model.model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        old = w[3, 5].clone()
        w[3, 5] = torch.nextafter(old, old + 1)
    assert weights_digest(model.named_parameters()) != base
    with torch.no_grad():
        w[3, 5] = old
    assert weights_digest(model.named_parameters()) == base
    assert weights_digest(model.to(torch.bfloat16).named_parameters()) != base


def rows_dataset(rows: list[dict], row_index: list[int]) -> Dataset:
    """Rows as dpo_ds.data leaves them: with loss masks (the completion scored, unless the row brings its own)."""
    masks = [{"prompt_loss_mask": [0] * len(r["prompt_ids"]), "chosen_loss_mask": [1] * len(r["chosen_ids"]),
              "rejected_loss_mask": [1] * len(r["rejected_ids"])} for r in rows]
    return Dataset.from_list([{**m, **r, "row_index": i} for r, m, i in zip(rows, masks, row_index)])


def test_cache_key_changes_with_data_weights_and_settings():
    rows = random_rows(4, seed=1)
    data = rows_dataset(rows, [0, 1, 2, 3])
    args = DPOConfig(max_length=64)
    key = cache_key(args, data, "m1")
    assert key == cache_key(DPOConfig(max_length=64), rows_dataset(rows, [0, 1, 2, 3]), "m1")
    changed = [dict(r) for r in rows]
    changed[2] = {**changed[2], "chosen_ids": changed[2]["chosen_ids"][:-1] + [changed[2]["chosen_ids"][-1] % 90 + 1]}
    assert dataset_fingerprint(rows_dataset(changed, [0, 1, 2, 3])) != key["data"]
    # The same tokens split differently between prompt and completion are other data.
    moved = [dict(r) for r in rows]
    moved[0] = {**moved[0], "prompt_ids": moved[0]["prompt_ids"] + moved[0]["chosen_ids"][:1],
                "chosen_ids": moved[0]["chosen_ids"][1:]}
    assert dataset_fingerprint(rows_dataset(moved, [0, 1, 2, 3])) != key["data"]
    assert dataset_fingerprint(rows_dataset(rows, [0, 1, 2, 4])) != key["data"]
    # The same tokens, other tokens scored (completion_only_loss=false, assistant_only_loss): other values.
    scored = [dict(r) for r in rows]
    scored[1] = {**scored[1], "prompt_loss_mask": [1] * len(scored[1]["prompt_ids"])}
    assert dataset_fingerprint(rows_dataset(scored, [0, 1, 2, 3])) != key["data"]
    assert cache_key(args, data, "m2") != key
    for other in (dict(max_length=65), dict(max_length=64, temperature=0.7), dict(max_length=64, ld_alpha=0.5),
                  dict(max_length=64, bf16=True), dict(max_length=64, truncation_mode="keep_end"),
                  dict(max_length=64, completion_only_loss=False), dict(max_length=64, assistant_only_loss=True)):
        assert cache_key(DPOConfig(**other), data, "m1") != key, other


def test_precompute_resumes_where_it_stopped_and_matches_each_sequence_alone(tmp_path):
    model = tiny("llama", "sdpa")
    rows = random_rows(7, seed=2)
    data = rows_dataset(rows, [0, 2, 3, 5, 6, 8, 9])  # row_index as left by dropped rows: with gaps
    collator = PreferenceCollator(0)
    calls = []

    def batches(batch_rows, stop_after=None):
        calls.append(len(batch_rows))
        if stop_after is not None and len(calls) > stop_after:
            raise KeyboardInterrupt
        return model_inputs(collator(batch_rows), "padded")

    source = EngineReference(model, ld_alpha=None)
    with pytest.raises(KeyboardInterrupt):
        precompute(source, data, tmp_path, lambda r: batches(r, stop_after=2), batch_size=2, flush_rows=2)
    assert len(list(tmp_path.glob("part-*.pt"))) == 2  # two finished batches, kept
    with pytest.raises(RuntimeError, match="lacks 3 rows"):
        load_table(tmp_path, list(data["row_index"]))
    calls.clear()
    table = precompute(source, data, tmp_path, batches, batch_size=2, flush_rows=2)
    assert calls == [2, 1]  # only the 3 rows not yet cached
    alone = alone_logps(model, rows)
    for k, row_index in enumerate(data["row_index"]):
        torch.testing.assert_close(table[row_index].double(), torch.stack([alone[k].sum(), alone[7 + k].sum()]),
                                   atol=1e-5, rtol=0)
    assert table[1].isnan().all() and table[4].isnan().all()  # rows that do not exist


def test_cached_reference_reads_rows_and_names_missing_ones(tmp_path):
    table = torch.tensor([[-1.0, -2.0], [float("nan")] * 2, [-3.0, -4.0]])
    cached = CachedReference({"train": table}, {"train": tmp_path})
    batch = PreferenceCollator(0)([{"prompt_ids": [1], "chosen_ids": [2, 3], "rejected_ids": [4]},
                                   {"prompt_ids": [1], "chosen_ids": [5], "rejected_ids": [6, 7, 8]}])
    out = cached.pair_logps(batch, torch.tensor([2, 0]), "train")
    assert out.chosen.tolist() == [-3.0, -1.0] and out.rejected.tolist() == [-4.0, -2.0]
    assert out.chosen_lengths.tolist() == [2.0, 1.0] and out.rejected_lengths.tolist() == [1.0, 3.0]
    with pytest.raises(RuntimeError, match=r"no values for train rows \[1, 7\]"):
        cached.pair_logps(batch, torch.tensor([1, 7]), "train")


def test_precompute_ref_command_help_and_reference_free_refusal(capsys):
    from dpo_ds.cli import main

    assert main(["precompute-ref", "--help"]) == 0
    assert "usage: dpo-ds precompute-ref" in capsys.readouterr().out
    assert main(["precompute-ref", "--loss_type", "simpo"]) == 1
    assert "uses no reference model: there is nothing to precompute" in capsys.readouterr().err


def test_mix_weights_is_the_tr_dpo_update():
    policy, ref = tiny("llama", "sdpa"), tiny("llama", "sdpa")
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p))
    expected = {n: 0.6 * p.double() + 0.4 * r.double()
                for (n, p), r in zip(policy.named_parameters(), ref.parameters())}
    mix_weights(ref, policy, 0.6)
    for n, r in ref.named_parameters():
        torch.testing.assert_close(r.double(), expected[n], atol=1e-6, rtol=0)


def test_tr_dpo_reference_syncs_every_n_steps_and_survives_a_checkpoint(tmp_path):
    policy, ref = tiny("llama", "sdpa"), tiny("llama", "sdpa")
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    strategy = EngineReference(ref, None, policy=policy, alpha=0.5, sync_every=3)
    before = {n: p.clone() for n, p in ref.named_parameters()}
    for step in (1, 2):
        strategy.after_step(step)
    assert all(torch.equal(p, before[n]) for n, p in ref.named_parameters())
    strategy.after_step(3)
    moved = {n: p.clone() for n, p in ref.named_parameters()}
    assert not torch.equal(moved["model.lm_head.weight"], before["model.lm_head.weight"])
    strategy.save(tmp_path)
    strategy.after_step(6)
    strategy.load(tmp_path)
    assert all(torch.equal(p, moved[n]) for n, p in ref.named_parameters())
    with pytest.raises(FileNotFoundError, match="same number of ranks"):
        strategy.load(tmp_path / "elsewhere")


# ----------------------------------------------------------------------------- 2 ranks, ZeRO-3


@pytest.mark.slow
def test_zero3_precomputed_prefix_shared_run_equals_online_padded_run(tmp_path, tiny_model_dir):
    data = write_learnable_data(tmp_path / "prefs.jsonl", 40, seed=0)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
           "--master_port", str(29500 + (os.getpid() + 7) % 1000), __file__, tiny_model_dir, str(data), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads((tmp_path / "probe.json").read_text())
    online, cached = got["online"], got["precomputed"]
    assert online["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert online["losses"][-1] < online["losses"][0]  # training moved the policy away from the reference
    assert cached["losses"] == pytest.approx(online["losses"], abs=1e-5)
    assert cached["eval_loss"] == pytest.approx(online["eval_loss"], abs=1e-5)
    # No reference model in memory while training: one more PreferenceModel (the policy) and no reference engine.
    assert cached["new_models"] == 1 and not cached["reference_engine"]
    assert cached["cache_files"] == 2 and got["splits"] == ["eval", "train"]  # each split with its key.json
    assert got["rerun_computed_nothing"]
    # Under ZeRO-3 the local tensors are empty; the digest is still that of the real weights.
    assert got["local_numel"] == 0
    plain = PreferenceModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert got["zero3_digest"] == weights_digest(plain.named_parameters())
    assert got["key_digests"] == [got["zero3_digest"]]
    assert got["mix_error"] < 1e-6 and got["mix_moved"] > 0
    assert got["restore_error"] == 0


def probe(model_dir: str, data: str, out: str) -> None:
    """Under the launcher: an online run, a precomputed run, and ZeRO-3 digest / TR-DPO checks."""
    import deepspeed

    from dpo_ds import distributed
    from dpo_ds.trainer import DPOTrainer

    def config(name: str, **kw) -> DPOConfig:
        return DPOConfig(model_name_or_path=model_dir, dataset_name=data, dataset_test_split=None,
                         eval_fraction=0.2, output_dir=f"{out}/{name}", per_device_train_batch_size=2,
                         per_device_eval_batch_size=3, max_length=48, max_prompt_length=32, learning_rate=3e-3,
                         logging_steps=1, lr_scheduler_type="constant", disable_tqdm=True, max_steps=3,
                         save_steps=None, eval_strategy="steps", eval_steps=100, deepspeed=str(ROOT / "ds_configs" / "zero3.json"),
                         ref_zero_stage=3, ref_offload="cpu", **kw)

    def models() -> int:
        gc.collect()
        return sum(isinstance(o, PreferenceModel) for o in gc.get_objects())

    def run(trainer) -> dict:
        result = trainer.train()
        return {"losses": [h["loss"] for h in result["history"]], "eval_loss": result["eval"]["eval_loss"]}

    distributed.init()
    rank = torch.distributed.get_rank()
    online = DPOTrainer(args=config("online"))
    results = {"online": run(online)}
    # `dpo-ds precompute-ref`'s pass (a separate ZeRO-3 offloaded inference engine, batch 3, packed rows); the
    # training run below must then find every value cached: same key from its own policy engine, nothing
    # recomputed. That run trains on prefix-shared batches: its losses must still be the padded online run's.
    cache = f"{out}/cache"
    directories = DPOTrainer.precompute_reference(config("cli", precompute_ref_log_probs=True,
                                                         precompute_ref_batch_size=3, ref_cache_dir=cache,
                                                         packing=True))
    parts = sorted(Path(cache).glob("*/part-*.pt"))
    stamps = [p.stat().st_mtime_ns for p in parts]
    before = models()
    cached = DPOTrainer(args=config("cached", precompute_ref_log_probs=True, ref_cache_dir=cache,
                                    prefix_sharing=True))
    after = sorted(Path(cache).glob("*/part-*.pt"))
    results["rerun_computed_nothing"] = bool(parts) and after == parts and [
        p.stat().st_mtime_ns for p in after] == stamps
    results["splits"] = sorted(directories)
    policy = cached.engines.policy.module  # untrained yet: the weights the cache key was computed from
    results["local_numel"] = max(p.data.numel() for p in policy.parameters())
    results["zero3_digest"] = weights_digest(policy.named_parameters())
    results["key_digests"] = sorted({json.loads(k.read_text())["model"] for k in Path(cache).glob("*/key.json")})
    results["precomputed"] = {**run(cached), "new_models": models() - before,
                              "reference_engine": cached.engines.reference is not None,
                              "cache_files": len(list(Path(cache).glob("*/key.json")))}

    # TR-DPO: the online run's reference engine mixed towards its trained policy, one parameter at a time.
    release_gathered(online.engines.reference)
    release_gathered(online.engines.policy)
    ref, pol = online.engines.reference.module, online.engines.policy.module

    def full(module) -> dict:
        state = {}
        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                state[name] = p.data.double().clone()
        return state

    start, target = full(ref), full(pol)
    mix_weights(ref, pol, 0.6)
    mixed = full(ref)
    results["mix_error"] = max((mixed[n] - (0.6 * target[n] + 0.4 * start[n])).abs().max().item() for n in mixed)
    results["mix_moved"] = max((mixed[n] - start[n]).abs().max().item() for n in mixed)
    # A checkpoint holds the moved reference: each rank its own ZeRO-3 partitions.
    tr_dpo = EngineReference(online.engines.reference, None, online.engines.policy, alpha=0.6, sync_every=1)
    tr_dpo.save(Path(out, "tr_dpo"))
    tr_dpo.after_step(1)
    tr_dpo.load(Path(out, "tr_dpo"))
    restored = full(ref)
    results["restore_error"] = max((restored[n] - mixed[n]).abs().max().item() for n in mixed)
    if rank == 0:
        Path(out, "probe.json").write_text(json.dumps(results))
    distributed.shutdown()


if __name__ == "__main__":
    probe(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
