"""Vision-language training end to end: 2 CPU ranks under the real deepspeed launcher, ZeRO-3 policy and the
ZeRO-3 CPU-offloaded reference engine, tiny models of each architecture built from config."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vision_models import ARCHITECTURES, build_tiny_vlm, png_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COLOURS = {"red": (200, 10, 10), "green": (10, 190, 20), "blue": (20, 30, 210), "yellow": (240, 230, 10)}


def write_data(directory: Path, n: int = 16) -> Path:
    """JSONL rows whose image is a file path; the chosen answer names the image's colour."""
    names = list(COLOURS)
    with (directory / "prefs.jsonl").open("w") as f:
        for i in range(n):
            colour, wrong = names[i % 4], names[(i + 1) % 4]
            image = directory / f"{i}.png"
            image.write_bytes(png_bytes(COLOURS[colour], (32 + 8 * (i % 3), 40)))
            prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
            f.write(json.dumps({"images": [str(image)], "prompt": prompt,
                                "chosen": [{"role": "assistant", "content": f"It is {colour}."}],
                                "rejected": [{"role": "assistant", "content": f"Maybe {wrong}, or not."}]}) + "\n")
    return directory / "prefs.jsonl"


def probe(base_dir: str, data: str, out: str, *archs: str) -> None:
    """Under the launcher: per architecture, 4 ZeRO-3 steps with a checkpoint at step 2 and the export; for the
    first one also a run resumed from that checkpoint. Rank 0 writes the losses to probe.json."""
    from dpo_ds import distributed
    from dpo_ds.config import DPOConfig
    from dpo_ds.trainer import DPOTrainer
    from vision_models import qwen2_vl_processor

    def config(arch: str, name: str, **kw) -> DPOConfig:
        return DPOConfig(model_name_or_path=f"{out}/{arch}", dataset_name=data, dataset_test_split=None,
                         output_dir=f"{out}/{arch}-{name}", per_device_train_batch_size=2, max_length=None,
                         learning_rate=5e-3, logging_steps=1, lr_scheduler_type="constant", disable_tqdm=True,
                         max_steps=4, save_steps=2, deepspeed=str(ROOT / "ds_configs" / "zero3.json"),
                         ref_zero_stage=3, ref_offload="cpu", **kw)

    def train(arch: str, name: str, **kw) -> list[float]:
        # Qwen2-VL's processor needs torchvision to load from its directory; the real class is handed over.
        processor = qwen2_vl_processor(base_dir) if arch == "qwen2_vl" else None
        trainer = DPOTrainer(args=config(arch, name, **kw), processing_class=processor)
        losses = [h["loss"] for h in trainer.train()["history"]]
        trainer.save_model()
        return losses

    distributed.init()
    results = {}
    for arch in archs:
        results[arch] = {"full": train(arch, "full")}
    first = archs[0]
    results[first]["resumed"] = train(first, "resumed", resume_from_checkpoint=f"{out}/{first}-full/checkpoint-2")
    if distributed.rank() == 0:
        Path(out, "probe.json").write_text(json.dumps(results))
    distributed.shutdown()


def run_probe(tmp_path: Path, builtin_model_dir: str, archs: tuple[str, ...]) -> dict:
    for arch in archs:
        build_tiny_vlm(arch, builtin_model_dir, tmp_path / arch)
    data = write_data(tmp_path)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
           "--master_port", str(29500 + os.getpid() % 1000 + 7), __file__, builtin_model_dir, str(data),
           str(tmp_path), *archs]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((tmp_path / "probe.json").read_text())


@pytest.mark.slow
def test_zero3_offloaded_reference_each_architecture_trains_and_exports_qwen2_vl_resumes(tmp_path,
                                                                                    builtin_model_dir):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from dpo_ds.vision import TOWER_NAMES

    results = run_probe(tmp_path, builtin_model_dir, ARCHITECTURES)
    assert ARCHITECTURES[0] == "qwen2_vl"  # the one that also resumes: its steps 3 and 4 as in the full run
    assert results["qwen2_vl"]["resumed"] == pytest.approx(results["qwen2_vl"]["full"][2:], abs=1e-6)
    for arch in ARCHITECTURES:
        full = results[arch]["full"]
        assert len(full) == 4 and full[0] == pytest.approx(math.log(2), abs=1e-6), arch  # policy == reference
        assert full[-1] < full[0], arch
        export = tmp_path / f"{arch}-full"
        trained = AutoModelForImageTextToText.from_pretrained(export).state_dict()
        start = AutoModelForImageTextToText.from_pretrained(tmp_path / arch).state_dict()
        moved = [k for k in trained if not torch.equal(trained[k], start[k])]
        assert moved and not any(f".{name}." in k for k in moved for name in TOWER_NAMES), arch  # tower frozen
        if arch != "qwen2_vl":  # its processor needs torchvision to load (see vision_models)
            processor = AutoProcessor.from_pretrained(export)
            assert type(processor).__name__ == type(AutoProcessor.from_pretrained(tmp_path / arch)).__name__
    # `dpo-ds export` of a checkpoint: the model and its processor, in one process.
    from dpo_ds.checkpoint import export_checkpoint

    exported = export_checkpoint(tmp_path / "llava-full" / "checkpoint-2", tmp_path / "llava-step2")
    assert type(AutoModelForImageTextToText.from_pretrained(exported)).__name__ == "LlavaForConditionalGeneration"
    assert type(AutoProcessor.from_pretrained(exported)).__name__ == "LlavaProcessor"


if __name__ == "__main__":
    probe(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
