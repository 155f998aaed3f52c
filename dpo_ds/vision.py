"""Vision-language preference data and models: images, the model's processor, pixel inputs.

A row may carry an ``images`` column (one or more images; TRL's ``image`` column holds one) with its prompt
and completions in TRL's vision conversational format: message contents are lists of ``{"type": "image"}``
and ``{"type": "text", "text": ...}`` parts (a prompt given as plain strings gets its image parts before
the first user message's text, as TRL's ``prepare_multimodal_messages`` does). Images are PIL images, file
paths (relative ones from the working directory), encoded bytes, or ``{"bytes", "path"}`` dicts as
``datasets``' ``Image`` feature stores them.

Preprocessing (``dpo_ds.data``) keeps each row's images encoded (``images``: a list of bytes, no pixel
arrays on disk) and tokenizes the prompt once with the model's processor, which expands each image
placeholder into the image's tokens; the completions continue after it as for text. The collator decodes
the images again and runs the processor's image processor per batch (``image_inputs``), and
``PreferenceModel`` hands the pixel tensors to the model's multimodal backbone.

Images appear in the prompt only: an image part in a completion is a bad row.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import os
from typing import Any

import torch
from torch import Tensor

IMAGE_COLUMNS = ("images", "image")
IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes")
"""Image-processor outputs that multimodal backbones take (each is passed only where the forward has it)."""


class ImageError(ValueError):
    """A row's images cannot be used; ``column`` names the column, the message says why."""

    def __init__(self, column: str, detail: str):
        super().__init__(detail)
        self.column = column


def is_processor(obj: Any) -> bool:
    """A multimodal processor (tokenizer + image processor), as opposed to a plain tokenizer."""
    return getattr(obj, "image_processor", None) is not None and getattr(obj, "tokenizer", None) is not None


def is_vision_config(config: Any) -> bool:
    return getattr(config, "vision_config", None) is not None


def auto_model_class(config: Any) -> Any:
    """AutoModelForImageTextToText for a vision-language config, else AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_vision_config(config) else AutoModelForCausalLM


TOWER_NAMES = ("visual", "vision_tower", "vision_model")
"""Names of the image encoder in the backbones transformers builds (Qwen2-VL; LLaVA, Gemma 3; Idefics3)."""


def freeze_vision_tower(model: torch.nn.Module) -> list[str]:
    """Stop gradients to the image encoder of a vision-language model; its module names ([] for a text model).

    The projector from image features to the language model stays trainable.
    """
    if not is_vision_config(getattr(model, "config", None)):
        return []
    names = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in TOWER_NAMES]
    if not names:
        raise ValueError(f"freeze_vision_tower: no module named {' / '.join(TOWER_NAMES)} in "
                         f"{type(model).__name__}; set freeze_vision_tower false")
    for name in names:
        model.get_submodule(name).requires_grad_(False)
    return names


def tower_pattern(names: list[str]) -> str:
    """A PEFT `exclude_modules` regex matching every module inside the given towers."""
    import re

    return "^(" + "|".join(re.escape(name) for name in names) + r")(\..*)?$"


def load_processor(name_or_path: str, args: Any = None) -> Any:
    """The model's ``AutoProcessor``, its tokenizer prepared as ``load_tokenizer`` prepares one.

    ``chat_template_path``, ``eos_token`` and the pad fallback apply to the processor's tokenizer; the
    processor's own chat template (``chat_template.jinja``) renders the rows unless ``chat_template_path``
    replaces it.
    """
    from transformers import AutoProcessor

    from .models import load_tokenizer, resolve_model_path

    path = resolve_model_path(name_or_path)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=bool(getattr(args, "trust_remote_code", False)))
    if not is_processor(processor):
        raise ValueError(
            f"'{name_or_path}' is a vision-language model, but AutoProcessor loaded a {type(processor).__name__} "
            "without an image processor (Qwen2-VL's processor, for one, needs the torchvision package); "
            "install what its processor needs, or pass processing_class=<the processor>")
    processor.tokenizer = load_tokenizer(path, args)
    return use_processor_template(processor, args)


def use_processor_template(processor: Any, args: Any) -> Any:
    """Render rows with the processor's chat template (the one that knows image parts), unless
    ``chat_template_path`` chose one."""
    if not getattr(args, "chat_template_path", None) and processor.chat_template:
        processor.tokenizer.chat_template = processor.chat_template
    return processor


def processor_for(model: Any, processing_class: Any, args: Any) -> Any:
    """The run's vision processor: `processing_class` when it is one, else, for a vision-language model,
    the processor saved with it (`model` is a path / hub id or a model loaded from one); None for a text
    model, which uses its tokenizer."""
    from transformers import AutoConfig

    from .models import adapter_base_path, resolve_model_path

    if processing_class is not None:
        return use_processor_template(processing_class, args) if is_processor(processing_class) else None
    if not isinstance(model, str):
        config, source = getattr(model, "config", None), getattr(model, "name_or_path", None)
        return load_processor(source, args) if is_vision_config(config) else None
    source = resolve_model_path(model)
    source = adapter_base_path(source) or source
    if os.path.isfile(source):  # a GGUF file: text models only
        return None
    config = AutoConfig.from_pretrained(source, trust_remote_code=bool(getattr(args, "trust_remote_code", False)))
    return load_processor(source, args) if is_vision_config(config) else None


def load_processing_class(name_or_path: str, args: Any) -> Any:
    """What tokenizes a run's rows: a vision-language model's processor, else the model's tokenizer."""
    from .models import load_tokenizer

    return processor_for(name_or_path, None, args) or load_tokenizer(name_or_path, args)


