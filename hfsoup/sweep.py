"""Make ingredients: fine-tune one base model K times with random hyperparameters.

The paper's recipe starts here: one pretrained model, one head initialisation (saved once and
reused, since soups need a shared init), K fine-tunes with hyperparameters drawn at random.
Each ingredient is saved (and optionally pushed) with a card recording its hyperparameters,
its base model and its scores. An interrupted sweep continues at the next ingredient.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hfsoup.errors import RecipeError, TaskError
from hfsoup.ingredients import HPARAMS_FILE
from hfsoup.tasks.task import Task, resolve_task

log = logging.getLogger("hfsoup")

_DONE = "hfsoup_sweep_done.json"


class SearchSpace(BaseModel):
    """Where hyperparameters are drawn from (defaults: a CPU-sized version of the paper's sweep).

    Learning rate is log-uniform in ``learning_rate``; every other entry is a list of choices.
    """

    model_config = ConfigDict(extra="forbid")

    learning_rate: tuple[float, float] = (2e-5, 2e-4)
    epochs: list[float] = Field(default_factory=lambda: [1, 2])
    weight_decay: list[float] = Field(default_factory=lambda: [0.0, 1e-4, 1e-2, 0.1])
    label_smoothing: list[float] = Field(default_factory=lambda: [0.0, 0.1])
    warmup: list[float] = Field(default_factory=lambda: [0.0, 0.06])
    batch_size: list[int] = Field(default_factory=lambda: [32])

    def draw(self, rng: random.Random) -> dict[str, Any]:
        """One point: Trainer argument names, plus the training and data-order seeds."""
        low, high = self.learning_rate
        return {
            "learning_rate": math.exp(rng.uniform(math.log(low), math.log(high))),
            "num_train_epochs": rng.choice(self.epochs),
            "weight_decay": rng.choice(self.weight_decay),
            "label_smoothing_factor": rng.choice(self.label_smoothing),
            "warmup_steps": rng.choice(self.warmup),  # a float in [0, 1) is a ratio of all steps
            "per_device_train_batch_size": rng.choice(self.batch_size),
            "seed": rng.randrange(2**31),
            "data_seed": rng.randrange(2**31),
        }


# Deliberately bad ingredients (``junk``): a learning rate far above any sane one, on labels
# rotated by one class, so each learns the wrong thing and moves far from the shared init.
JUNK_SPACE = SearchSpace(learning_rate=(2e-3, 5e-3), epochs=[1], weight_decay=[0.0],
                         label_smoothing=[0.0], warmup=[0.0])  # fmt: skip
JUNK_KEY = "junk_rotated_labels"


class SweepRecipe(BaseModel):
    """A sweep: the base model, the task, how many ingredients, where they go."""

    model_config = ConfigDict(extra="forbid")

    base: str
    task: Any
    n: int = Field(ge=1)
    space: SearchSpace = Field(default_factory=SearchSpace)
    push_prefix: str | None = None
    output_dir: str = "sweep"
    seed: int = 0
    train_split: str = "train"
    train_limit: int | None = Field(None, ge=1)
    head_seed: int = 0
    private: bool = False
    # {label name: sentences}: the head starts as a zero-shot classifier (:func:`zero_shot_head`)
    head_prototypes: dict[str, list[str]] | None = None
    junk: int = Field(0, ge=0)
    junk_space: SearchSpace = Field(default_factory=lambda: JUNK_SPACE.model_copy())

    @field_validator("task", mode="before")
    @classmethod
    def _task(cls, value: Any) -> Task:
        return resolve_task(value)


def load_sweep_recipe(path: str | Path) -> SweepRecipe:
    """Read a sweep recipe YAML (keys of :class:`SweepRecipe`)."""
    import yaml
    from pydantic import ValidationError

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        return SweepRecipe.model_validate(data)
    except OSError as exc:
        raise RecipeError(f"cannot read sweep recipe {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc.problem})") from exc
    except ValidationError as exc:
        raise RecipeError(f"{path}: {validation_line(exc)}") from exc


def validation_line(exc: Any) -> str:
    """``key: message`` for the first problem pydantic's ``ValidationError`` reports."""
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"


def _log(message: str, progress: bool) -> None:
    """A progress step, at INFO on the ``hfsoup`` logger (the CLI shows it as ``hfsoup: ...``)."""
    if progress:
        log.info("%s", message)


def train_rows(recipe: SweepRecipe):
    """The training split, without the rows a holdout reserves for selection."""
    import datasets

    task = recipe.task
    kwargs = task.dataset if isinstance(task.dataset, dict) else {"path": task.dataset}
    try:
        train = datasets.load_dataset(**kwargs, name=task.config, split=recipe.train_split)
    except (ValueError, FileNotFoundError) as exc:
        raise TaskError(
            f"cannot load split {recipe.train_split!r} of {kwargs['path']}: {exc}"
        ) from exc
    if task.holdout is not None and task.holdout.from_ == recipe.train_split:
        from hfsoup.tasks.data import holdout_indices

        _, rest = holdout_indices(len(train), task.holdout.fraction, task.holdout.seed)
        train = train.select(rest)
    if recipe.train_limit:
        train = train.select(range(min(recipe.train_limit, len(train))))
    return train


def base_with_head(recipe: SweepRecipe, folder: Path, labels: list[str]) -> Path:
    """The base model with one classification head, saved once and reused: the shared init.

    The head is seeded at random, or, with ``recipe.head_prototypes``, the zero-shot head of
    :func:`zero_shot_head` (the same base is then also the θ₀ of task vectors).
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(recipe.head_seed)
    # Repo code is never run: trust_remote_code stays off even if a base's config asks for it.
    model = AutoModelForSequenceClassification.from_pretrained(
        recipe.base, num_labels=len(labels), trust_remote_code=False,
        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
    )  # fmt: skip
    tok = AutoTokenizer.from_pretrained(recipe.base, trust_remote_code=False)
    if recipe.head_prototypes is not None:
        missing = [n for n in labels if not recipe.head_prototypes.get(n)]
        if missing:
            raise RecipeError(
                f"head_prototypes has no sentences for the labels {', '.join(missing)}",
                options=["head_prototypes"],
            )
        prototypes = [recipe.head_prototypes[n] for n in labels]
        zero_shot_head(model, tok, prototypes, max_length=recipe.task.max_length)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def sentence_embeddings(model, tok, texts: list[str], *, max_length: int | None = None):
    """What a BERT-style classification head reads: the pooler output, ``(len(texts), h)``."""
    import torch

    encoder = model.base_model
    was_training = encoder.training
    encoder.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            batch = tok(texts[i : i + 64], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")  # fmt: skip
            out.append(encoder(**batch).pooler_output.float())
    encoder.train(was_training)
    return torch.cat(out)


def zero_shot_head(model, tok, prototypes: list[list[str]], *, max_length: int | None = None):
    """Make ``model``'s linear head a nearest-prototype classifier, in place; returns it.

    Row ``i`` of the head is the unit-length mean pooler embedding of label ``i``'s prototype
    sentences and the bias is 0, so the argmax of the logits is the label whose prototype has
    the highest cosine similarity with the input's embedding (the input's norm is common to
    every row). The base scores above chance with no training, and fine-tunes start from it.

    Raises:
        RecipeError: the model's head is not one linear layer over the pooler output
            (BERT-style), or the prototypes are not one list per label.
    """
    import torch

    head = getattr(model, "classifier", None)
    pooler = getattr(model.base_model, "pooler", None)
    if not isinstance(head, torch.nn.Linear) or pooler is None:
        raise RecipeError(
            f"a zero-shot head needs a BERT-style model (one linear classifier over the pooler "
            f"output); {type(model).__name__} has another head",
            options=["head_prototypes"],
        )
    if len(prototypes) != head.out_features:
        raise RecipeError(f"{len(prototypes)} prototype lists for {head.out_features} labels")
    rows = [sentence_embeddings(model, tok, p, max_length=max_length).mean(0) for p in prototypes]
    with torch.no_grad():
        head.weight.copy_(torch.nn.functional.normalize(torch.stack(rows), dim=-1))
        head.bias.zero_()
    return model


def _labels(train, column: str) -> list[str]:
    import datasets

    feature = train.features.get(column)
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return [str(v) for v in sorted(set(train[column]))]


def fine_tune(
    base: Path, out: Path, train, task: Task, hp: dict[str, Any], *, progress: bool = True
) -> None:
    """Fine-tune ``base`` on ``train`` with transformers' Trainer; save model and tokenizer."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )  # fmt: skip

    tok = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    columns = task.input_columns
    hp = dict(hp)
    rotate = hp.pop(JUNK_KEY, False)
    model = AutoModelForSequenceClassification.from_pretrained(base, trust_remote_code=False)
    classes = model.config.num_labels

    def encode(batch):
        texts = [batch[c] for c in columns]
        encoded = tok(*texts, truncation=True, max_length=task.max_length)
        if rotate:  # a junk ingredient: every label replaced by the next class
            encoded[task.label_column] = [(y + 1) % classes for y in batch[task.label_column]]
        return encoded

    ds = train.map(encode, batched=True).rename_column(task.label_column, "labels")
    ds = ds.remove_columns(
        [c for c in ds.column_names if c not in ("labels", *tok.model_input_names)]
    )
    args = TrainingArguments(
        output_dir=str(out / "trainer"), report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, **hp,
    )  # fmt: skip
    collator = DataCollatorWithPadding(tok)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    # Trainer prints its metrics to stdout, which belongs to the command's own output.
    with contextlib.redirect_stdout(sys.stderr if progress else io.StringIO()):
        trainer.train()
    model.save_pretrained(out)
    tok.save_pretrained(out)


