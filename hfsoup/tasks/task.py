"""What to score on: a dataset, its splits, columns and metrics, and the built-in GLUE tasks.

A :class:`Task` holds exactly the keys of a recipe's ``task:`` block. It knows nothing about
models; loading and preprocessing live in :mod:`hfsoup.tasks.data` and
:mod:`hfsoup.tasks.preprocess`.

Data hygiene is decided here, before anything is downloaded: the selection split (used to rank
and accept ingredients) must not be a report split unless ``allow_overlap`` is set, and GLUE's
``test*`` splits, which carry no labels, cannot be scored at all.
"""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from hfsoup.errors import TaskError
from hfsoup.tasks.kinds import DEFAULT_KIND, kind_names

GLUE_ID = "nyu-mll/glue"
"""The canonical Hub ID of GLUE (``glue`` is accepted as an alias and rewritten to this)."""

CAUSAL_LM = "causal-lm"
"""The causal-LM kind's name (:mod:`hfsoup.tasks.causal_lm`): its keys are checked here."""

CAUSAL_LM_METRICS = ("perplexity", "choice-accuracy")
"""The metrics of the causal-LM kind (a task names one of them)."""

# Keys only the causal-LM kind reads -> their defaults (left out of dumps when default).
_KIND_KEYS: dict[str, Any] = {
    "choices_column": None, "stride": None, "normalize": False, "chat_template": None,
}  # fmt: skip

HOLDOUT_SPLIT = "holdout"
"""The name of the selection split when it is carved out of another split by ``holdout``."""

# name -> (input columns, metrics; the first metric selects)
_GLUE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "cola": (("sentence",), ("matthews_correlation",)),
    "sst2": (("sentence",), ("accuracy",)),
    # The GLUE leaderboard reports MRPC and QQP as "F1 / Accuracy": F1 first, so F1 selects.
    "mrpc": (("sentence1", "sentence2"), ("f1", "accuracy")),
    "qqp": (("question1", "question2"), ("f1", "accuracy")),
    # Regression (one logit); the leaderboard reports "Pearson / Spearman".
    "stsb": (("sentence1", "sentence2"), ("pearsonr", "spearmanr")),
    "mnli": (("premise", "hypothesis"), ("accuracy",)),
    "qnli": (("question", "sentence"), ("accuracy",)),
    "rte": (("sentence1", "sentence2"), ("accuracy",)),
    "wnli": (("sentence1", "sentence2"), ("accuracy",)),
}

PRESETS: tuple[str, ...] = tuple(f"glue/{name}" for name in _GLUE)
"""Names accepted by :func:`resolve_task` as built-in tasks."""

GLUE_HOLDOUT_FRACTION = 0.05
"""Share of GLUE's train split held out as the selection split of the presets (seed 0)."""


