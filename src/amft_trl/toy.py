"""An offline toy setup: a tokenizer trained on the fly, a tiny random Qwen2, and an addition task.

Used by `make demo` and by the test-suite fixtures (`tests/conftest.py`), so both run with no hub access.
Nothing here is meant to be a good model: it is small enough to train for a few hundred steps on a laptop CPU.
"""

from __future__ import annotations

import random
import re

from amft_trl._completions import completion_to_text

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        f"Compute {a} + {b} = {a + b}. The answer is {a + b}."
        for a, b in ((rng.randint(0, 20), rng.randint(0, 20)) for _ in range(n))
    ]


def build_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in about a second on arithmetic text, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, seed: int = 0, hidden_size: int = 32, num_layers: int = 2):
    """A tiny random Qwen2 (about 30k parameters at the defaults) sized to `tokenizer`."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return AutoModelForCausalLM.from_config(config)


def addition_prompts(n: int, seed: int, conversational: bool = False, max_operand: int = 20):
    """RL / validation prompts `Compute a + b =` with the gold sum in column `answer`."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        prompt = f"Compute {a} + {b} ="
        rows.append(
            {
                "prompt": [{"role": "user", "content": prompt}] if conversational else prompt,
                "answer": str(a + b),
            }
        )
    return Dataset.from_list(rows)


def addition_demos(n: int, seed: int, conversational: bool = False, max_operand: int = 20):
    """SFT demonstrations for the addition task, in TRL's prompt-completion format."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        prompt, completion = f"Compute {a} + {b} =", f" {a + b}. The answer is {a + b}."
        if conversational:
            prompt = [{"role": "user", "content": prompt}]
            completion = [{"role": "assistant", "content": completion}]
        rows.append({"prompt": prompt, "completion": completion})
    return Dataset.from_list(rows)


def addition_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 when the first number in the completion is the gold sum, else 0.0."""
    out = []
    for completion, gold in zip(completions, answer, strict=True):
        match = re.search(r"-?\d+", completion_to_text(completion))
        out.append(1.0 if match is not None and match.group() == gold else 0.0)
    return out


def digit_fraction_reward(completions: list, **kwargs) -> list[float]:
    """A dense toy reward (fraction of digit characters), so advantages are non-zero even on a random model."""
    out = []
    for completion in completions:
        text = completion_to_text(completion)
        out.append(sum(ch.isdigit() for ch in text) / max(len(text), 1))
    return out


# ------------------------------------------------------------------------------------------------------------------
# A tiny vision-language model (LLaVA layout) with its processor, built offline
# ------------------------------------------------------------------------------------------------------------------
IMAGE_TOKEN = "<image>"

#: A chat template with image parts (`{"type": "image"}` renders as the processor's `<image>` token, which the
#: processor expands to one token per image patch) and text parts; plain-string contents are accepted too.
VLM_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_vlm_processor(vocab_size: int = 300, image_size: int = 16, patch_size: int = 8):
    """A LLaVA processor: `build_tokenizer`'s tokenizer plus an `<image>` token, and the PIL CLIP image processor.

    Needs no torchvision and no hub. Each image becomes `(image_size / patch_size) ** 2` `<image>` tokens (4 at the
    defaults): the processor expands the one `<image>` the chat template writes per image part.
    """
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tokenizer = build_tokenizer(vocab_size)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = VLM_CHAT_TEMPLATE
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",  # the CLS feature is dropped: one token per patch
        num_additional_image_tokens=1,
        chat_template=VLM_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


#: Qwen's chat-format tokens the tool-calling tiny VLM adds (Qwen3-VL's template writes them).
QWEN_CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]


def build_tool_vlm_processor(vocab_size: int = 300, image_size: int = 16, patch_size: int = 8):
    """`build_vlm_processor`'s tiny LLaVA processor with Qwen3-VL's chat template (TRL's copy,
    `trl.chat_template_utils.qwen3_vl_chat_template`), which renders tools, tool calls (`<tool_call>` blocks) and
    tool replies (`<tool_response>`, text or image parts), and which TRL recognises: `add_response_schema` gives it
    the Qwen3 response parser, so `GRPOTrainer`'s multi-turn loop (`tools` / `environment_factory`) parses its tool
    calls.

    The template's image placeholder `<|vision_start|><|image_pad|><|vision_end|>` holds the processor's image token
    (`<|image_pad|>`, expanded to one token per patch); `<|im_end|>` ends each turn and is the EOS token. Its image
    processor returns `pixel_values` as a torch tensor, as Qwen2-VL's torchvision processor does (TRL's tool loop
    needs it). It is not reloadable with `AutoProcessor.from_pretrained`: pass the object itself.
    """
    from transformers import CLIPImageProcessorPil, LlavaProcessor
    from trl.chat_template_utils import qwen3_vl_chat_template

    class CLIPImageProcessorTensors(CLIPImageProcessorPil):
        """Returns `pixel_values` as one torch tensor even when no `return_tensors` is asked for, as Qwen2-VL's
        torchvision image processor does: TRL 1.16's tool-calling loop needs that (it splits `pixel_values` per
        prompt with `split_pixel_values_by_grid`), and the PIL processors return numpy arrays."""

        def preprocess(self, images, *args, **kwargs):
            if kwargs.get("return_tensors") is None:
                kwargs["return_tensors"] = "pt"
            return super().preprocess(images, *args, **kwargs)

    tokenizer = build_tokenizer(vocab_size)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_CHAT_TOKENS})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = qwen3_vl_chat_template
    image_processor = CLIPImageProcessorTensors(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=qwen3_vl_chat_template,
        image_token="<|image_pad|>",
    )


