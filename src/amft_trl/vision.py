"""Construction-time checks for vision-language training: images reach the model, or the trainer refuses to start.

RL prompts with images go through TRL's `GRPOTrainer` path unchanged (an `images` / `image` column, a processor as
`processing_class`); image demonstrations through `amft_trl.sft_data.prepare_vision_sft_dataset`. These checks make
every way of training on the text alone an error at construction, naming the dataset, the column and the row:

- an image column, or prompts with image parts, with a text-only model or with a tokenizer (no image processor) as
  `processing_class`;
- an image that cannot be opened;
- rows with and rows without images in one dataset, when the processor cannot take such a batch;
- demonstrations whose messages hold image parts but no image column carries the images;
- image prompts in TRL's tool-calling loop with a processor whose `pixel_values` TRL's loop cannot split.
"""

from __future__ import annotations

import io
from typing import Any

from .sft_data import _vision_example, image_column, row_images, vision_collator


def is_vision_model(model: Any, trust_remote_code: bool = False) -> bool:
    """Whether `model` (a model, or a path / hub id read for its config only) takes images: its config has a vision
    tower (`vision_config`), as every transformers VLM's does (LLaVA, Qwen2-VL / 2.5-VL, Mllama, Gemma 3, Idefics,
    ...). Looks through PEFT and DDP wrappers."""
    if isinstance(model, str):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    else:
        config = getattr(getattr(model, "module", model), "config", None)
    return config is not None and getattr(config, "vision_config", None) is not None


def _model_name(model: Any) -> str:
    return model if isinstance(model, str) else type(getattr(model, "module", model)).__name__


def check_image_inputs(
    model: Any, processing_class: Any, datasets: dict[str, Any], trust_remote_code: bool = False
) -> None:
    """Raise a ValueError if a dataset's images would not reach the model (see the module docstring).

    `model`: the model or its path (only its config is read); `processing_class`: None skips the processor checks
    (the trainer checks again once it has loaded the model's own). Map-style datasets are read once, a batch of rows
    at a time, without decoding images (each image's header is opened); an `IterableDataset` is only checked for
    its columns (reading it would consume it).
    """
    from datasets import Dataset

    for name, dataset in datasets.items():
        if dataset is None or not hasattr(dataset, "column_names"):
            continue
        column = image_column(dataset)
        if column is None:
            if not isinstance(dataset, Dataset):
                continue
            row = first_image_part(dataset)
            if row is not None and name == "sft_dataset":
                raise ValueError(
                    f"`{name}` row {row[0]}: column `{row[1]}` has an image part, but the dataset has no `images` "
                    "(or `image`) column to carry the images, so it would train on the text alone. Put each "
                    "row's images in an `images` column (TRL's vision SFT format)."
                )
            if row is not None:  # prompts with images inside their messages (GRPOTrainer reads them there)
                _check_model_takes_images(
                    model, processing_class, name, f"image parts in `{row[1]}`", trust_remote_code
                )
            continue
        _check_model_takes_images(model, processing_class, name, f"an `{column}` column", trust_remote_code)
        if not isinstance(dataset, Dataset):
            continue
        with_images, without = _check_images_open(dataset, name, column)
        if with_images is None:
            raise ValueError(
                f"`{name}` has an `{column}` column but no row holds an image: remove the column to train on text."
            )
        if processing_class is not None and without is not None:
            _check_mixed_rows(dataset, name, column, processing_class, with_images, without)


def _check_model_takes_images(
    model: Any, processing_class: Any, name: str, what: str, trust_remote_code: bool
) -> None:
    if processing_class is not None and getattr(processing_class, "image_processor", None) is None:
        raise ValueError(
            f"`{name}` has {what}, but `processing_class` is a {type(processing_class).__name__} with no image "
            "processor, so its images would be dropped and the model trained on the text alone. Pass the model's "
            "processor (`AutoProcessor.from_pretrained(...)`) as `processing_class`."
        )
    if not is_vision_model(model, trust_remote_code):
        raise ValueError(
            f"`{name}` has {what}, but the model ({_model_name(model)}) is text-only (its config has no "
            "`vision_config`), so the images would be dropped. Load a vision-language model (e.g. with "
            "`AutoModelForImageTextToText`), or remove the images to train on text."
        )


