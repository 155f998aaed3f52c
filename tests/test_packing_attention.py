"""Packed batches under each attention kernel equal the padded batch: flex attention with a block mask (here,
forward only: PyTorch has no flex backward on CPU; with gradients on a GPU), flash-attn's varlen kernel (GPU),
and which kernel a run picks. sdpa and eager with the block-diagonal mask: test_packing.py."""
import importlib.util
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from dpo_ds.collate import PreferenceCollator
from dpo_ds.engines import PreferenceModel
from dpo_ds.packing import attention_implementation, block_mask, inputs_for, model_inputs
from test_packing import SIZES, random_rows

HAVE_FLASH = importlib.util.find_spec("flash_attn") is not None


def models(*attns: str, device: str = "cpu", dtype=torch.float32) -> list[PreferenceModel]:
    """The same weights under each attention implementation."""
    torch.manual_seed(0)
    config = LlamaConfig(**SIZES)
    state = AutoModelForCausalLM.from_config(config).state_dict()
    out = []
    for attn in attns:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
        model.load_state_dict(state)
        out.append(PreferenceModel(model.to(device).eval()))
    return out


def run_args(**kw):
    return SimpleNamespace(**{**dict(packing=True, prefix_sharing=False, attn_implementation="sdpa",
                                     model_init_kwargs={}, max_length=30, pad_to_multiple_of=None), **kw})


@pytest.mark.slow  # transformers compiles flex attention: inductor's C++ build takes most of a minute on a CPU
@pytest.mark.parametrize("layout", ["padding_free", "prefix_sharing"])
def test_flex_block_mask_gives_the_padded_outputs(layout):
    sdpa, flex = models("sdpa", "flex_attention")
    batch = PreferenceCollator(0)(random_rows(5, seed=11))
    # One packed row: on the CPU, inductor's code for flex attention over several rows fails to compile
    # (torch 2.13); the GPU test below packs several.
    inputs = model_inputs(batch, layout, max_length=200, attn_implementation="flex_attention")
    assert inputs["input_ids"].shape[0] == 1
    inputs["attention_mask"] = block_mask(inputs["attention_mask"])
    with torch.no_grad():
        padded = sdpa(**model_inputs(batch, "padded"))
        packed = flex(**inputs)
    for name in ("logps", "entropy", "mean_logits"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name), atol=1e-5, rtol=0, msg=name)


def test_a_cpu_run_keeps_the_requested_kernel():
    for layout in ({}, {"prefix_sharing": True}, {"packing": False}):
        assert attention_implementation(run_args(**layout), on_gpu=False) == "sdpa"
    assert attention_implementation(run_args(attn_implementation="eager"), on_gpu=False) == "eager"
    batch = PreferenceCollator(0)(random_rows(3, seed=12))
    assert inputs_for(batch, run_args(), "cpu")["attention_mask"].dtype == torch.bool  # sdpa's dense mask


def test_packing_on_a_gpu_takes_flash_varlen_else_flex():
    assert attention_implementation(run_args(), on_gpu=True) == ("flash_attention_2" if HAVE_FLASH
                                                                 else "flex_attention")
    # Prefix sharing needs a mask, which flash-attn cannot take; flex can.
    assert attention_implementation(run_args(prefix_sharing=True), on_gpu=True) == "flex_attention"
    # An explicit other kernel, and padded batches, stay as asked.
    assert attention_implementation(run_args(attn_implementation="eager"), on_gpu=True) == "eager"
    assert attention_implementation(run_args(model_init_kwargs={"attn_implementation": "eager"}),
                                    on_gpu=True) == "eager"
    assert attention_implementation(run_args(packing=False), on_gpu=True) == "sdpa"


def _padded_and_packed_with_grads(packed_model, padded_model, args, batch):
    mask = batch["completion_mask"][:, 1:].float().cuda()
    results = []
    for model, inputs in ((padded_model, {k: v.cuda() for k, v in model_inputs(batch, "padded").items()}),
                          (packed_model, inputs_for(batch, args, "cuda"))):
        model.zero_grad()
        out = model(**inputs)
        ((out.logps * mask).sum(1) * torch.linspace(1, 2, mask.shape[0], device="cuda")).sum().backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    return results


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["padding_free", "prefix_sharing"])
def test_flex_on_gpu_gives_the_padded_outputs_and_gradients(layout):
    sdpa, flex = models("sdpa", "flex_attention", device="cuda")
    args = run_args(packing=layout == "padding_free", prefix_sharing=layout == "prefix_sharing")
    batch = PreferenceCollator(0)(random_rows(6, seed=13))
    assert model_inputs(batch, layout, max_length=30)["input_ids"].shape[0] > 1  # the block mask is per row
    assert type(inputs_for(batch, args, "cuda")["attention_mask"]).__name__ == "BlockMask" or HAVE_FLASH
    args.attn_implementation = "flex_attention"  # this model is flex whatever the selection would pick
    (padded, padded_grads), (packed, packed_grads) = _padded_and_packed_with_grads(flex, sdpa, args, batch)
    torch.testing.assert_close(packed.logps, padded.logps, atol=2e-5, rtol=0)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_FLASH, reason="flash-attn is not installed")
def test_flash_varlen_on_gpu_gives_the_padded_outputs_and_gradients():
    sdpa, flash = models("sdpa", "flash_attention_2", device="cuda", dtype=torch.bfloat16)
    args = run_args(attn_implementation="flash_attention_2")
    batch = PreferenceCollator(0)(random_rows(6, seed=14))
    assert inputs_for(batch, args, "cuda")["attention_mask"] is None  # one row, boundaries from position_ids
    (padded, padded_grads), (packed, packed_grads) = _padded_and_packed_with_grads(flash, sdpa, args, batch)
    torch.testing.assert_close(packed.logps, padded.logps, atol=2e-2, rtol=0)  # bf16: the kernels round differently
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name].float(), grad.float(), atol=5e-2, rtol=5e-2, msg=name)
