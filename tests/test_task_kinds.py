"""The task-kind protocol: a kind registered from this file alone runs through the CLI.

The toy kind scores the Brier score (mean squared distance between a classifier's softmax
probabilities and the one-hot label): lower is better, so "best individual", the greedy order
and the greedy acceptance must all follow it the other way round from accuracy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import pytest
import torch

from hfsoup.errors import TaskError
from hfsoup.tasks.ensemble import greedy_ensemble
from hfsoup.tasks.kinds import (
    HIGHER,
    LOWER,
    EarlyStop,
    TaskScorer,
    get_kind,
    kind_names,
    register_kind,
    unregister_kind,
)
from hfsoup.tasks.task import resolve_task

TOY = "toy-brier"


class BrierScorer:
    """A task prepared for the toy kind: outputs are softmax probabilities, metric ``brier``."""

    def __init__(self, task, source: str, revision: str | None) -> None:
        from transformers import AutoTokenizer

        from hfsoup.tasks.data import load_task_splits
        from hfsoup.tasks.preprocess import prepare_split

        self.task = task
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        loaded = load_task_splits(task)
        self.splits = {n: prepare_split(d, task, tokenizer, name=n) for n, d in loaded.items()}
        self.cache: dict[tuple[str, str], torch.Tensor] = {}

    selection_split = property(lambda self: self.task.selection_split)
    selection_metric = property(lambda self: self.task.selection_metric)
    direction = LOWER

    def split(self, name: str):
        return self.splits[name]

    def outputs(self, model, split: str, *, key: str | None = None) -> torch.Tensor:
        if key is not None and (key, split) in self.cache:
            return self.cache[(key, split)]
        result = torch.cat([self._probabilities(model, b) for b in self.splits[split].batches])
        if key is not None:
            self.cache[(key, split)] = result
        return result

    @staticmethod
    @torch.inference_mode()
    def _probabilities(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        model.eval()
        device = next(model.parameters()).device
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        return logits.float().softmax(-1).cpu()

    @staticmethod
    def _errors(probabilities: torch.Tensor, labels: torch.Tensor) -> list[float]:
        one_hot = torch.nn.functional.one_hot(labels, probabilities.shape[-1])
        return ((probabilities.double() - one_hot) ** 2).sum(-1).tolist()

    def selection_score(self, outputs: torch.Tensor, split: str | None = None) -> float:
        labels = self.splits[split or self.selection_split].labels
        return math.fsum(self._errors(outputs, labels)) / len(labels)

    def scores(self, outputs: torch.Tensor, split: str) -> dict[str, float]:
        return {"brier": self.selection_score(outputs, split)}

    def score_with_early_stop(self, model, split: str, threshold: float, *, strict=False):
        # Every per-example error is >= 0, so a partial (exactly rounded) sum bounds the total.
        prepared, errors = self.splits[split], []
        for batch, labels in zip(prepared.batches, prepared.label_batches(), strict=True):
            errors += self._errors(self._probabilities(model, batch), labels)
            bound = math.fsum(errors) / prepared.size
            if len(errors) < prepared.size and not LOWER.reaches(bound, threshold, strict=strict):
                return EarlyStop(None, len(errors))
        return EarlyStop(math.fsum(errors) / prepared.size, len(errors))

    @staticmethod
    def ensemble(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(outputs)).mean(0)

    def greedy_ensemble(self, outputs, split=None, *, strict=False) -> list[int]:
        score = lambda o: self.selection_score(o, split)  # noqa: E731
        return greedy_ensemble(
            outputs, score, strict=strict, direction=LOWER, combine=self.ensemble
        )

    def check_learnable(self) -> None:
        raise TaskError("the toy Brier kind has no learned soups")

    def loss(self, output, beta, targets):  # pragma: no cover - never learned on
        raise NotImplementedError


class ToyBrier:
    name = TOY

    def prepare(self, task, source, *, revision=None, device=None, progress=True, processes=None):
        return BrierScorer(task, source, revision)


@pytest.fixture
def toy_kind():
    register_kind(ToyBrier())
    yield
    unregister_kind(TOY)


def test_a_lower_is_better_kind_picks_and_accepts_the_lowest(toy_kind, tiny_greedy, cli, tmp_path):
    task = tmp_path / "task.yaml"
    task.write_text(json.dumps({**tiny_greedy["task"], "kind": TOY, "metrics": ["brier"]}))
    out = tmp_path / "soup"
    proc = cli("soup", *tiny_greedy["repos"], "--method", "greedy", "--task", task,
               "--output", out, "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["task"]["kind"] == TOY  # a kind other than the default is recorded
    scores = [row["scores"]["validation"]["brier"] for row in results["ingredients"]]
    assert len(set(scores)) == len(scores)  # distinct: lowest and highest are different models
    lowest = scores.index(min(scores))
    assert results["table"]["best_individual"] == results["ingredients"][lowest]["scores"]
    trace = results["greedy"]["trace"]
    assert [step["index"] for step in trace] == sorted(range(3), key=scores.__getitem__)
    incumbent = trace[0]["score"]
    assert incumbent == min(scores)
    for step in trace[1:]:
        accepted = step["score"] is not None and step["score"] <= incumbent
        assert step["accepted"] == accepted, trace
        incumbent = step["score"] if accepted else incumbent
    # The greedy soup's reported score is never worse (higher) than the best ingredient's.
    assert results["table"]["greedy_soup"]["validation"]["brier"] <= min(scores)


def test_an_unknown_kind_is_one_line_naming_the_kinds(tiny_greedy, cli, tmp_path):
    task = tmp_path / "task.yaml"
    task.write_text(json.dumps({**tiny_greedy["task"], "kind": "no-such-kind"}))
    proc = cli("soup", *tiny_greedy["repos"], "--method", "greedy", "--task", task,
               "--output", tmp_path / "soup")  # fmt: skip
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "no-such-kind" in line and "classification" in line


def test_the_default_kind_is_left_out_of_dumps_and_others_are_kept(toy_kind):
    task = resolve_task({"dataset": "org/data"})
    assert task.kind == "classification"
    assert "kind" not in task.model_dump(mode="json", by_alias=True)
    toy = resolve_task({"dataset": "org/data", "kind": TOY})
    assert toy.model_dump(mode="json")["kind"] == TOY
    assert resolve_task(toy.model_dump(mode="json")).kind == TOY  # a dump rebuilds it


def test_registry_names_lists_and_refuses_a_taken_name(toy_kind):
    assert kind_names() == sorted(["causal-lm", "classification", TOY])
    assert isinstance(get_kind(TOY), ToyBrier)
    with pytest.raises(ValueError, match="already registered"):
        register_kind(ToyBrier())
    with pytest.raises(ValueError, match="already registered"):
        register_kind(type("Shadow", (), {"name": "classification"})())
    with pytest.raises(TaskError, match="unknown task kind"):
        get_kind("nope")


def test_the_classification_scorer_implements_the_protocol():
    from hfsoup.tasks.classification import KIND, Scorer

    assert KIND.name == "classification" and get_kind("classification") is KIND
    members = {n for n in vars(TaskScorer) if not n.startswith("_")}
    assert {"outputs", "direction", "score_with_early_stop", "loss"} <= members
    # Every member is defined on the class (task and cache are set per instance).
    assert members - {"task", "cache"} <= set(dir(Scorer))


@pytest.mark.parametrize(
    ("direction", "scores", "ranking"),
    [
        (HIGHER, [0.5, float("nan"), 0.9, 0.5], [2, 0, 3, 1]),
        (LOWER, [0.5, float("nan"), 0.9, 0.5], [0, 3, 2, 1]),
        (LOWER, [None, 2.0, 1.0], [2, 1, 0]),
    ],
)
def test_direction_ranks_best_first_ties_in_order_nan_last(direction, scores, ranking):
    assert direction.ranking(scores) == ranking
    assert direction.best_index(scores) == ranking[0]


def test_direction_acceptance_both_ways():
    assert HIGHER.reaches(0.8, 0.8) and not HIGHER.reaches(0.8, 0.8, strict=True)
    assert LOWER.reaches(1.0, 1.5) and not LOWER.reaches(2.0, 1.5)
    assert LOWER.reaches(1.5, 1.5) and not LOWER.reaches(1.5, 1.5, strict=True)
    for direction in (HIGHER, LOWER):
        assert not direction.reaches(None, 1.0) and not direction.reaches(float("nan"), 1.0)
        assert direction.better(1.0, float("nan")) and not direction.better(float("nan"), 1.0)
    assert LOWER.better(1.0, 2.0) and not HIGHER.better(1.0, 2.0)