def _undecoded(dataset: Any, column: str) -> Any:
    """The dataset's image column alone, images not decoded (`Image(decode=False)`: `{"bytes", "path"}` each)."""
    from datasets import Image, LargeList, List, Sequence

    dataset = dataset.select_columns([column])
    feature = dataset.features[column]
    if isinstance(feature, Image):
        return dataset.cast_column(column, Image(decode=False))
    if isinstance(feature, (List, LargeList, Sequence)) and isinstance(feature.feature, Image):
        return dataset.cast_column(column, List(Image(decode=False)))
    return dataset


def _open(cell: Any) -> None:
    """Open one image's header (no pixels decoded): raises when the file is missing or not an image."""
    from PIL import Image

    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            Image.open(io.BytesIO(cell["bytes"])).close()
            return
        cell = cell.get("path")
    if isinstance(cell, str):
        if cell.startswith(("http://", "https://")):  # fetched by the processor at use; not checked here
            return
        Image.open(cell).close()
        return
    if cell is not None and not isinstance(cell, Image.Image):
        raise TypeError(f"{type(cell).__name__} is not an image, a path or image bytes")


def _check_images_open(dataset: Any, name: str, column: str) -> tuple[int | None, int | None]:
    """Open every image's header; returns the first row with an image and the first row without (None if none)."""
    with_images = without = None
    row = 0
    for batch in _undecoded(dataset, column).iter(batch_size=256):
        for value in batch[column]:
            images = ([] if value is None else [value]) if column == "image" else list(value or [])
            for image in images:
                try:
                    _open(image)
                except Exception as error:
                    raise ValueError(
                        f"`{name}` row {row}: an image in column `{column}` cannot be loaded "
                        f"({type(error).__name__}: {error})."
                    ) from error
            if images and with_images is None:
                with_images = row
            if not images and without is None:
                without = row
            row += 1
    return with_images, without


def _check_mixed_rows(
    dataset: Any, name: str, column: str, processor: Any, with_images: int, without: int
) -> None:
    """Rows with and without images in one dataset: fine if the processor takes a batch of both, else an error."""
    rows = [dataset[with_images], dataset[without]]
    try:
        if "completion" in dataset.column_names or "messages" in dataset.column_names:  # demonstrations
            vision_collator(processor, None)([_vision_example(r, column) for r in rows])
        else:  # prompts, processed the way GRPOTrainer does for generation
            _probe_prompts(processor, rows, column)
    except Exception as error:
        raise ValueError(
            f"`{name}` mixes rows with images (row {with_images}) and rows without (row {without}) in column "
            f"`{column}`, and this model's processor cannot take such a batch ({type(error).__name__}: {error}). "
            "Give every row an image, or split the data into a dataset with images and one without."
        ) from error


def _probe_prompts(processor: Any, rows: list[dict[str, Any]], column: str) -> None:
    """Process two prompts the way GRPOTrainer does for generation (chat template, then the processor)."""
    from trl.data_utils import apply_chat_template, prepare_multimodal_messages

    images = [row_images(r, column) or None for r in rows]
    texts = [
        apply_chat_template({"prompt": prepare_multimodal_messages(r["prompt"], images=im)}, processor)[
            "prompt"
        ]
        for r, im in zip(rows, images, strict=True)
    ]
    processor(images=images, text=texts, padding=True, return_tensors="pt")


def first_image_part(dataset: Any) -> tuple[int, str] | None:
    """(row, column) of the first `{"type": "image"}` message part in `prompt` or `messages`, or None. Columns
    whose message contents are plain strings are skipped without reading them."""
    for column in ("prompt", "messages"):
        if column not in (dataset.column_names or []):
            continue
        inner = getattr(dataset.features[column], "feature", None)
        content = inner.get("content") if isinstance(inner, dict) else None
        if not (isinstance(getattr(content, "feature", None), dict) and "type" in content.feature):
            continue  # string contents: no image parts
        row = 0
        for batch in dataset.select_columns([column]).iter(batch_size=1000):
            for messages in batch[column]:
                parts = [p for m in messages or [] for p in (m.get("content") or []) if isinstance(p, dict)]
                if any(p.get("type") == "image" for p in parts):
                    return row, column
                row += 1
    return None