class Holdout(BaseModel):
    """Carve the selection split out of another split (the paper held out 2% of ImageNet train).

    A seeded shuffle of ``from``'s row indices picks ``fraction`` of its rows as the selection
    split (named ``"holdout"``). The remaining rows are never used unless ``from`` is also listed
    as a report split, in which case that report covers only the remaining rows.

    Example:
        ```yaml
        holdout: {from: train, fraction: 0.02, seed: 0}
        ```
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: str = Field("train", alias="from")
    fraction: float = Field(gt=0.0, lt=1.0, allow_inf_nan=False)
    seed: int = Field(0, ge=0)  # numpy's generators take no negative seed


class Task(BaseModel):
    """A scoring task: dataset, selection and report splits, columns, metrics.

    Attributes:
        kind: The task kind (:mod:`hfsoup.tasks.kinds`): ``classification`` (the default)
            or a registered kind. Left out of dumps when it is the default, so the recipes
            and results of classification tasks read as they always did.
        dataset: A Hub dataset ID (``org/name``), or keyword arguments of
            ``datasets.load_dataset`` for local files, e.g.
            ``{"path": "parquet", "data_files": {"validation": "v.parquet"}}``.
        config: The dataset configuration (GLUE's ``sst2``, ...), or ``None``.
        selection_split: The held-out split used to rank and accept ingredients. ``None``
            (the default) means ``"validation"``, or ``"holdout"`` when ``holdout`` is given
            (it must then be that).
        report_splits: Splits scored for the report (in-distribution test, distribution shifts).
        input_columns: One or two text columns, or the single image column.
        label_column: The column with the labels (class ids, label names or regression targets).
        metrics: ``evaluate`` metric names; the first one is the selection metric.
        limit: Score only the first ``limit`` rows of every split (after the holdout is carved
            out). The order is the dataset's own, not shuffled, so that the same rows are scored
            on every run; a dataset sorted by label needs a shuffled copy or no limit.
        batch_size: Examples per forward pass.
        max_length: Tokens per example after truncation (text tasks).
        holdout: Carve the selection split out of another split, see :class:`Holdout`.
        allow_overlap: Allow a report split to be the selection split (reported scores are then
            biased upwards: the selection saw them).
        choices_column: ``causal-lm`` choice accuracy: the column with each example's list of
            choices (default ``choices``; the context is ``input_columns[0]``, the gold index
            ``label_column``).
        stride: ``causal-lm`` perplexity: a window starts every ``stride`` tokens of a text
            longer than ``max_length``; below ``max_length`` (default ``max_length // 2``).
        normalize: ``causal-lm`` choice accuracy: divide each choice's log-likelihood by its
            length in characters (lm-evaluation-harness ``acc_norm``).
        chat_template: ``causal-lm``: apply the tokenizer's chat template to conversational
            data (``None``: when the data is conversational and the tokenizer has one).

    Raises:
        TaskError: On overlapping splits without ``allow_overlap``, GLUE test splits, or
            malformed columns/metrics/dataset (pydantic's ``ValidationError`` for wrong keys or
            types; :func:`resolve_task` turns those into ``TaskError`` too).
    """

    model_config = ConfigDict(extra="forbid")

    kind: str = DEFAULT_KIND
    dataset: str | dict[str, Any]
    config: str | None = None
    selection_split: str | None = None
    report_splits: list[str] = Field(default_factory=lambda: ["test"])
    input_columns: list[str] = Field(default_factory=lambda: ["text"])
    label_column: str = "label"
    metrics: list[str] = Field(default_factory=lambda: ["accuracy"])
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=1)
    max_length: int = Field(128, ge=1)
    holdout: Holdout | None = None
    allow_overlap: bool = False
    choices_column: str | None = None
    stride: int | None = Field(None, ge=1)
    normalize: bool = False
    chat_template: bool | None = None

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("kind") == DEFAULT_KIND:
            del data["kind"]
        for key, default in _KIND_KEYS.items():  # left out unset: dumps read as before them
            if key in data and data[key] == default:
                del data[key]
        return data

    @model_validator(mode="after")
    def _check(self) -> Task:
        if self.kind not in kind_names():
            raise TaskError(
                f"unknown task kind {self.kind!r}; task kinds: {', '.join(kind_names())}"
            )
        if isinstance(self.dataset, dict) and "path" not in self.dataset:
            raise TaskError(
                "task dataset given as a mapping needs a 'path' (e.g. {path: parquet, data_files: ...})"
            )
        if self.dataset == "glue":
            self.dataset = GLUE_ID
        if self.selection_split is None:
            self.selection_split = "validation" if self.holdout is None else HOLDOUT_SPLIT
        elif self.holdout is not None and self.selection_split != HOLDOUT_SPLIT:
            raise TaskError(
                f"with holdout, the selection split is carved out of {self.holdout.from_!r} "
                f"and is called {HOLDOUT_SPLIT!r}; drop selection_split "
                f"({self.selection_split!r}) or set it to {HOLDOUT_SPLIT!r}"
            )
        if not 1 <= len(self.input_columns) <= 2:
            raise TaskError(
                f"input_columns takes one or two text columns or one image column, got {self.input_columns}"
            )
        if not self.metrics:
            raise TaskError("a task needs at least one metric (the first one selects)")
        for field in ("report_splits", "metrics", "input_columns"):
            values = getattr(self, field)
            if len(set(values)) != len(values):
                raise TaskError(f"{field} lists a name twice: {values}")
        if not self.report_splits:
            raise TaskError("a task needs at least one report split")
        if self.selection_split in self.report_splits and not self.allow_overlap:
            raise TaskError(
                f"report split {self.selection_split!r} is also the selection split; scores on it "
                "would be biased upwards: report another split, or allow it with allow_overlap",
                options=["allow_overlap"],
            )
        if self.is_glue:
            self._check_glue()
        self._check_kind_keys()
        return self

    def _check_kind_keys(self) -> None:
        if self.kind == CAUSAL_LM:
            if "metrics" not in self.model_fields_set:
                self.metrics = ["perplexity"]
            unknown = [m for m in self.metrics if m not in CAUSAL_LM_METRICS]
            if unknown or len(self.metrics) != 1:
                raise TaskError(
                    f"a causal-lm task scores one metric, {' or '.join(CAUSAL_LM_METRICS)}; "
                    f"got {', '.join(self.metrics)}",
                    options=["metrics"],
                )
            if self.stride is not None and self.stride >= self.max_length:
                raise TaskError(
                    f"stride {self.stride} must be shorter than max_length {self.max_length}: "
                    "a window's first token predicts nothing, so windows must overlap",
                    options=["stride"],
                )
            if self.max_length < 2:
                raise TaskError("a causal-lm task needs max_length >= 2", options=["max_length"])
            return
        given = [k for k, d in _KIND_KEYS.items() if getattr(self, k) != d]
        if given:
            raise TaskError(
                f"{given[0]} is a key of causal-lm tasks, not of {self.kind} ones",
                options=[given[0], "kind"],
            )

    def _check_glue(self) -> None:
        if self.config is None:
            raise TaskError(
                f"GLUE needs a config naming the task ({', '.join(_GLUE)}); try the task glue/sst2",
                options=["task"],
            )
        splits = [*self.source_splits(), *self.report_splits]
        unlabelled = sorted({s for s in splits if s.startswith("test")})
        if unlabelled:
            raise TaskError(
                f"GLUE test splits carry no labels and cannot be scored: {', '.join(unlabelled)}"
            )

    @property
    def is_glue(self) -> bool:
        """Whether the dataset is GLUE on the Hub."""
        return self.dataset == GLUE_ID

    @property
    def selection_metric(self) -> str:
        """The metric that ranks and accepts ingredients (the first one listed)."""
        return self.metrics[0]

    @property
    def data_columns(self) -> list[str]:
        """The dataset columns the task reads (inputs, then choices and labels as the kind has)."""
        if self.kind != CAUSAL_LM:
            return [*self.input_columns, self.label_column]
        if self.selection_metric == "perplexity":
            return [*self.input_columns]
        return [*self.input_columns, self.choices_column or "choices", self.label_column]

    @property
    def splits(self) -> list[str]:
        """The selection split, then the report splits: every split that gets scored."""
        return [self.selection_split, *(s for s in self.report_splits if s != self.selection_split)]

    def source_splits(self) -> list[str]:
        """The dataset splits to load (``holdout.from`` instead of the carved selection split)."""
        if self.holdout is None:
            names = [self.selection_split, *self.report_splits]
        else:
            names = [self.holdout.from_, *(s for s in self.report_splits if s != HOLDOUT_SPLIT)]
        return [n for i, n in enumerate(names) if n not in names[:i]]


def glue_task(name: str) -> Task:
    """The built-in task for GLUE's ``name`` (``sst2``, ``mnli``, ...).

    Splits (GLUE's test splits have no labels, so the labelled validation split is the report):

    - ``mnli``: selection ``validation_matched``, report ``validation_mismatched``.
    - every other task: selection = 5% of ``train`` held out with seed 0 (``holdout``),
      report = ``validation``. Ingredients must have been fine-tuned without those rows, or
      the selection scores are measured on their training data: give a custom holdout or
      selection split if they were not.

    Metrics (the first selects): cola ``matthews_correlation``; sst2, qnli, rte, wnli, mnli
    ``accuracy``; mrpc and qqp ``f1`` then ``accuracy`` (GLUE's "F1 / Accuracy" order); stsb
    ``pearsonr`` then ``spearmanr`` (a regression head with one output).

    Raises:
        TaskError: ``name`` is not a GLUE task.
    """
    if name not in _GLUE:
        raise TaskError(f"unknown GLUE task {name!r}; GLUE tasks: {', '.join(_GLUE)}")
    columns, metrics = _GLUE[name]
    fields: dict[str, Any] = {
        "dataset": GLUE_ID,
        "config": name,
        "input_columns": list(columns),
        "label_column": "label",
        "metrics": list(metrics),
    }
    if name == "mnli":
        fields |= {
            "selection_split": "validation_matched",
            "report_splits": ["validation_mismatched"],
        }
    else:
        holdout = {"from": "train", "fraction": GLUE_HOLDOUT_FRACTION, "seed": 0}
        fields |= {"holdout": holdout, "report_splits": ["validation"]}
    return Task.model_validate(fields)


def resolve_task(value: str | dict[str, Any] | Task, **overrides: Any) -> Task:
    """Turn a preset name, a recipe's ``task:`` mapping or a :class:`Task` into a checked Task.

    Args:
        value: ``"glue/<name>"`` (``"nyu-mll/glue/<name>"`` too), a mapping with the keys of
            :class:`Task`, or a Task.
        **overrides: Task keys to replace (e.g. ``limit=200`` beside ``--task glue/sst2``);
            the result is validated again as a whole.

    Returns:
        The validated task.

    Raises:
        TaskError: Unknown preset, unknown or ill-typed key, or a task that fails the checks
            of :class:`Task` (overlap, GLUE test splits, ...).

    Example:
        ```py
        >>> resolve_task("glue/mnli").selection_split
        'validation_matched'
        ```
    """
    if isinstance(value, str):
        task = _preset(value)
    elif isinstance(value, Task):
        task = value
    elif isinstance(value, dict):
        task = _validate(value)
    else:
        raise TaskError(f"a task is a preset name or a mapping, got {type(value).__name__}")
    if not overrides:
        return task
    fields = task.model_dump(by_alias=True, exclude_unset=True)
    if task.holdout is not None and fields.get("selection_split") == HOLDOUT_SPLIT:
        del fields["selection_split"]  # derived from holdout: follows an overridden holdout
    return _validate({**fields, **overrides})


def _preset(name: str) -> Task:
    key = name.strip().lower()
    for prefix in ("glue/", f"{GLUE_ID}/"):
        if key.startswith(prefix) and key[len(prefix) :] in _GLUE:
            return glue_task(key[len(prefix) :])
    raise TaskError(
        f"unknown task {name!r}; built-in tasks: {', '.join(PRESETS)} "
        "(for another dataset give a task block naming its dataset)",
        options=["dataset"],
    )


def _validate(fields: dict[str, Any]) -> Task:
    try:
        return Task.model_validate(fields)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "task"
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise TaskError(f"invalid task key {where}: {first['msg']}{more}") from None
