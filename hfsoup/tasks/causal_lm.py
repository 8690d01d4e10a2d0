"""The causal-LM task kind: perplexity and multiple-choice accuracy of language models.

Every metric is computed from one thing per example: the log-probabilities the model gives the
example's *target tokens* (a 1-D float32 tensor). A forward pass runs over *rows*: for
``perplexity`` a row is one window of a text, for ``choice-accuracy`` one (context, choice)
pair. The rows of a split are batched in dataset order; :class:`LMSplit` keeps which target
tokens of which row belong to which example.

- ``perplexity``: ``exp(total NLL / total predicted tokens)`` over the whole split. A text
  longer than ``max_length`` is cut into windows that start every ``stride`` tokens (the
  Hugging Face "perplexity of fixed-length models" rule): each token is predicted once, by the
  window that first reaches it, with up to ``max_length - 1`` tokens of context
  (``stride < max_length``, so that a window's first token, which predicts nothing, was
  predicted by the window before). The first token of
  a text has no context and is not predicted. Lower is better.
- ``choice-accuracy``: the model picks the choice of highest total log-likelihood of its
  tokens given the context (lm-evaluation-harness ``acc``), or with ``normalize`` that total
  divided by the choice's length in characters (``acc_norm``'s normalisation); ties go to the
  first choice. Higher is better.

The ensemble averages next-token probabilities: ``log mean_i p_i(y_t)`` per target token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
import torch.nn.functional as F

from hfsoup.compute.distributed import Processes
from hfsoup.errors import TaskError
from hfsoup.tasks.batches import BatchRunner, evaluating, to_device
from hfsoup.tasks.classification import required_count
from hfsoup.tasks.data import load_task_splits
from hfsoup.tasks.ensemble import greedy_ensemble
from hfsoup.tasks.kinds import HIGHER, LOWER, Direction, EarlyStop
from hfsoup.tasks.task import CAUSAL_LM_METRICS, Task, resolve_task

PERPLEXITY, CHOICE_ACCURACY = CAUSAL_LM_METRICS

IGNORE = -100  # label of a position that is not a target (the transformers convention)


@dataclass
class LMSplit:
    """A split as rows of token ids, batched, with the bookkeeping of its target tokens.

    Attributes:
        name: The split's name.
        batches: ``input_ids`` and ``attention_mask`` per batch (right-padded rows).
        labels: Per batch, ``(rows, length)`` token ids at target positions, ``-100`` elsewhere.
        row_example: The example each row belongs to, in row order (non-decreasing).
        examples: Number of examples (texts, or questions).
        choice_tokens: For ``choice-accuracy``: per example, each choice's target tokens.
        choice_lengths: Per example, each choice's length in characters (``normalize``).
        gold: Per example, the index of the right choice.
    """

    name: str
    batches: list[dict[str, torch.Tensor]]
    labels: list[torch.Tensor]
    row_example: list[int]
    examples: int
    choice_tokens: list[list[int]] = field(default_factory=list)
    choice_lengths: list[list[int]] = field(default_factory=list)
    gold: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Number of rows: what a forward pass runs over (windows, or context-choice pairs)."""
        return len(self.row_example)

    def label_batches(self) -> list[torch.Tensor]:
        """The target labels per batch (what a learned soup's :meth:`Scorer.loss` takes)."""
        return self.labels


def windows(ids: Sequence[int], max_length: int, stride: int) -> list[tuple[list[int], int]]:
    """Cut a text's token ids into ``(window ids, first target position)`` pairs.

    Windows start every ``stride`` tokens and hold up to ``max_length`` tokens; a window's
    targets are the tokens no earlier window predicted, so every token but the first is
    predicted exactly once, with at least one token of context in its window when
    ``stride < max_length``.

    Example:
        ```py
        >>> windows([1, 2, 3, 4, 5], max_length=3, stride=2)
        [([1, 2, 3], 1), ([3, 4, 5], 1)]
        >>> windows([1, 2, 3, 4, 5], max_length=4, stride=2)
        [([1, 2, 3, 4], 1), ([3, 4, 5], 2)]
        ```
    """
    out, done, begin = [], 0, 0
    while done < len(ids):
        end = min(begin + max_length, len(ids))
        window = list(ids[begin:end])
        out.append((window, max(done - begin, 1)))
        done, begin = end, begin + stride
    return [(w, t) for w, t in out if t < len(w)]