def ingredient_card(recipe: SweepRecipe, hp: dict[str, Any], scores: dict, index: int) -> str:
    """README.md of one sweep ingredient: metadata, hyperparameters, scores."""
    import yaml

    meta = {"library_name": "transformers", "pipeline_tag": "text-classification",
            "tags": ["hfsoup", "hfsoup-sweep"]}  # fmt: skip
    if not Path(recipe.base).exists():  # a Hub ID, not a local folder
        meta |= {"base_model": recipe.base, "base_model_relation": "finetune"}
    rows = "\n".join(
        f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |"
        for k, v in hp.items()
    )
    score_rows = "\n".join(
        f"| {s} | {m} | {v:.4f} |" for s, ms in scores.items() for m, v in ms.items()
    )
    return (
        f"---\n{yaml.safe_dump(meta, sort_keys=False).rstrip()}\n---\n\n"
        f"# Sweep ingredient {index + 1} of {recipe.n + recipe.junk}\n\n"
        f"A fine-tune of `{recipe.base}` made by `hfsoup sweep` (seed {recipe.seed}), with one "
        "classification head initialisation shared by every ingredient of the sweep, so that "
        "the ingredients can be souped.\n\n"
        f"## Hyperparameters\n\n| name | value |\n|---|---|\n{rows}\n\n"
        f"## Scores\n\n| split | metric | value |\n|---|---|---|\n{score_rows}\n"
    )


