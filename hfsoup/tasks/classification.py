"""The classification task kind (text and image): logits, metrics, exact early rejection.

A :class:`Scorer` loads and preprocesses the task's splits once; every ingredient, soup and
candidate is then scored on the same tensors. Outputs are logits (one column for regression),
returned on the CPU in float32 so that they can be cached per ingredient and reused by the
ensembles. :data:`KIND` is the kind registered as ``classification``
(see :mod:`hfsoup.tasks.kinds`); :class:`Scorer` implements its
:class:`~hfsoup.tasks.kinds.TaskScorer` protocol. Every metric is higher-is-better.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import torch
import torch.nn.functional as F

from hfsoup.compute.distributed import Processes
from hfsoup.errors import TaskError
from hfsoup.tasks.batches import BatchRunner, evaluating, to_device
from hfsoup.tasks.data import load_task_splits
from hfsoup.tasks.ensemble import ensemble, greedy_ensemble
from hfsoup.tasks.kinds import HIGHER, Direction, EarlyStop, Tally
from hfsoup.tasks.metrics import (
    compute,
    is_mean_over_examples,
    load_metric,
    metric_kwargs,
    metric_value,
    per_example,
)
from hfsoup.tasks.preprocess import (
    PreparedSplit,
    Preprocessor,
    is_image_column,
    load_preprocessor,
    prepare_split,
)
from hfsoup.tasks.preprocess import max_tokens as model_max_tokens
from hfsoup.tasks.task import Task, resolve_task


class Scorer:
    """Scores models on a classification task's selection and report splits.

    Implements :class:`~hfsoup.tasks.kinds.TaskScorer`; :meth:`logits` is :meth:`outputs`.

    Args:
        task: A :class:`Task`, preset name or task mapping.
        preprocessor: The ingredients' tokenizer, or image processor for an image column.
        label2id: The ingredients' ``label2id`` (for string labels, or to map a ``ClassLabel``
            whose names the model orders differently).
        device: Keep the prepared batches on this device (saves a copy per forward pass);
            by default they stay on the CPU and move to the model's device per batch.
        progress: Show a progress bar per forward pass over a split.
        splits: Already loaded splits (as :func:`load_task_splits` returns them).
        processes: Score data-parallel with these processes (``accelerate launch``): each
            runs every ``world``-th batch and the outputs are gathered, so every process gets
            the whole split's outputs and takes the same decisions. Default: this process alone.
        max_tokens: The most tokens the model takes; longer text is cut to it (see
            :func:`~hfsoup.tasks.preprocess.prepare_split`). ``from_pretrained`` reads it
            from the model's config.
        bucket: Batch text by token length (see :func:`~hfsoup.tasks.preprocess.prepare_split`;
            default on). Outputs always come back in dataset order.

    Attributes:
        task: The resolved task.
        splits: ``{split name: PreparedSplit}``, selection split first.
        metrics: ``{metric name: evaluate module}``, selection metric first.
        cache: ``{(model key, split): outputs}`` filled by :meth:`outputs` when given a key.
        runner: Runs the forward passes (:class:`~hfsoup.tasks.batches.BatchRunner`).

    Example:
        ```py
        >>> scorer = Scorer.from_pretrained("glue/sst2", "org/bert-sst2-ft1")
        >>> outputs = scorer.logits(model, "validation", key="org/bert-sst2-ft1")
        >>> scorer.scores(outputs, "validation")
        {'accuracy': 0.91}
        ```
    """

    def __init__(
        self,
        task: Task | str | dict[str, Any],
        preprocessor: Preprocessor,
        *,
        label2id: dict[str, int] | None = None,
        device: torch.device | str | None = None,
        progress: bool = True,
        splits: dict[str, datasets.Dataset] | None = None,
        processes: Processes | None = None,
        max_tokens: int | None = None,
        bucket: bool | None = None,
    ) -> None:
        self.task = resolve_task(task)
        self.runner = BatchRunner(processes, progress=progress)
        loaded = splits if splits is not None else load_task_splits(self.task)
        # Kept to re-batch a split in another order (put_hardest_first).
        self._sources = (loaded, preprocessor, label2id, max_tokens, device)
        self.splits: dict[str, PreparedSplit] = {
            name: self._prepare(name, bucket=bucket) for name in loaded
        }
        # After the data: labels the model cannot have are refused before any metric is fetched.
        self.metrics = {name: load_metric(name) for name in self.task.metrics}
        self.cache: dict[tuple[str, str], torch.Tensor] = {}

    @classmethod
    def from_pretrained(
        cls,
        task: Task | str | dict[str, Any],
        source: str,
        *,
        revision: str | None = None,
        device: torch.device | str | None = None,
        progress: bool = True,
        processes: Processes | None = None,
    ) -> Scorer:
        """A scorer using the tokenizer or image processor and labels of model ``source``.

        Args:
            task: The task.
            source: A model directory or Hub repo ID holding the preprocessor files.
            revision: The revision of ``source`` (a pinned commit SHA, ideally).
            device: As in :class:`Scorer`.
            progress: As in :class:`Scorer`.
            processes: As in :class:`Scorer`.

        Raises:
            TaskError: The task's data cannot be loaded, or ``source`` has no fitting
                preprocessor.
        """
        from transformers import AutoConfig

        task = resolve_task(task)
        loaded = load_task_splits(task)
        first = next(iter(loaded.values()))
        image = is_image_column(first, task.input_columns[0])
        preprocessor = load_preprocessor(source, image=image, revision=revision)
        try:
            config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=False)
        except (OSError, ValueError) as err:  # e.g. a config that needs the repo's own code
            raise TaskError(f"cannot load the config of {source!r}: {err}".splitlines()[0]) from err
        return cls(
            task,
            preprocessor,
            label2id=dict(config.label2id),
            device=device,
            progress=progress,
            splits=loaded,
            processes=processes,
            max_tokens=None if image else model_max_tokens(config, preprocessor),
        )

    @property
    def selection_split(self) -> str:
        """The split that ranks and accepts."""
        return self.task.selection_split

    @property
    def selection_metric(self) -> str:
        """The metric that ranks and accepts."""
        return self.task.selection_metric

    @property
    def direction(self) -> Direction:
        """Which way the selection metric is better: always higher for classification."""
        return HIGHER

    def split(self, name: str) -> PreparedSplit:
        """The prepared split ``name``.

        Raises:
            TaskError: The task does not score a split of that name.
        """
        try:
            return self.splits[name]
        except KeyError:
            raise TaskError(
                f"split {name!r} is not scored by this task ({', '.join(self.splits)})"
            ) from None

    def outputs(
        self, model: torch.nn.Module, split: str, *, key: str | None = None
    ) -> torch.Tensor:
        """The model's logits on every example of ``split``, in dataset order.

        Args:
            model: A ``transformers`` classification model (or any module returning logits).
            split: The split name.
            key: Cache the outputs under ``(key, split)`` and return the cached ones when
                present (for ingredients, whose outputs the ensembles reuse).

        Returns:
            ``(n, classes)`` float32 on the CPU (``(n, 1)`` for regression).
        """
        if key is not None and (key, split) in self.cache:
            return self.cache[(key, split)]
        prepared = self.split(split)
        outputs = self.runner.run(self._forward, model, prepared, split)
        result = prepared.in_dataset_order(torch.cat(outputs)) if outputs else torch.empty(0, 0)
        if key is not None:
            self.cache[(key, split)] = result
        return result

    logits = outputs  # the classification name of the outputs

    def scores(self, outputs: torch.Tensor, split: str) -> dict[str, float]:
        """Every metric of the task for ``outputs`` (logits, or an ensemble's) on ``split``.

        Classification: predictions are the argmax. Regression (one output per example): the
        output itself.

        Returns:
            ``{metric name: value}`` in the task's order (the selection metric first).
        """
        labels = self.split(split).labels
        if len(outputs) != len(labels):
            raise ValueError(f"{len(outputs)} outputs for {len(labels)} examples of {split!r}")
        return {name: self._metric(name, outputs, labels) for name in self.metrics}

    def selection_score(self, outputs: torch.Tensor, split: str | None = None) -> float:
        """The selection metric for ``outputs`` on ``split`` (default: the selection split)."""
        labels = self.split(split or self.selection_split).labels
        return self._metric(self.selection_metric, outputs, labels)

    def score_with_early_stop(
        self, model: torch.nn.Module, split: str, threshold: float, *, strict: bool = False
    ) -> EarlyStop:
        """Score ``model`` on ``split``, stopping once it can no longer reach ``threshold``.

        For a metric that is a mean over examples (accuracy), after each batch the best still
        possible score counts every remaining example as correct; once that cannot reach the
        threshold (``>=``, or ``>`` when ``strict``), scoring stops. The test is on integer
        counts: ``threshold`` is first turned into the least number of correct examples whose
        score reaches it, so the decision is the one a full evaluation would take. Other
        metrics are scored in full.

        Args:
            model: The candidate.
            split: Usually the selection split.
            threshold: The score to reach (the incumbent's).
            strict: Require ``score > threshold`` instead of ``>=``.

        Returns:
            ``EarlyStop(score, examples_scored)``; ``score`` is None when stopped early, else
            the full score. Decide with ``self.direction.reaches``.
        """
        prepared = self.split(split)
        name = self.selection_metric
        if not is_mean_over_examples(name) or prepared.labels.is_floating_point():
            return EarlyStop(self.selection_score(self.outputs(model, split), split), prepared.size)
        correct_in = per_example(name)
        total = prepared.size
        needed = required_count(threshold, total, strict=strict)
        correct = scored = 0
        outputs = []
        with evaluating(model):
            batches = self.runner.in_order(self._forward, model, prepared, split)
            for output, labels in zip(batches, prepared.label_batches(), strict=True):
                outputs.append(output)
                correct += int(correct_in(_predictions(output), labels).sum())
                scored += len(labels)
                if scored < total and correct + (total - scored) < needed:
                    return EarlyStop(None, scored)
        outputs = prepared.in_dataset_order(torch.cat(outputs))
        return EarlyStop(self.selection_score(outputs, split), scored)

    def put_hardest_first(self, outputs: Sequence[torch.Tensor], split: str | None = None) -> None:
        """Re-batch ``split`` (default: selection) so that the examples most of ``outputs`` get
        wrong come first, neighbouring token lengths within each count.

        For early decisions: a candidate soup of these models is rejected once its misses
        exceed what the incumbent can afford, and its misses lie mostly where the ingredients
        miss; scored first, they decide a rejection sooner. The decisions do not depend on the
        order (counts of the examples scored); only the work does. Nothing is done when the
        selection metric is not a mean over examples. ``outputs``: full outputs on ``split``
        in dataset order (the ingredients'), each ``(n, classes)``.
        """
        split = split or self.selection_split
        prepared, name = self.split(split), self.selection_metric
        labels = prepared.labels
        if not outputs or not is_mean_over_examples(name) or labels.is_floating_point():
            return
        correct_in = per_example(name)
        wrong = sum((~correct_in(_predictions(o), labels).bool()).long() for o in outputs)
        lengths = torch.zeros(prepared.size, dtype=torch.int64)
        if all("attention_mask" in batch for batch in prepared.batches):
            in_batches = torch.cat([b["attention_mask"].sum(1).cpu() for b in prepared.batches])
            lengths = prepared.in_dataset_order(in_batches)
        longest = int(lengths.max()) if len(lengths) else 0
        key = (len(outputs) - wrong) * (longest + 1) + lengths
        order = torch.sort(key, stable=True).indices
        self.splits[split] = self._prepare(split, order=order)

    def _prepare(
        self, name: str, *, bucket: bool | None = None, order: torch.Tensor | None = None
    ) -> PreparedSplit:
        """Split ``name`` of the loaded data as batches (on the scorer's device)."""
        loaded, preprocessor, label2id, max_tokens, device = self._sources
        prepared = prepare_split(
            loaded[name], self.task, preprocessor, name=name, label2id=label2id,
            max_tokens=max_tokens, bucket=bucket, order=order,
        )  # fmt: skip
        if device is not None:
            prepared.batches = [to_device(b, torch.device(device)) for b in prepared.batches]
        return prepared

    def tally(self, outputs: torch.Tensor, split: str | None = None) -> Tally | None:
        """The exact counts of full ``outputs`` on ``split`` (default: selection), or None when
        the selection metric is not a mean over examples (nothing to count)."""
        labels = self.split(split or self.selection_split).labels
        name = self.selection_metric
        if not is_mean_over_examples(name) or labels.is_floating_point():
            return None
        _check_fit(outputs, labels)
        hits = int(per_example(name)(_predictions(outputs), labels).sum())
        return Tally(hits, len(labels), len(labels))

    def score_against(
        self, model: torch.nn.Module, split: str, incumbent: Tally, *, strict: bool = False
    ) -> EarlyStop:
        """Score ``model`` until accepting or rejecting it against ``incumbent`` is certain.

        The incumbent may be known only as a :class:`Tally` (an earlier candidate accepted
        early): its hits lie in ``[hits, high]``. After each batch the candidate's hits lie in
        ``[c, c + unscored]``. It is certainly accepted once ``c`` reaches the count needed to
        beat the incumbent's ``high`` (``>=``, or ``>`` when ``strict``, via
        :func:`required_count`), certainly rejected once ``c + unscored`` falls short of the
        count needed against its ``hits``. Batches come in the split's batch order (by token
        length for text): the counts are those of the examples scored so far, whichever they
        are, so the decision is the full evaluation's. Scored in full and still undecided:
        ``accepted=None``, and the caller finishes the incumbent (:meth:`finish`).

        Returns:
            ``EarlyStop(score, examples_scored, tally, accepted)``; ``score`` only when every
            example was scored.
        """
        prepared, name = self.split(split), self.selection_metric
        total = prepared.size
        if not is_mean_over_examples(name) or prepared.labels.is_floating_point():
            raise TaskError(f"metric {name!r} is not a mean over examples: nothing to count")
        low_needed = required_count(incumbent.hits / total, total, strict=strict)
        high_needed = required_count(incumbent.high / total, total, strict=strict)
        correct_in, outputs = per_example(name), []
        hits = scored = 0
        with evaluating(model):
            batches = self.runner.in_order(self._forward, model, prepared, split)
            for output, labels in zip(batches, prepared.label_batches(), strict=True):
                outputs.append(output)
                hits += int(correct_in(_predictions(output), labels).sum())
                scored += len(labels)
                tally = Tally(hits, scored, total)
                if tally.high < low_needed or hits >= high_needed:
                    if scored < total:
                        return EarlyStop(None, scored, tally, hits >= high_needed)
                    break
        tally = Tally(hits, scored, total)
        score = self.selection_score(prepared.in_dataset_order(torch.cat(outputs)), split)
        decided = tally.high < low_needed or hits >= high_needed
        return EarlyStop(score, scored, tally, hits >= high_needed if decided else None)

    def finish(self, model: torch.nn.Module, split: str, tally: Tally) -> Tally:
        """The exact counts of ``model`` on ``split``, scoring only the examples ``tally`` has
        not seen (``model`` must be the one that ``tally`` counted, bit for bit)."""
        if tally.known:
            return tally
        prepared, correct_in = self.split(split), per_example(self.selection_metric)
        sizes = [len(labels) for labels in prepared.label_batches()]
        start = next(b for b in range(len(sizes) + 1) if sum(sizes[:b]) == tally.scored)
        hits, scored = tally.hits, tally.scored
        with evaluating(model):
            batches = self.runner.in_order(self._forward, model, prepared, split, start=start)
            for output, labels in zip(batches, prepared.label_batches()[start:], strict=True):
                hits += int(correct_in(_predictions(output), labels).sum())
                scored += len(labels)
        return Tally(hits, scored, tally.total)

    @staticmethod
    def ensemble(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean of softmax probabilities (mean of outputs for regression); see :func:`ensemble`."""
        return ensemble(outputs)

    def greedy_ensemble(
        self, outputs: Sequence[torch.Tensor], split: str | None = None, *, strict: bool = False
    ) -> list[int]:
        """The paper's greedy ensemble on ``split`` (default: selection); see
        :func:`~hfsoup.tasks.ensemble.greedy_ensemble`. Returns the chosen indices."""
        split = split or self.selection_split
        return greedy_ensemble(
            outputs, lambda o: self.selection_score(o, split), strict=strict,
            direction=self.direction, combine=self.ensemble,
        )  # fmt: skip

    def check_learnable(self) -> None:
        """Refuse a regression task: there are no classes to take the cross-entropy over.

        Raises:
            TaskError: the selection split's labels are not class ids.
        """
        if self.split(self.selection_split).labels.is_floating_point():
            raise TaskError(
                "a learned soup minimises cross-entropy: regression tasks are not supported"
            )

    @staticmethod
    def loss(output: Any, beta: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the logits at temperature ``beta``, summed over the batch."""
        logits = output.logits if hasattr(output, "logits") else output[0]
        return F.cross_entropy(beta * logits.float(), targets, reduction="sum")

    def _metric(self, name: str, outputs: torch.Tensor, labels: torch.Tensor) -> float:
        _check_fit(outputs, labels)
        kwargs = metric_kwargs(name, outputs.shape[-1])
        return metric_value(
            name, compute(self.metrics[name], _predictions(outputs), labels, **kwargs)
        )

    @staticmethod
    @torch.inference_mode()
    def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Batches go to the first block's device (with a device map, hooks carry them on);
        # float inputs (pixel values) take the model's dtype (--score-dtype).
        first = next(model.parameters())
        output = model(**to_device(batch, first.device, first.dtype))
        logits = output.logits if hasattr(output, "logits") else output[0]
        return logits.float().cpu()


def required_count(threshold: float, total: int, *, strict: bool = False) -> int:
    """The least number of correct examples out of ``total`` whose accuracy reaches ``threshold``.

    Accuracy is ``correct / total`` as one correctly rounded float division (Python's and
    numpy's), which never decreases as ``correct`` grows; a binary search over the counts
    therefore finds the exact boundary, ties included. ``total + 1`` means unreachable.
    """
    low, high = 0, total + 1
    while low < high:
        middle = (low + high) // 2
        if HIGHER.reaches(middle / total if total else 0.0, threshold, strict=strict):
            high = middle
        else:
            low = middle + 1
    return low


def _check_fit(outputs: torch.Tensor, labels: torch.Tensor) -> None:
    """Refuse labels the model's outputs cannot be scored against (a meaningless score).

    Checked on every score, whoever built the scorer: class ids must index the model's
    classes, and a classification head (several outputs) is not scored against fractional
    targets.
    """
    classes = outputs.shape[-1] if outputs.dim() == 2 else 0
    if classes < 2 or not len(labels):
        return
    if labels.is_floating_point():
        if not (labels == labels.round()).all():
            raise TaskError(
                f"the labels are fractional numbers (regression targets) but the model "
                f"classifies into {classes} labels; its scores would mean nothing"
            )
        labels = labels.long()
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise TaskError(
            f"the labels run from {low} to {high} but the model has {classes} labels "
            f"(ids 0..{classes - 1}); its scores would mean nothing"
        )


def _predictions(outputs: torch.Tensor) -> torch.Tensor:
    return outputs.squeeze(-1) if outputs.shape[-1] == 1 else outputs.argmax(dim=-1)


class Classification:
    """The ``classification`` task kind: text or image classification (and regression heads)."""

    name = "classification"

    def prepare(
        self,
        task: Task,
        source: str,
        *,
        revision: str | None = None,
        device: torch.device | str | None = None,
        progress: bool = True,
        processes: Processes | None = None,
    ) -> Scorer:
        """A :class:`Scorer` with model ``source``'s preprocessor and labels; see
        :meth:`Scorer.from_pretrained`."""
        return Scorer.from_pretrained(
            task, source, revision=revision, device=device, progress=progress, processes=processes
        )


KIND = Classification()
"""The kind registered as ``classification`` (see :mod:`hfsoup.tasks.kinds`)."""