def is_conversation(value: Any) -> bool:
    """Whether a cell holds a conversation: a list of ``{role, content}`` mappings."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in value)
    )


class Scorer:
    """Scores causal language models on a ``causal-lm`` task (see the module docstring).

    Implements :class:`~hfsoup.tasks.kinds.TaskScorer`. Outputs are, per example, the
    log-probabilities of its target tokens (float32, CPU), a list with one tensor per example.

    Args:
        task: The task (``kind: causal-lm``).
        tokenizer: The ingredients' tokenizer.
        progress: Show a progress bar per forward pass.
        splits: Already loaded splits (as :func:`load_task_splits` returns them).
        processes: Score data-parallel with these processes (see ``BatchRunner``).
    """

    def __init__(
        self,
        task: Task | str | dict[str, Any],
        tokenizer: Any,
        *,
        progress: bool = True,
        splits: dict[str, datasets.Dataset] | None = None,
        processes: Processes | None = None,
    ) -> None:
        self.task = resolve_task(task)
        self.runner = BatchRunner(processes, progress=progress)
        loaded = splits if splits is not None else load_task_splits(self.task)
        prepare = _Preparer(self.task, tokenizer)
        self.splits = {name: prepare(name, dataset) for name, dataset in loaded.items()}
        self.cache: dict[tuple[str, str], list[torch.Tensor]] = {}

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
        """Lower is better for perplexity, higher for choice accuracy."""
        return LOWER if self.selection_metric == PERPLEXITY else HIGHER

    def split(self, name: str) -> LMSplit:
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
    ) -> list[torch.Tensor]:
        """Per example, the log-probabilities of its target tokens (cached under ``key``)."""
        if key is not None and (key, split) in self.cache:
            return self.cache[(key, split)]
        prepared = self.split(split)
        rows = _rows(self.runner.run(_forward, model, prepared, split), prepared.labels)
        result = _by_example(rows, prepared.row_example, prepared.examples)
        if key is not None:
            self.cache[(key, split)] = result
        return result

    def scores(self, outputs: Sequence[torch.Tensor], split: str) -> dict[str, float]:
        """``{metric: value}`` for ``outputs`` on ``split`` (the task has one metric)."""
        return {self.selection_metric: self.selection_score(outputs, split)}

    def selection_score(self, outputs: Sequence[torch.Tensor], split: str | None = None) -> float:
        """Perplexity, or choice accuracy, of ``outputs`` on ``split`` (default: selection)."""
        prepared = self.split(split or self.selection_split)
        if len(outputs) != prepared.examples:
            raise ValueError(f"{len(outputs)} outputs for {prepared.examples} examples")
        if self.selection_metric == PERPLEXITY:
            return perplexity(_nll_sum(outputs), _count(prepared))
        correct = sum(self._correct(prepared, i, o) for i, o in enumerate(outputs))
        return correct / prepared.examples if prepared.examples else 0.0

    def score_with_early_stop(
        self, model: torch.nn.Module, split: str, threshold: float, *, strict: bool = False
    ) -> EarlyStop:
        """Score ``model`` on ``split``, stopping once it can no longer reach ``threshold``.

        Perplexity: every token's NLL is >= 0 and the total is an exactly rounded sum
        (``math.fsum``), so the partial sum never exceeds the total and the perplexity computed
        from it by the same function (non-decreasing in the sum) bounds the full one from
        below; scoring stops once that bound cannot reach the threshold. Choice accuracy: the
        threshold becomes the least number of right answers (``required_count``) and scoring
        stops once the questions left cannot make it up. Either way the decision equals a full
        evaluation's. ``examples_scored`` counts rows.
        """
        prepared = self.split(split)
        bound = _PerplexityBound(prepared) if self.selection_metric == PERPLEXITY else None
        accuracy = None if bound else _AccuracyBound(self, prepared, threshold, strict)
        rows: list[torch.Tensor] = []
        with evaluating(model):
            batches = self.runner.in_order(_forward, model, prepared, split)
            for output, labels in zip(batches, prepared.labels, strict=True):
                new = _rows([output], [labels])
                rows += new
                done = len(rows) < prepared.size
                if bound and done and not LOWER.reaches(bound.add(new), threshold, strict=strict):
                    return EarlyStop(None, len(rows))
                if accuracy and done and accuracy.hopeless(rows):
                    return EarlyStop(None, len(rows))
        outputs = _by_example(rows, prepared.row_example, prepared.examples)
        return EarlyStop(self.selection_score(outputs, split), len(rows))

    @staticmethod
    def ensemble(outputs: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """Mean next-token probabilities: ``logsumexp_i(logp_i) - log k`` per target token."""
        if not outputs:
            raise ValueError("an ensemble needs at least one model's outputs")
        k = len(outputs)
        return [
            torch.logsumexp(torch.stack(per), dim=0) - math.log(k) for per in zip(*outputs, strict=True)
        ]  # fmt: skip

    def greedy_ensemble(
        self, outputs: Sequence[Any], split: str | None = None, *, strict: bool = False
    ) -> list[int]:
        """The paper's greedy ensemble on ``split`` (default: selection)."""
        split = split or self.selection_split
        return greedy_ensemble(
            outputs, lambda o: self.selection_score(o, split), strict=strict,
            direction=self.direction, combine=self.ensemble,
        )  # fmt: skip

    def check_learnable(self) -> None:
        """Every causal-LM task can be learned on: the loss is the target tokens' NLL."""

    @staticmethod
    def loss(output: Any, beta: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Next-token NLL of the target tokens at temperature ``beta``, summed over the batch."""
        logits = output.logits if hasattr(output, "logits") else output[0]
        shifted = (beta * logits[:, :-1].float()).flatten(0, 1)
        return F.cross_entropy(
            shifted, targets[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
        )

    def _correct(self, prepared: LMSplit, example: int, output: torch.Tensor) -> bool:
        return (
            choice(output, prepared, example, normalize=self.task.normalize)
            == prepared.gold[example]
        )


def perplexity(nll_sum: float, tokens: int) -> float:
    """``exp(nll_sum / tokens)``: the one computation every perplexity here goes through."""
    return math.exp(nll_sum / tokens) if tokens else float("nan")


def choice(output: torch.Tensor, prepared: LMSplit, example: int, *, normalize: bool) -> int:
    """The choice an example's target log-probabilities pick (the first on ties)."""
    sizes = prepared.choice_tokens[example]
    totals = [float(part.double().sum()) for part in output.split(sizes)]
    if normalize:
        totals = [
            t / max(c, 1) for t, c in zip(totals, prepared.choice_lengths[example], strict=True)
        ]
    return max(range(len(totals)), key=lambda i: (totals[i], -i))


def _nll_sum(outputs: Sequence[torch.Tensor]) -> float:
    # NLL clamped at 0 so that the bound holds even for an ensemble's log(mean p) rounding up.
    return math.fsum(v for o in outputs for v in (-o.double()).clamp_min(0).tolist())


def _count(prepared: LMSplit) -> int:
    return sum(int((labels[:, 1:] != IGNORE).sum()) for labels in prepared.labels)


class _PerplexityBound:
    def __init__(self, prepared: LMSplit) -> None:
        self.tokens, self.values = _count(prepared), []

    def add(self, rows: list[torch.Tensor]) -> float:
        self.values += [v for r in rows for v in (-r.double()).clamp_min(0).tolist()]
        return perplexity(math.fsum(self.values), self.tokens)


class _AccuracyBound:
    def __init__(self, scorer: Scorer, prepared: LMSplit, threshold: float, strict: bool) -> None:
        self.scorer, self.prepared = scorer, prepared
        self.needed = required_count(threshold, prepared.examples, strict=strict)

    def hopeless(self, rows: list[torch.Tensor]) -> bool:
        prepared = self.prepared
        complete = prepared.row_example[len(rows) - 1] + (
            len(rows) == len(prepared.row_example)
            or prepared.row_example[len(rows)] != prepared.row_example[len(rows) - 1]
        )
        outputs = _by_example(rows, prepared.row_example[: len(rows)], complete)
        correct = sum(self.scorer._correct(prepared, i, o) for i, o in enumerate(outputs))
        return correct + (prepared.examples - complete) < self.needed


@torch.inference_mode()
def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(rows, length - 1)`` log-probabilities of each next token given the tokens before."""
    device = next(model.parameters()).device
    output = model(**to_device(batch, device))
    logits = (output.logits if hasattr(output, "logits") else output[0])[:, :-1].float()
    ids = batch["input_ids"][:, 1:].to(logits.device)
    return logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1).cpu()


def _rows(outputs: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per row, the log-probabilities at its target positions."""
    rows = []
    for logp, target in zip(outputs, labels, strict=True):
        mask = target[:, 1:] != IGNORE
        rows += [logp[r][mask[r]] for r in range(len(target))]
    return rows


def _by_example(
    rows: list[torch.Tensor], row_example: Sequence[int], examples: int
) -> list[torch.Tensor]:
    parts: list[list[torch.Tensor]] = [[] for _ in range(examples)]
    for row, example in zip(rows, row_example, strict=False):
        if example < examples:
            parts[example].append(row)
    return [torch.cat(p) if p else torch.empty(0) for p in parts]


class _Preparer:
    """Tokenizes a split into rows and batches them (one instance per task and tokenizer)."""

    def __init__(self, task: Task, tokenizer: Any) -> None:
        self.task, self.tokenizer = task, tokenizer
        self.pad = tokenizer.pad_token_id
        if self.pad is None:
            self.pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    def __call__(self, name: str, dataset: datasets.Dataset) -> LMSplit:
        if self.task.selection_metric == PERPLEXITY:
            return self._perplexity(name, dataset)
        return self._choices(name, dataset)

    def _perplexity(self, name: str, dataset: datasets.Dataset) -> LMSplit:
        stride = self.task.stride or self.task.max_length // 2
        rows, owners = [], []
        for i, value in enumerate(dataset[self.task.input_columns[0]]):
            for window, start in windows(self._ids(value), self.task.max_length, stride):
                rows.append((window, start))
                owners.append(i)
        return self._batched(name, rows, owners, len(dataset))

    def _choices(self, name: str, dataset: datasets.Dataset) -> LMSplit:
        rows, owners, sizes, lengths, gold = [], [], [], [], []
        column, choices = self.task.input_columns[0], self.task.choices_column or "choices"
        for i, example in enumerate(dataset):
            options, answer = example[choices], example[self.task.label_column]
            if not isinstance(options, list) or not options or not isinstance(answer, int):
                raise TaskError(
                    f"split {name!r} row {i}: {choices!r} must be a list of choices and "
                    f"{self.task.label_column!r} the index of the right one"
                )
            if not 0 <= answer < len(options):
                raise TaskError(f"split {name!r} row {i}: gold index {answer} outside the choices")
            context = self._ids(example[column]) or [self.pad]
            sizes.append([])
            for text in options:
                ids = self.tokenizer(str(text), add_special_tokens=False)["input_ids"]
                whole = (context + ids)[-self.task.max_length :]
                if not ids or len(ids) >= len(whole):
                    raise TaskError(
                        f"split {name!r} row {i}: a choice must be 1 to max_length - 1 tokens"
                    )
                rows.append((whole, len(whole) - len(ids)))
                owners.append(i)
                sizes[-1].append(len(ids))
            lengths.append([len(str(t)) for t in options])
            gold.append(answer)
        split = self._batched(name, rows, owners, len(dataset))
        split.choice_tokens, split.choice_lengths, split.gold = sizes, lengths, gold
        return split

    def _ids(self, value: Any) -> list[int]:
        template = self.task.chat_template
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if is_conversation(value):
            if template is None and has_template or template:
                if not has_template:
                    raise TaskError("the tokenizer has no chat template", options=["chat_template"])
                text = self.tokenizer.apply_chat_template(value, tokenize=False)
                return self.tokenizer(text, add_special_tokens=False)["input_ids"]
            value = "\n".join(str(m["content"]) for m in value)
        elif template:
            raise TaskError(
                "a chat template needs a conversational column (a list of role/content messages)",
                options=["chat_template"],
            )
        if not isinstance(value, str):
            raise TaskError(f"expected text, got {type(value).__name__}", options=["input_columns"])
        return self.tokenizer(value)["input_ids"]

    def _batched(self, name: str, rows: list, owners: list[int], examples: int) -> LMSplit:
        size = self.task.batch_size
        batches, labels = [], []
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            target = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
            for r, (row, first) in enumerate(chunk):
                ids[r, : len(row)] = torch.tensor(row)
                mask[r, : len(row)] = 1
                target[r, first : len(row)] = torch.tensor(row[first:])
            batches.append({"input_ids": ids, "attention_mask": mask})
            labels.append(target)
        return LMSplit(name, batches, labels, owners, examples)


_LM_ARCHITECTURES = ("ForCausalLM", "LMHeadModel")


class CausalLM:
    """The ``causal-lm`` task kind: perplexity and multiple-choice accuracy."""

    name = "causal-lm"

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
        """A :class:`Scorer` with model ``source``'s tokenizer.

        Raises:
            TaskError: the model is not a causal LM, has no tokenizer, or the data does not fit.
        """
        from transformers import AutoConfig

        from hfsoup.tasks.preprocess import load_preprocessor

        task = resolve_task(task)
        try:
            config = AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise TaskError(f"cannot load the config of {source!r}: {err}".splitlines()[0]) from err
        arch = (getattr(config, "architectures", None) or ["?"])[0]
        if not arch.endswith(_LM_ARCHITECTURES):
            raise TaskError(
                f"the causal-lm task kind scores language models; {source!r} is a {arch}",
                options=["kind"],
            )
        tokenizer = load_preprocessor(source, image=False, revision=revision)
        return Scorer(task, tokenizer, progress=progress, processes=processes)


KIND = CausalLM()
"""The kind registered as ``causal-lm`` (see :mod:`hfsoup.tasks.kinds`)."""