def sweep(recipe: SweepRecipe, *, progress: bool = True, token: str | None = None) -> list[str]:
    """Fine-tune ``recipe.n`` ingredients; returns their repo IDs (or local folders).

    Resumable: finished ingredients are recorded in ``output_dir`` and skipped on a rerun, and
    the hyperparameters are drawn for all ``n`` up front from ``seed``, so ingredient ``i`` gets
    the same ones however often the sweep was interrupted.

    Example:
        >>> hfsoup.sweep(SweepRecipe(base="org/minilm", task="glue/sst2", n=4,
        ...                          push_prefix="me/minilm-sst2"))  # doctest: +SKIP
    """
    from transformers import AutoModelForSequenceClassification

    from hfsoup.io.hub import refuse_push_offline
    from hfsoup.report.pushplan import push_folder
    from hfsoup.tasks.classification import Scorer

    if recipe.push_prefix:  # HF_HUB_OFFLINE: refused before any training
        refuse_push_offline(f"{recipe.push_prefix}-1")
    out = Path(recipe.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    points = draw_points(recipe)
    train = train_rows(recipe)
    labels = _labels(train, recipe.task.label_column)
    base = base_with_head(recipe, out / "base-with-head", labels)
    scorer = Scorer.from_pretrained(recipe.task, str(base), progress=progress)
    base_scores(recipe, base, scorer)
    made: list[str] = []
    total = len(points)
    for i, hp in enumerate(points):
        folder = out / f"ingredient-{i + 1:03d}"
        done = folder / _DONE
        if done.is_file():
            made.append(json.loads(done.read_text())["ingredient"])
            _log(f"sweep: ingredient {i + 1}/{total} already done, skipped", progress)
            continue
        _log(f"sweep: fine-tuning ingredient {i + 1}/{total}: {_short(hp)}", progress)
        t0 = time.perf_counter()
        fine_tune(base, folder, train, recipe.task, hp, progress=progress)
        seconds = time.perf_counter() - t0
        model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=False)
        scores = {s: scorer.scores(scorer.logits(model, s), s) for s in recipe.task.splits}
        (folder / HPARAMS_FILE).write_text(
            json.dumps({**hp, "train_seconds": round(seconds, 1)}, indent=2)
        )
        (folder / "README.md").write_text(ingredient_card(recipe, hp, scores, i), encoding="utf-8")
        shutil.rmtree(folder / "trainer", ignore_errors=True)
        ingredient = str(folder)
        if recipe.push_prefix:
            ingredient = f"{recipe.push_prefix}-{i + 1}"
            push_folder(folder, ingredient, private=recipe.private, token=token,
                        message=f"hfsoup sweep ingredient {i + 1}")  # fmt: skip
        done.write_text(json.dumps({"ingredient": ingredient, "scores": scores}))
        made.append(ingredient)
    return made