def check_layout(args: Any) -> None:
    """Refuse packing and prefix sharing for vision-language models, before any model loads.

    Both lay sequences out with their own position ids, which Qwen2-VL's 3-D rotary positions (computed
    from the image grids) would not follow, and split the image inputs across rows.
    """
    from .packing import layout_name

    layout = layout_name(args)
    if layout != "padded":
        raise ValueError(f"{layout} is not supported for vision-language models (their image inputs and "
                         "Qwen2-VL's 3-D rotary positions need the padded batch): set it to false")


def processor_digest(processor: Any) -> str:
    """SHA-256 of the image processor's settings: they decide the pixels as much as the image bytes do."""
    return hashlib.sha256(processor.image_processor.to_json_string().encode()).hexdigest()


# ----------------------------------------------------------------------------- images

def row_images(row: dict) -> tuple[str, list[bytes]]:
    """(column, encoded images) of a row: ``images`` (a list, or one image) or TRL's ``image``; [] for none."""
    for column in IMAGE_COLUMNS:
        value = row.get(column)
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        return column, [_encode(item, column, i) for i, item in enumerate(values)]
    return "images", []


def _encode(value: Any, column: str, i: int) -> bytes:
    """One image as encoded bytes, checked to decode completely."""
    from PIL import Image

    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        data = buffer.getvalue()
    elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        data = value["bytes"] if value.get("bytes") else _read(value["path"], column, i)
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        data = _read(value, column, i)
    else:
        raise ImageError(column, f"image {i}: expected a PIL image, a file path, bytes or a {{bytes, path}} "
                                 f"dict, got {type(value).__name__}")
    try:
        decode(data)
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... on bad data
        raise ImageError(column, f"image {i} cannot be decoded: {type(exc).__name__}: {exc}") from None
    return data


def _read(path: str, column: str, i: int) -> bytes:
    try:
        with open(os.path.expanduser(path), "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ImageError(column, f"image {i}: cannot read {path}: {exc.strerror or exc}") from None


def decode(data: bytes) -> Any:
    """Encoded bytes -> a fully loaded RGB PIL image."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


# ----------------------------------------------------------------------------- messages

def has_image_parts(messages: list[dict]) -> bool:
    return any(isinstance(m.get("content"), list) and any(_is_image(p) for p in m["content"]) for m in messages)


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image"


def with_image_parts(messages: list[dict], count: int) -> list[dict]:
    """TRL's placement for string-content prompts: `count` image parts before the first user message's text."""
    out, placed = [], False
    for message in messages:
        if message["role"] == "user" and not placed and isinstance(message.get("content"), str):
            message = {**message, "content": [{"type": "image"}] * count + [{"type": "text",
                                                                              "text": message["content"]}]}
            placed = True
        out.append(message)
    return out


def text_of(parts: list[dict]) -> str:
    """The text of a list-valued content without images (what a text-only chat template can render)."""
    return "".join(part.get("text") or "" for part in parts)


# ----------------------------------------------------------------------------- tokens and pixels

def prompt_ids(processor: Any, prompt_text: str, images: list[bytes]) -> list[int]:
    """The rendered prompt's ids with each image placeholder expanded into that image's tokens."""
    try:
        out = processor(text=[prompt_text], images=[[decode(data) for data in images]], add_special_tokens=False)
    except ValueError as exc:  # e.g. "the number of images in the text (2) and images (1) should be the same"
        raise ImageError("images", f"the processor cannot match the prompt's image parts with the row's "
                                   f"{len(images)} image(s): {exc}") from None
    ids = out["input_ids"][0]
    return ids.tolist() if isinstance(ids, Tensor) else list(ids)


def image_inputs(processor: Any, per_sequence: list[list[bytes]]) -> dict[str, Tensor]:
    """The image processor's tensors for a batch's images, in sequence order ({} when it has none).

    Sequences without images are left out: every backbone places image features at its image tokens in
    order, whatever the row.
    """
    images = [[decode(data) for data in sequence] for sequence in per_sequence if sequence]
    if not images:
        return {}
    out = processor.image_processor(images=images, return_tensors="pt")
    return {key: out[key] for key in IMAGE_INPUTS if key in out}


def forward_parameters(module: torch.nn.Module) -> frozenset[str]:
    return frozenset(inspect.signature(module.forward).parameters)