def build_vlm(processor, seed: int = 0, hidden_size: int = 32, num_layers: int = 2, init_std: float = 0.2):
    """A tiny random LLaVA sized to `processor`: a 1-layer CLIP vision tower and a small Llama language model.

    `init_std` (the configs' `initializer_range`) is larger than transformers' 0.02 so that, untrained, the images
    visibly change the model's outputs (with 0.02 the policy is almost uniform and blind to them)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    image_size = processor.image_processor.crop_size["height"]
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=processor.patch_size,
        projection_dim=hidden_size,
        initializer_range=init_std,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        initializer_range=init_std,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(processor.image_token),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def toy_image(seed: int, size: int = 16):
    """A small deterministic RGB image (PIL) of random coloured blocks."""
    from PIL import Image

    rng = random.Random(seed)
    image = Image.new("RGB", (size, size))
    block = max(size // 4, 1)
    for x in range(0, size, block):
        for y in range(0, size, block):
            colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
            image.paste(colour, (x, y, x + block, y + block))
    return image


def image_addition_prompts(n: int, seed: int, max_operand: int = 20):
    """Conversational addition prompts each with one image (`image` column), gold sum in `answer`."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Compute {a} + {b} ="}],
                "image": toy_image(seed * 100_003 + i),
                "answer": str(a + b),
            }
        )
    return Dataset.from_list(rows)


def image_addition_demos(n: int, seed: int, layout: str = "prompt_completion", max_operand: int = 20):
    """Image demonstrations in TRL's VLM SFT formats: `prompt`/`completion` (or `messages`) plus `images`."""
    from datasets import Dataset

    if layout not in ("prompt_completion", "messages"):
        raise ValueError(f"layout must be 'prompt_completion' or 'messages', got {layout!r}")
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        user = {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": f"Compute {a} + {b} ="}],
        }
        answer = {
            "role": "assistant",
            "content": [{"type": "text", "text": f" {a + b}. The answer is {a + b}."}],
        }
        images = [toy_image(seed * 100_003 + i)]
        if layout == "messages":
            rows.append({"messages": [user, answer], "images": images})
        else:
            rows.append({"prompt": [user], "completion": [answer], "images": images})
    return Dataset.from_list(rows)


# ------------------------------------------------------------------------------------------------------------------
# A tiny Qwen2-VL (the family most VLM users train), offline
# ------------------------------------------------------------------------------------------------------------------
QWEN2VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def build_qwen2vl_processor(vocab_size: int = 300):
    """A Qwen2-VL processor for images only: `build_tokenizer`'s tokenizer plus Qwen2-VL's vision tokens, and the PIL
    Qwen2-VL image processor fixed at 56x56 pixels (4 patches of 14 after 2x2 merging: 4 `<|image_pad|>` tokens).

    `Qwen2VLProcessor` insists on a video processor, which transformers only has with torchvision. This subclass
    accepts none (videos are then unsupported); with torchvision installed, use `AutoProcessor` as usual. It is not
    reloadable with `AutoProcessor.from_pretrained`: pass the object itself.
    """
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    tokenizer = build_tokenizer(vocab_size)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN2VL_TOKENS})
    template = VLM_CHAT_TEMPLATE.replace(IMAGE_TOKEN, "<|vision_start|><|image_pad|><|vision_end|>")
    tokenizer.chat_template = template
    pixels = 56 * 56
    image_processor = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels)
    return Qwen2VLImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=template
    )


def build_qwen2vl(
    processor, seed: int = 0, hidden_size: int = 32, num_layers: int = 2, init_std: float = 0.2
):
    """A tiny random Qwen2-VL sized to `processor` (1-layer vision tower, 2-layer text model, M-RoPE)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
            max_position_embeddings=256,
            tie_word_embeddings=True,
            initializer_range=init_std,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        ),
        vision_config=dict(
            depth=1,
            embed_dim=hidden_size,
            hidden_size=hidden_size,
            num_heads=4,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            initializer_range=init_std,
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model
