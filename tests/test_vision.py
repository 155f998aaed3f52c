"""Vision-language preference data and models: images, processors, pixel inputs, each supported architecture."""
import io
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, Image as ImageFeature, List
from PIL import Image
from transformers import AutoModelForImageTextToText

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dpo_ds.collate import PreferenceCollator  # noqa: E402
from dpo_ds.config import DPOConfig  # noqa: E402
from dpo_ds.data import DataError, prepare_dataset  # noqa: E402
from dpo_ds.engines import PreferenceModel  # noqa: E402
from dpo_ds.packing import model_inputs  # noqa: E402
from vision_models import ARCHITECTURES, build_tiny_vlm, png_bytes  # noqa: E402

QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]


def answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def vision_rows() -> list[dict]:
    """Three rows of different lengths and image sizes, the second with two images."""
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And these two?"},
                                        {"type": "image"}]}]
    return [
        {"images": [Image.new("RGB", (40, 30), (200, 10, 10))], "prompt": QUESTION,
         "chosen": answer("Red."), "rejected": answer("It is green, I think.")},
        {"images": [Image.new("RGB", (56, 56), (10, 20, 200)), Image.new("RGB", (30, 44), (0, 200, 0))],
         "prompt": two, "chosen": answer("Blue and green, both plain."), "rejected": answer("Grey.")},
        {"images": [Image.new("RGB", (64, 48), (250, 250, 0))], "prompt": QUESTION,
         "chosen": answer("Yellow."), "rejected": answer("Purple, with some blue in the corner.")},
    ]


def image_dataset(rows: list[dict]) -> Dataset:
    """The rows with their images in a `datasets` Image feature (as the hub's VLM sets store them)."""
    return Dataset.from_list(rows).cast_column("images", List(ImageFeature()))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def vlm(request, tmp_path_factory, builtin_model_dir):
    """(arch, model dir, processor) of one tiny architecture."""
    out = tmp_path_factory.mktemp(request.param)
    path, processor = build_tiny_vlm(request.param, builtin_model_dir, out)
    return request.param, path, processor


def tokenize(dataset, processor, **config):
    from dpo_ds.vision import use_processor_template

    args = DPOConfig(**{"max_length": None, **config})
    return prepare_dataset(dataset, use_processor_template(processor, args), args)


def sequence_logps(module, batch) -> torch.Tensor:
    out = module(**model_inputs(batch, "padded"), with_stats=False)
    return (out.logps.double() * batch["completion_mask"][:, 1:]).sum(1)


def hf_sequence_logps(model, processor, row: dict, completion: str) -> float:
    """Independent reference: the processor on the raw row's full conversation, the model's own logits."""
    images = row["images"]
    prompt = processor.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(row["prompt"] + row[completion], tokenize=False)
    assert full.startswith(prompt)
    n_prompt = processor(text=[prompt], images=[images], add_special_tokens=False)["input_ids"][0]
    inputs = processor(text=[full], images=[images], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, :-1].double()
    token = logits.log_softmax(-1).gather(1, inputs["input_ids"][0, 1:, None]).squeeze(1)
    return float(token[len(n_prompt) - 1:].sum())