def draw_points(recipe: SweepRecipe) -> list[dict[str, Any]]:
    """The hyperparameters of every ingredient: ``n`` from ``space``, then ``junk`` bad ones.

    Drawn from ``seed`` alone (the junk from their own stream), so ingredient ``i`` gets the
    same ones however often a sweep was interrupted and whatever ``junk`` is.
    """
    rng = random.Random(recipe.seed)
    points = [recipe.space.draw(rng) for _ in range(recipe.n)]
    junk = random.Random(f"{recipe.seed}-junk")
    return points + [{**recipe.junk_space.draw(junk), JUNK_KEY: True} for _ in range(recipe.junk)]


BASE_SCORES_FILE = "hfsoup_base_scores.json"


def base_scores(recipe: SweepRecipe, base: Path, scorer: Any = None) -> dict[str, dict]:
    """The shared init's own scores on every split of the task (the zero-shot row), cached in
    ``base/hfsoup_base_scores.json``."""
    from transformers import AutoModelForSequenceClassification

    path = base / BASE_SCORES_FILE
    if path.is_file():
        return json.loads(path.read_text())
    if scorer is None:
        from hfsoup.tasks.classification import Scorer

        scorer = Scorer.from_pretrained(recipe.task, str(base), progress=False)
    model = AutoModelForSequenceClassification.from_pretrained(base, trust_remote_code=False)
    scores = {s: scorer.scores(scorer.logits(model, s), s) for s in recipe.task.splits}
    path.write_text(json.dumps(scores, indent=2))
    return scores


def _short(hp: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items())
