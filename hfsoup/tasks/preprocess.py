"""Turn a split into model-ready batches with an ingredient's tokenizer or image processor.

Ingredients of one soup share their pretrained base, hence their tokenizer: a split is
preprocessed once and the same batches feed every ingredient, soup and candidate.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase
from transformers.image_processing_utils import BaseImageProcessor

from hfsoup.errors import TaskError
from hfsoup.tasks.task import Task

Preprocessor = PreTrainedTokenizerBase | BaseImageProcessor

# Private switch for benchmarks/greedy_cost.py, which compares runs with and without length
# buckets: the default of ``prepare_split(bucket=None)``.
_BUCKET_TEXT = True


@dataclass
class PreparedSplit:
    """A split as tensors: input batches, and one label per example in dataset order.

    Text batches hold the examples sorted by token length (``order``), each padded only to
    its own longest example; image batches, and text prepared with ``bucket=False``, hold
    them in dataset order (``order`` None).

    Attributes:
        name: The split's name.
        batches: Model keyword arguments per batch (``input_ids``, ... or ``pixel_values``).
        labels: ``(n,)`` int64 class ids, or float32 targets for regression, in dataset order.
        order: ``(n,)`` int64: the dataset index of each example as the batches hold them,
            or None when they hold the examples in dataset order.
    """

    name: str
    batches: list[dict[str, torch.Tensor]]
    labels: torch.Tensor
    order: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """Number of examples."""
        return len(self.labels)

    def label_batches(self) -> list[torch.Tensor]:
        """The labels of each batch's examples (``labels`` in batch order, cut like ``batches``)."""
        sizes = [len(next(iter(batch.values()))) for batch in self.batches]
        labels = self.labels if self.order is None else self.labels[self.order]
        return list(labels.split(sizes))

    def in_dataset_order(self, outputs: torch.Tensor) -> torch.Tensor:
        """Per-example ``outputs`` of every batch, concatenated in batch order, put back in
        dataset order (row ``i`` for example ``i``)."""
        if self.order is None:
            return outputs
        if len(outputs) != len(self.order):
            raise ValueError(f"{len(outputs)} outputs for {len(self.order)} examples")
        restored = torch.empty_like(outputs)
        restored[self.order] = outputs
        return restored


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
    max_tokens: int | None = None,
    bucket: bool | None = None,
    order: torch.Tensor | None = None,
) -> PreparedSplit:
    """Preprocess ``dataset`` into batches of ``task.batch_size`` examples.

    Text goes through the tokenizer (one or two columns, padded to the longest in the batch,
    truncated to ``task.max_length``); with ``bucket``, the examples are first sorted by
    token length, so that each batch holds neighbouring lengths and little padding
    (``PreparedSplit.order`` says which example is where). An image column goes through the
    image processor, images converted to RGB, in dataset order.

    Args:
        dataset: The split (columns already checked).
        task: Gives the columns, batch size and max length.
        preprocessor: The ingredients' tokenizer or image processor.
        name: The split's name, for messages.
        label2id: The model's ``label2id``. Needed when labels are strings; when the label
            column is a ``ClassLabel`` whose names are exactly the model's labels, class ids
            are mapped through the names (the dataset and the model may order them differently).
        max_tokens: The most tokens the model takes (its position embeddings): text is cut
            to ``min(task.max_length, max_tokens)``, with one notice when that cuts an example
            that ``task.max_length`` alone would not have.
        bucket: Sort text by token length before batching (the outputs of a model are the
            same up to float noise; the padding, hence the work, is less). Default: on.
        order: Batch the examples in this order instead (dataset indices, a permutation):
            a split prepared before, re-batched (its notices are not repeated).

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
    if not image:
        for column in task.input_columns:
            _check_text(dataset, column, split=name)
    length = task.max_length if max_tokens is None else max(1, min(task.max_length, max_tokens))
    again = order is not None
    if order is not None and sorted(order.tolist()) != list(range(len(dataset))):
        raise ValueError(f"order is not a permutation of the {len(dataset)} examples")
    if order is None and not image and (_BUCKET_TEXT if bucket is None else bucket):
        order = _length_order(dataset, task, preprocessor, length)
    source = dataset if order is None else dataset.select(order.tolist())
    cut = False
    batches = []
    for start in range(0, len(source), task.batch_size):
        if image:
            images = _decoded_images(source, task.input_columns[0], start, task, split=name)
            encoded = _encode_images(preprocessor, images)
        else:
            rows = source[start : start + task.batch_size]
            encoded = _encode_text(preprocessor, [rows[c] for c in task.input_columns], length)
            ids = encoded.get("input_ids")
            cut = cut or (length < task.max_length and ids is not None and ids.shape[-1] >= length)
        batches.append({k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)})
    if cut and not again:
        logging.getLogger("hfsoup").warning(
            "split %r: examples cut to %d tokens, the most the model takes (max_length is %d)",
            name, length, task.max_length,
        )  # fmt: skip
    return PreparedSplit(name=name, batches=batches, labels=labels, order=order)


def _length_order(
    dataset: datasets.Dataset, task: Task, tokenizer: PreTrainedTokenizerBase, length: int
) -> torch.Tensor:
    """The dataset's indices sorted by token length (after truncation), shortest first; ties
    keep dataset order. Shortest first: when an early decision stops a candidate, the
    examples it never scores are the longest, the costliest."""
    if not len(dataset):
        return torch.empty(0, dtype=torch.int64)
    columns = [list(dataset[c]) for c in task.input_columns]
    ids = tokenizer(*columns, truncation=True, max_length=length)["input_ids"]
    lengths = torch.tensor([len(row) for row in ids], dtype=torch.int64)
    return torch.sort(lengths, stable=True).indices


def _check_text(dataset: datasets.Dataset, column: str, *, split: str) -> None:
    """Refuse a text column that holds no text, or rows without any: never a traceback later."""
    feature = dataset.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise TaskError(
            f"input column {column!r} of split {split!r} holds {_feature_name(feature)}, not text"
        )
    missing = sum(1 for value in dataset[column] if value is None)
    if missing:
        raise TaskError(
            f"split {split!r} has {missing} example(s) with no text (None) in column {column!r}"
        )


def _decoded_images(
    dataset: datasets.Dataset, column: str, start: int, task: Task, *, split: str
) -> list[Any]:
    """One batch of images, decoded; a corrupt or missing image is a TaskError naming its row."""
    end = min(start + task.batch_size, len(dataset))
    try:
        images = dataset[start:end][column]
    except Exception:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError ...
        images = None
    if images is not None and all(image is not None for image in images):
        return images
    for row in range(start, end):  # find the culprit, for the message
        try:
            image = dataset[row][column]
        except Exception as err:
            raise TaskError(
                f"row {row} of split {split!r}: the image in column {column!r} cannot be "
                f"decoded ({type(err).__name__})"
            ) from err
        if image is None:
            raise TaskError(f"row {row} of split {split!r} has no image in column {column!r}")
    raise TaskError(f"the images of rows {start}-{end - 1} of split {split!r} cannot be decoded")


def _encode_text(tokenizer: PreTrainedTokenizerBase, columns: list[list[str]], length: int) -> Any:
    return tokenizer(
        *columns,
        padding="longest",
        truncation=True,
        max_length=length,
        return_tensors="pt",
    )


# Models whose position ids start after the padding id (fairseq's convention): a model with
# ``max_position_embeddings`` P takes at most ``P - pad_token_id - 1`` tokens.
_PADDING_OFFSET_MODELS = {
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text",
    "roberta-prelayernorm", "ibert", "mpnet", "xmod", "luke", "markuplm", "layoutlmv3",
}  # fmt: skip


def max_tokens(config: Any, preprocessor: Any) -> int | None:
    """The most tokens a text model with ``config`` takes, or None when nothing says.

    Longer inputs overrun its position embeddings (a shape error deep in the forward pass).
    """
    limits = []
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        if getattr(config, "model_type", None) in _PADDING_OFFSET_MODELS:
            positions -= (getattr(config, "pad_token_id", None) or 0) + 1
        limits.append(positions)
    model_max = getattr(preprocessor, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:  # unset: a huge sentinel
        limits.append(model_max)
    return max(1, min(limits)) if limits else None


def _encode_images(processor: BaseImageProcessor, images: list[Any]) -> Any:
    try:
        rgb = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
        return processor(images=rgb, return_tensors="pt")
    except (OSError, ValueError, SyntaxError) as err:  # a truncated file, an odd shape
        raise TaskError(
            f"an image cannot be processed ({type(err).__name__}: {err})".splitlines()[0][:300]
        ) from err


def _labels(
    dataset: datasets.Dataset, column: str, label2id: dict[str, int] | None, *, split: str
) -> torch.Tensor:
    """The labels as class ids (int64) or regression targets (float32), checked against the model.

    With ``label2id`` (the model's labels), class ids must lie in ``0..len(label2id)-1``, a
    ``ClassLabel`` must name as many classes as the model has, and a model with one output
    (regression) gets numbers, not classes: a score of mismatched labels means nothing.
    """
    feature = dataset.features[column]
    values = list(dataset[column])
    classes = len(label2id) if label2id else None
    missing = sum(1 for v in values if v is None or (isinstance(v, float) and math.isnan(v)))
    if missing:
        raise TaskError(
            f"split {split!r} has {missing} example(s) without a label (None or NaN in column "
            f"{column!r}); it cannot be scored"
        )
    ids = _class_ids(feature, values, label2id, split=split, column=column)
    if isinstance(ids, torch.Tensor):  # regression targets
        return ids
    return _checked_ids(ids, classes, split=split, column=column)


def _class_ids(
    feature: Any, values: list[Any], label2id: dict[str, int] | None, *, split: str, column: str
) -> list[Any] | torch.Tensor:
    """The labels as class ids in the model's order (not range-checked yet), or, for numbers
    given to a model with one output (or none known), the float32 regression targets."""
    classes = len(label2id) if label2id else None
    if isinstance(feature, datasets.ClassLabel):
        if classes == 1:
            raise _regression_with_classes(split, column)
        if classes is not None and feature.num_classes != classes:
            raise TaskError(
                f"column {column!r} of split {split!r} has {feature.num_classes} classes "
                f"({_names(feature.names)}) but the model has {classes} labels "
                f"({_names(list(label2id))}); its scores would mean nothing"
            )
        if label2id and set(feature.names) == set(label2id):
            to_model = [label2id[label] for label in feature.names]
            values = [to_model[v] if v >= 0 else v for v in values]
    elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        if not label2id:
            raise TaskError(f"labels in split {split!r} are names; the model's label2id is needed")
        if classes == 1:
            raise _regression_with_classes(split, column)
        unknown = sorted({v for v in values if v not in label2id})
        if unknown:
            raise TaskError(
                f"labels {_shown(unknown)} in split {split!r} are not among the model's labels "
                f"({_names(list(label2id))})"
            )
        values = [label2id[v] for v in values]
    elif isinstance(feature, datasets.Value) and feature.dtype.startswith("float"):
        targets = torch.tensor(values, dtype=torch.float64)
        if not torch.isfinite(targets).all():
            raise TaskError(f"split {split!r} has infinite labels in column {column!r}")
        if classes is None or classes == 1:
            return targets.float()
        if not (targets == targets.round()).all():
            raise TaskError(
                f"column {column!r} of split {split!r} holds fractional numbers (regression "
                f"targets) but the model classifies into {classes} labels; its scores would "
                "mean nothing"
            )
        values = targets.long().tolist()
    elif not (
        isinstance(feature, datasets.Value)
        and (feature.dtype.startswith(("int", "uint")) or feature.dtype == "bool")
    ):
        raise TaskError(
            f"column {column!r} of split {split!r} holds {_feature_name(feature)}, not class "
            "ids, label names or numbers"
        )
    return values


def _checked_ids(
    values: list[Any], classes: int | None, *, split: str, column: str
) -> torch.Tensor:
    """Class ids as int64, refused when unlabelled (-1), negative or beyond the model's
    classes; whole numbers for a model with one output are its float32 regression targets."""
    labels = torch.tensor(values, dtype=torch.int64)
    if (labels == -1).any():
        raise TaskError(
            f"split {split!r} has unlabelled examples (label -1), like GLUE's test splits; "
            "it cannot be scored"
        )
    if (labels < 0).any():
        raise TaskError(
            f"split {split!r} has negative labels ({int(labels.min())}) in column {column!r}; "
            "class ids start at 0"
        )
    if classes == 1:  # one output: whole numbers are regression targets too (ratings 1..5)
        return labels.float()
    if classes is not None and classes > 1 and len(labels) and int(labels.max()) >= classes:
        raise TaskError(
            f"split {split!r} has label {int(labels.max())} in column {column!r} but the model "
            f"has {classes} labels (ids 0..{classes - 1}); its scores would mean nothing"
        )
    return labels


def _regression_with_classes(split: str, column: str) -> TaskError:
    return TaskError(
        f"column {column!r} of split {split!r} holds class labels but the model has one output "
        "(a regression head); its scores would mean nothing"
    )


def _shown(values: list[Any]) -> str:
    """The first few values, each cut short: a label may be a 10 MB string."""
    shown = [repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..." for v in values[:5]]
    more = f", ... ({len(values)} in all)" if len(values) > 5 else ""
    return "[" + ", ".join(shown) + more + "]"


def _names(names: list[str]) -> str:
    shown = ", ".join(str(n) if len(str(n)) <= 40 else str(n)[:37] + "..." for n in names[:10])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 10 else "")


def _feature_name(feature: Any) -> str:
    if isinstance(feature, datasets.Value):
        return f"values of type {feature.dtype}"
    return f"a {type(feature).__name__} feature"
