"""Turn a split into model-ready batches with an ingredient's tokenizer or image processor.

Ingredients of one soup share their pretrained base, hence their tokenizer: a split is
preprocessed once and the same batches feed every ingredient, soup and candidate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase
from transformers.image_processing_utils import BaseImageProcessor

from hfsoup.errors import TaskError
from hfsoup.evaluation.task import Task

Preprocessor = PreTrainedTokenizerBase | BaseImageProcessor


@dataclass
class PreparedSplit:
    """A split as tensors: input batches in dataset order, and one label per example.

    Attributes:
        name: The split's name.
        batches: Model keyword arguments per batch (``input_ids``, ... or ``pixel_values``).
        labels: ``(n,)`` int64 class ids, or float32 targets for regression.
    """

    name: str
    batches: list[dict[str, torch.Tensor]]
    labels: torch.Tensor

    @property
    def size(self) -> int:
        """Number of examples."""
        return len(self.labels)

    def label_batches(self) -> list[torch.Tensor]:
        """``labels`` cut like ``batches``."""
        sizes = [len(next(iter(batch.values()))) for batch in self.batches]
        return list(self.labels.split(sizes))


def is_image_column(dataset: datasets.Dataset, column: str) -> bool:
    """Whether ``column`` holds images (a ``datasets.Image`` feature)."""
    return isinstance(dataset.features.get(column), datasets.Image)


def load_preprocessor(
    source: str, *, image: bool, revision: str | None = None
) -> PreTrainedTokenizerBase | BaseImageProcessor:
    """The tokenizer (``image=False``) or image processor of a model directory or Hub repo.

    Raises:
        TaskError: ``source`` has none.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    loader = AutoImageProcessor if image else AutoTokenizer
    try:
        # Never run code from a repo: an auto_map entry must not make transformers prompt or
        # import it; a custom tokenizer class then fails here, as a TaskError.
        return loader.from_pretrained(source, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as err:
        kind = "image processor" if image else "tokenizer"
        raise TaskError(f"cannot load the {kind} of {source!r}: {err}".splitlines()[0]) from err


def prepare_split(
    dataset: datasets.Dataset,
    task: Task,
    preprocessor: Preprocessor,
    *,
    name: str,
    label2id: dict[str, int] | None = None,
) -> PreparedSplit:
    """Preprocess ``dataset`` into batches of ``task.batch_size`` examples, in order.

    Text goes through the tokenizer (one or two columns, padded to the longest in the batch,
    truncated to ``task.max_length``); an image column through the image processor, images
    converted to RGB.

    Args:
        dataset: The split (columns already checked).
        task: Gives the columns, batch size and max length.
        preprocessor: The ingredients' tokenizer or image processor.
        name: The split's name, for messages.
        label2id: The model's ``label2id``. Needed when labels are strings; when the label
            column is a ``ClassLabel`` whose names are exactly the model's labels, class ids
            are mapped through the names (the dataset and the model may order them differently).

    Returns:
        The prepared split.

    Raises:
        TaskError: Unlabelled examples (label -1), unknown label names, or a preprocessor that
            does not fit the input column.
    """
    labels = _labels(dataset, task.label_column, label2id, split=name)
    image = is_image_column(dataset, task.input_columns[0])
    if image and not isinstance(preprocessor, BaseImageProcessor):
        raise TaskError(f"column {task.input_columns[0]!r} holds images; pass an image processor")
    if not image and not isinstance(preprocessor, PreTrainedTokenizerBase):
        raise TaskError(f"columns {task.input_columns} hold text; pass a tokenizer")
    batches = []
    for start in range(0, len(dataset), task.batch_size):
        rows = dataset[start : start + task.batch_size]
        if image:
            encoded = _encode_images(preprocessor, rows[task.input_columns[0]])
        else:
            encoded = _encode_text(preprocessor, [rows[c] for c in task.input_columns], task)
        batches.append({k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)})
    return PreparedSplit(name=name, batches=batches, labels=labels)


def _encode_text(tokenizer: PreTrainedTokenizerBase, columns: list[list[str]], task: Task) -> Any:
    return tokenizer(
        *columns,
        padding="longest",
        truncation=True,
        max_length=task.max_length,
        return_tensors="pt",
    )


def _encode_images(processor: BaseImageProcessor, images: list[Any]) -> Any:
    rgb = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
    return processor(images=rgb, return_tensors="pt")


def _labels(
    dataset: datasets.Dataset, column: str, label2id: dict[str, int] | None, *, split: str
) -> torch.Tensor:
    feature = dataset.features[column]
    values = list(dataset[column])
    if isinstance(feature, datasets.ClassLabel):
        if label2id and set(feature.names) == set(label2id):
            to_model = [label2id[label] for label in feature.names]
            values = [to_model[v] if v >= 0 else v for v in values]
    elif isinstance(feature, datasets.Value) and feature.dtype == "string":
        if not label2id:
            raise TaskError(f"labels in split {split!r} are names; the model's label2id is needed")
        unknown = sorted({v for v in values if v not in label2id})
        if unknown:
            raise TaskError(
                f"labels {unknown[:5]} in split {split!r} are not among the model's labels "
                f"({', '.join(label2id)})"
            )
        values = [label2id[v] for v in values]
    elif isinstance(feature, datasets.Value) and feature.dtype.startswith("float"):
        return torch.tensor(values, dtype=torch.float32)
    labels = torch.tensor(values, dtype=torch.int64)
    if (labels < 0).any():
        raise TaskError(
            f"split {split!r} has unlabelled examples (label -1), like GLUE's test splits; "
            "it cannot be scored"
        )
    return labels
