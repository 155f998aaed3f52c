"""Tiny vision-language models built from config, with their real processor classes (nothing downloaded).

Each builder takes the built-in SmolLM2 tokenizer, adds the architecture's image special tokens and a ChatML
template that renders ``{"type": "image"}`` parts as the architecture's image placeholder, builds the real
(PIL-backend) image processor and processor classes with small image sizes, and saves a 1-2 layer model
(hidden 32) with the processor into a directory that ``AutoProcessor`` and ``AutoModelForImageTextToText``
load.

Qwen2-VL's processor class requires a video processor, and transformers' video processors need torchvision,
which has no CPU build for this machine's torch: ``qwen2_vl_processor`` builds the real ``Qwen2VLProcessor``
text-and-image code through a subclass without the video attribute. It serves in-process tests
(``processing_class=``); a saved Qwen2-VL directory needs torchvision to load its processor.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer

ARCHITECTURES = ("qwen2_vl", "idefics3", "llava", "gemma3")


def chat_template(image: str) -> str:
    """ChatML whose list-valued contents render text parts as is and image parts as `image`."""
    return (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + image + "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def _tokenizer(base_dir: str, tokens: list[str], **extra):
    tokenizer = AutoTokenizer.from_pretrained(base_dir, **extra)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    return tokenizer


def _text(tokenizer, **over) -> dict:
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, vocab_size=len(tokenizer), max_position_embeddings=512,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
    sizes.update(over)
    return sizes


def qwen2_vl_processor(base_dir: str):
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor without its video processor (see the module docstring)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    tokenizer = _tokenizer(base_dir, ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    images = Qwen2VLImageProcessorPil(size={"shortest_edge": 28 * 28, "longest_edge": 56 * 56})
    return ImageOnlyQwen2VLProcessor(images, tokenizer,
                                     chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>"))


def _qwen2_vl(base_dir: str, out: Path):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    processor = qwen2_vl_processor(base_dir)
    tok = processor.tokenizer
    config = Qwen2VLConfig(
        text_config=_text(tok, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1],
                                                "rope_theta": 10000.0}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2),
        image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
    return Qwen2VLForConditionalGeneration(config), processor


def _idefics3(base_dir: str, out: Path):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = _tokenizer(base_dir, ["<fake_token_around_image>", "<image>", "<end_of_utterance>",
                                      "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7)
                                                         for j in range(1, 7)])
    # 32-pixel tiles of 16-pixel patches, merged by scale_factor 2: one image token per tile.
    images = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(images, tokenizer, image_seq_len=1, chat_template=chat_template("<image>"))
    config = Idefics3Config(
        text_config=dict(model_type="llama", **_text(tokenizer)),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        scale_factor=2, image_token_id=processor.image_token_id)
    return Idefics3ForConditionalGeneration(config), processor


def _llava(base_dir: str, out: Path):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tokenizer = _tokenizer(base_dir, ["<image>"])
    images = LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(images, tokenizer, patch_size=16, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=chat_template("<image>"))
    config = LlavaConfig(
        text_config=dict(model_type="llama", **_text(tokenizer)),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16,
                           projection_dim=32),
        image_token_index=processor.image_token_id, vision_feature_layer=-1,
        vision_feature_select_strategy="default", image_seq_length=4)
    return LlavaForConditionalGeneration(config), processor


def _gemma3(base_dir: str, out: Path):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    special = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = _tokenizer(base_dir, list(special.values()), extra_special_tokens=special)
    images = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = Gemma3Processor(images, tokenizer, image_seq_length=4, chat_template=chat_template("<start_of_image>"))
    config = Gemma3Config(
        text_config=_text(tokenizer, head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                          layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        mm_tokens_per_image=4, image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"))
    return Gemma3ForConditionalGeneration(config), processor


_BUILDERS = {"qwen2_vl": _qwen2_vl, "idefics3": _idefics3, "llava": _llava, "gemma3": _gemma3}


def build_tiny_vlm(arch: str, base_dir: str, out: Path):
    """Save a tiny `arch` model (seed 0) and its processor into `out`; return (out, processor)."""
    torch.manual_seed(0)
    model, processor = _BUILDERS[arch](base_dir, out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out), processor


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    """A small solid-colour PNG image, encoded."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()