def test_batch_log_probs_equal_each_row_alone_and_the_model_s_own(vlm):
    arch, path, processor = vlm
    rows = vision_rows()
    data, report = tokenize(image_dataset(rows), processor)
    assert report.rows_kept == 3 and "images" in report.format
    assert [len(images) for images in data["images"]] == [1, 2, 1]
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    module = PreferenceModel(model)
    collator = PreferenceCollator(processor.tokenizer.pad_token_id, processor=processor)
    with torch.no_grad():
        batch = sequence_logps(module, collator([data[i] for i in range(3)]))
        alone = torch.cat([sequence_logps(module, collator([data[i]])) for i in range(3)])
        left = sequence_logps(module, PreferenceCollator(processor.tokenizer.pad_token_id, padding_side="left",
                                                         processor=processor)([data[i] for i in range(3)]))
    # batch: chosen rows, then rejected rows; alone: (chosen, rejected) per row.
    torch.testing.assert_close(batch, alone.view(3, 2).T.reshape(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(left, batch, atol=1e-5, rtol=0)
    expected = [hf_sequence_logps(model, processor, row, part) for part in ("chosen", "rejected") for row in rows]
    torch.testing.assert_close(batch, torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def llava(tmp_path_factory, builtin_model_dir):
    return build_tiny_vlm("llava", builtin_model_dir, tmp_path_factory.mktemp("llava"))


def test_images_as_pil_paths_bytes_and_datasets_dicts_tokenize_alike(llava, tmp_path):
    _, processor = llava
    red = Image.new("RGB", (40, 30), (200, 10, 10))
    encoded = png_bytes((200, 10, 10), (40, 30))
    (tmp_path / "red.png").write_bytes(encoded)
    row = {"prompt": QUESTION, "chosen": answer("Red."), "rejected": answer("Blue.")}
    forms = {
        "pil": image_dataset([{**row, "images": [red]}]),
        "path": Dataset.from_list([{**row, "images": [str(tmp_path / "red.png")]}]),
        "bytes": Dataset.from_list([{**row, "images": [encoded]}]),
        "dict": Dataset.from_list([{**row, "images": [red]}]).cast_column(
            "images", List(ImageFeature(decode=False))),
        "single image column": Dataset.from_list([{**row, "image": red}]).cast_column("image", ImageFeature()),
    }
    tokenized = {name: tokenize(ds, processor)[0][0] for name, ds in forms.items()}
    expected = processor(text=[processor.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)],
                         images=[[red]], add_special_tokens=False)["input_ids"][0]
    image_id = processor.image_token_id
    for name, got in tokenized.items():
        assert got["prompt_ids"] == list(expected), name
        assert got["prompt_ids"].count(image_id) == 4 and image_id not in got["chosen_ids"], name
        assert len(got["images"]) == 1
        assert Image.open(io.BytesIO(got["images"][0])).convert("RGB").tobytes() == red.tobytes(), name


def test_string_prompt_gets_trl_s_image_placement(llava):
    _, processor = llava
    red = Image.new("RGB", (40, 30), (200, 10, 10))
    parts = {"images": [red], "prompt": QUESTION, "chosen": answer("Red."), "rejected": answer("Blue.")}
    plain = {"images": [red], "prompt": [{"role": "user", "content": "What colour is it?"}],
             "chosen": [{"role": "assistant", "content": "Red."}],
             "rejected": [{"role": "assistant", "content": "Blue."}]}
    a, b = (tokenize(image_dataset([row]), processor)[0][0] for row in (parts, plain))
    assert (a["prompt_ids"], a["chosen_ids"], a["rejected_ids"]) == (b["prompt_ids"], b["chosen_ids"],
                                                                       b["rejected_ids"])


def test_bad_images_and_cut_image_tokens_are_bad_rows_naming_row_and_column(llava, builtin_tokenizer):
    _, processor = llava
    red = png_bytes((200, 10, 10), (40, 30))
    good = {"prompt": QUESTION, "chosen": answer("Red."), "rejected": answer("Blue.")}
    rows = [
        {**good, "images": [red]},
        {**good, "images": [b"not an image at all"]},                                   # corrupt
        {**good, "images": [red, red]},                                                 # 2 images, 1 part
        {**good, "images": [red], "chosen": [{"role": "assistant", "content": [{"type": "image"},
                                                                                 *answer("Red.")[0]["content"]]}]},
        {**good, "images": [red], "prompt": [{"role": "system", "content": [{"type": "text",
                                                                            "text": "Be brief. " * 8}]}] + QUESTION},
    ]
    with pytest.raises(DataError) as err:
        tokenize(Dataset.from_list(rows[:4]), processor)
    message = str(err.value)
    assert message.startswith("3 bad row(s)")
    assert "train row 1, column 'images': bad_image: image 0 cannot be decoded" in message
    assert "train row 2, column 'images': bad_image: the processor cannot match" in message
    assert "train row 3, column 'chosen': wrong_type: has an image part: images belong in the prompt" in message
    data, report = tokenize(Dataset.from_list(rows[:4]), processor, on_bad_row="skip")
    assert data["row_index"] == [0] and report.dropped == {"bad_image": 2, "wrong_type": 1}
    # Row 4's prompt: 48 tokens, the image's 4 tokens from token 34 on. Keeping its last 12 would cut them;
    # keeping its last 20 cuts only the system message.
    with pytest.raises(DataError, match="row 0, column 'images': image_tokens_truncated: keeping the last 12 of "
                                        "the prompt's 48 tokens would cut its image tokens .the first is token 34."):
        tokenize(Dataset.from_list(rows[4:]), processor, max_prompt_length=12, max_length=60)
    kept, report = tokenize(Dataset.from_list(rows[4:]), processor, max_prompt_length=20)
    assert report.truncated["prompt"] == 1 and len(kept[0]["prompt_ids"]) == 20
    assert kept[0]["prompt_ids"].count(processor.image_token_id) == 4
    # A text model cannot take images; list-valued text contents are plain text to it.
    with pytest.raises(DataError, match="row 0, column 'images': wrong_type: the row has images, but the model has "
                                        "no image processor"):
        prepare_dataset(Dataset.from_list(rows[:1]), builtin_tokenizer, DPOConfig())
    with pytest.raises(DataError, match="row 0, column 'prompt': wrong_type: message 0 has an image part, but the "
                                        "row has no images column"):
        prepare_dataset(Dataset.from_list([good]), builtin_tokenizer, DPOConfig())
    question = [{"role": "user", "content": [{"type": "text", "text": "What colour "}, {"type": "text",
                                                                                       "text": "is it?"}]}]
    text_parts, _ = prepare_dataset(Dataset.from_list([{**good, "prompt": question}]), builtin_tokenizer,
                                    DPOConfig())
    plain = {"prompt": [{"role": "user", "content": "What colour is it?"}],
             "chosen": [{"role": "assistant", "content": "Red."}],
             "rejected": [{"role": "assistant", "content": "Blue."}]}
    text_plain, _ = prepare_dataset(Dataset.from_list([plain]), builtin_tokenizer, DPOConfig())
    assert text_parts[0]["chosen_ids"] == text_plain[0]["chosen_ids"]
    assert text_parts[0]["prompt_ids"] == text_plain[0]["prompt_ids"] and "images" not in text_parts.column_names


def test_precomputed_reference_cache_covers_the_pixels(llava, tmp_path):
    from dpo_ds.reference import EngineReference, cache_key, precompute
    from dpo_ds.vision import processor_digest

    path, processor = llava
    rows = vision_rows()
    data, _ = tokenize(image_dataset(rows), processor)
    shifted = [dict(row) for row in rows]
    image = rows[2]["images"][0].copy()
    image.putpixel((0, 0), (0, 0, 0))  # one pixel: same size, same token ids
    shifted[2]["images"] = [image]
    other, _ = tokenize(image_dataset(shifted), processor)
    assert [other[i]["prompt_ids"] for i in range(3)] == [data[i]["prompt_ids"] for i in range(3)]
    args = DPOConfig()
    digest = processor_digest(processor)
    assert cache_key(args, data, "m", digest) == cache_key(args, tokenize(image_dataset(rows), processor)[0], "m",
                                                            digest)
    assert cache_key(args, other, "m", digest)["data"] != cache_key(args, data, "m", digest)["data"]
    processor.image_processor.image_mean = [0.0, 0.0, 0.0]  # other pixels from the same images
    try:
        assert processor_digest(processor) != digest
    finally:
        processor.image_processor.image_mean = type(processor.image_processor).image_mean
    assert processor_digest(processor) == digest
    # The cached values are the reference's own, image inputs included.
    module = PreferenceModel(AutoModelForImageTextToText.from_pretrained(path).eval())
    collator = PreferenceCollator(processor.tokenizer.pad_token_id, processor=processor)
    table = precompute(EngineReference(module, None), data, tmp_path / "cache",
                       lambda batch: model_inputs(collator(batch), "padded"), batch_size=2)
    with torch.no_grad():
        direct = sequence_logps(module, collator([data[i] for i in range(3)])).view(2, 3).T
    torch.testing.assert_close(table.double(), direct, atol=1e-5, rtol=0)


def test_vision_tower_frozen_by_default_and_lora_on_the_language_model(llava):
    from dpo_ds.models import load_policy_model
    from dpo_ds.reference import AdapterReference

    path, processor = llava
    full = load_policy_model(path, DPOConfig())
    frozen = {n for n, p in full.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in full.named_parameters() if ".vision_tower." in n} and frozen
    assert all(p.requires_grad for n, p in full.named_parameters() if "multi_modal_projector" in n)
    assert all(p.requires_grad for p in load_policy_model(path, DPOConfig(freeze_vision_tower=False)).parameters())

    lora = DPOConfig(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules="all-linear")
    model = load_policy_model(path, lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".vision_tower." not in n for n in trainable)
    assert any(".language_model." in n for n in trainable) and not any(
        "lora_" in n for n, _ in model.named_parameters() if ".vision_tower." in n)
    with_tower = load_policy_model(path, DPOConfig(freeze_vision_tower=False, **{
        k: getattr(lora, k) for k in ("use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")}))
    assert any("lora_" in n and ".vision_tower." in n for n, p in with_tower.named_parameters() if p.requires_grad)
    # The adapter-disabled reference is the base model, images included.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    data, _ = tokenize(image_dataset(vision_rows()), processor)
    batch = PreferenceCollator(processor.tokenizer.pad_token_id, processor=processor)([data[i] for i in range(3)])
    module = PreferenceModel(model).eval()
    base = PreferenceModel(AutoModelForImageTextToText.from_pretrained(path).eval())
    with torch.no_grad():
        reference = AdapterReference(module, None).token_logps(model_inputs(batch, "padded"))
        adapted = sequence_logps(module, batch)
        expected = sequence_logps(base, batch)
    got = (reference.double() * batch["completion_mask"][:, 1:]).sum(1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (adapted - expected).abs().max() > 1e-3


@pytest.mark.parametrize("layout", ["padding_free", "prefix_sharing"])
def test_packing_and_prefix_sharing_are_refused_before_any_model_loads(llava, layout, monkeypatch):
    from dpo_ds import trainer as trainer_module

    path, _ = llava

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(trainer_module, "load_policy_model", no_model)
    monkeypatch.setattr(trainer_module, "load_model", no_model)
    with pytest.raises(ValueError, match=f"{layout} is not supported for vision-language models"):
        trainer_module.DPOTrainer(model=path, args=DPOConfig(**{layout: True}),
                                  train_dataset=image_dataset(vision_rows()))


def test_precompute_command_refuses_packing_for_a_vision_model(llava):
    from dpo_ds.trainer import DPOTrainer

    path, _ = llava
    with pytest.raises(ValueError, match="padding_free is not supported for vision-language models"):
        DPOTrainer.precompute_reference(DPOConfig(model_name_or_path=path, padding_free=True,
                                                  precompute_ref_log_probs=True))