def check_tool_loop_images(processor: Any, datasets: dict[str, Any]) -> None:
    """Raise a ValueError when image prompts would meet TRL 1.16's tool-calling loop with a processor it fails on.

    GRPOTrainer's loop (`tools` / `environment_factory`) keeps each prompt's images for its later turns by splitting
    the `pixel_values` its processor returned (`trl.trainer.utils.split_pixel_values_by_grid`), which takes one
    torch tensor. Processors return one from `apply_chat_template(tokenize=True)` when their image processor does
    (Qwen2-VL / 2.5-VL's torchvision processors); the PIL ones (transformers without torchvision) return numpy arrays
    or lists, and the loop would fail at the first tool call with `'list' object has no attribute 'size'`. Checked
    once with a blank image; datasets without images skip it."""
    import torch
    from datasets import Dataset

    def has_images(dataset: Any) -> bool:
        if dataset is None or not hasattr(dataset, "column_names"):
            return False
        if image_column(dataset) is not None:
            return True
        return isinstance(dataset, Dataset) and first_image_part(dataset) is not None

    named = [name for name, dataset in datasets.items() if has_images(dataset)]
    if not named or getattr(processor, "image_processor", None) is None:
        return
    from PIL import Image
    from trl.data_utils import prepare_multimodal_messages

    messages = prepare_multimodal_messages(
        [{"role": "user", "content": "x"}], images=[Image.new("RGB", (32, 32))]
    )
    out = processor.apply_chat_template(
        conversation=[messages], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    pixel_values = out.get("pixel_values")
    if pixel_values is not None and not isinstance(pixel_values, torch.Tensor):
        raise ValueError(
            f"`{named[0]}` has images and the trainer calls tools (`tools` / `environment_factory`), but this "
            f"processor's image processor ({type(processor.image_processor).__name__}) returns `pixel_values` as "
            f"{type(pixel_values).__name__}, not as one torch tensor, and TRL 1.16's tool-calling loop splits them as "
            "a tensor (it would fail at the first tool call). Use the model's torchvision image processor (install "
            "torchvision; Qwen2-VL / 2.5-VL's returns a tensor), or an image processor that returns "
            "`return_tensors='pt'` by default."
        )


def reload_converted_checkpoint(model: Any, checkpoint: str) -> bool:
    """Load a checkpoint's weights into `model` through `from_pretrained` when their names are not the model's.

    `save_pretrained` writes the weights of a model with a checkpoint conversion mapping (LLaVA, Qwen2-VL, Mllama,
    ... in transformers 5) under their original hub names, and transformers' `Trainer` resumes by loading that file
    with `load_state_dict`, which then matches nothing: the run would resume from the initial weights with only a
    warning (transformers issue 43701). `from_pretrained` applies the mapping. Returns whether it reloaded (False when
    the names already match, as for every text-only model here, or for PEFT adapters).
    """
    import json
    import os

    import torch

    model = getattr(model, "module", model)
    single = os.path.join(checkpoint, "model.safetensors")
    index = os.path.join(checkpoint, "model.safetensors.index.json")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            saved = set(f.keys())
    elif os.path.isfile(index):
        with open(index) as f:
            saved = set(json.load(f)["weight_map"])
    else:
        return False
    if saved <= set(model.state_dict()):
        return False
    dtype = next(model.parameters()).dtype
    loaded = type(model).from_pretrained(checkpoint, dtype=dtype)
    with torch.no_grad():
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{checkpoint}: the saved weights do not fit the model even after transformers' name conversion "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})."
        )
    return True


def images_to_json(images: list[Any]) -> list[Any]:
    """A row's images as JSON values, for a checkpoint (ReLIFT's buffer): a PIL image as `{"image": base64,
    "format": ...}` of its lossless PNG (TIFF for modes PNG cannot hold), so that it reloads pixel for pixel; a path
    or URL (a string) as is. Anything else is a TypeError naming it."""
    import base64

    from PIL import Image

    out: list[Any] = []
    for image in images:
        if isinstance(image, str):
            out.append(image)
            continue
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"Cannot store an image of type {type(image).__name__} in the checkpoint: expected a PIL image or a "
                "path / URL string (as `datasets.Image` columns give them)."
            )
        for fmt in ("PNG", "TIFF"):
            buffer = io.BytesIO()
            try:
                image.save(buffer, format=fmt)
            except (OSError, ValueError, KeyError):
                continue
            out.append({"image": base64.b64encode(buffer.getvalue()).decode("ascii"), "format": fmt})
            break
        else:
            raise TypeError(f"Cannot store a PIL image of mode {image.mode!r} losslessly in the checkpoint.")
    return out


def images_from_json(values: list[Any]) -> list[Any]:
    """The inverse of `images_to_json` (a ValueError on anything it did not write)."""
    import base64

    from PIL import Image

    out: list[Any] = []
    for value in values:
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, dict) and isinstance(value.get("image"), str):
            image = Image.open(io.BytesIO(base64.b64decode(value["image"])))
            image.load()
            out.append(image)
        else:
            raise ValueError(f"an image must be a path string or an encoded image object, got {value!r:.80}")
    return out
