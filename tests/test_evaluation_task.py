"""Tasks: GLUE presets, split hygiene, recipe keys."""

from __future__ import annotations

import pytest

from hfsoup.errors import TaskError
from hfsoup.tasks.task import PRESETS, Task, resolve_task

# Written out from the GLUE paper / dataset card, independently of hfsoup's table.
GLUE = {
    "cola": (["sentence"], ["matthews_correlation"]),
    "sst2": (["sentence"], ["accuracy"]),
    "mrpc": (["sentence1", "sentence2"], ["f1", "accuracy"]),
    "qqp": (["question1", "question2"], ["f1", "accuracy"]),
    "stsb": (["sentence1", "sentence2"], ["pearsonr", "spearmanr"]),
    "mnli": (["premise", "hypothesis"], ["accuracy"]),
    "qnli": (["question", "sentence"], ["accuracy"]),
    "rte": (["sentence1", "sentence2"], ["accuracy"]),
    "wnli": (["sentence1", "sentence2"], ["accuracy"]),
}


@pytest.mark.parametrize("name", sorted(GLUE))
def test_glue_preset_has_the_task_columns_and_metrics(name):
    task = resolve_task(f"glue/{name}")
    columns, metrics = GLUE[name]
    assert (task.dataset, task.config) == ("nyu-mll/glue", name)
    assert (task.input_columns, task.label_column, task.metrics) == (columns, "label", metrics)


def test_presets_list_every_glue_task():
    assert sorted(PRESETS) == sorted(f"glue/{name}" for name in GLUE)


@pytest.mark.parametrize("name", sorted(GLUE))
def test_glue_preset_selects_and_reports_on_distinct_labelled_splits(name):
    task = resolve_task(f"glue/{name}")
    assert task.selection_split not in task.report_splits
    assert not any(s.startswith("test") for s in [*task.source_splits(), *task.report_splits])


def test_mnli_selects_on_matched_and_reports_mismatched():
    task = resolve_task("glue/mnli")
    assert (task.selection_split, task.report_splits) == (
        "validation_matched",
        ["validation_mismatched"],
    )


def test_sst2_holds_out_part_of_train_and_reports_validation():
    task = resolve_task("glue/sst2")
    assert task.holdout is not None and task.holdout.from_ == "train"
    assert (task.selection_split, task.report_splits) == ("holdout", ["validation"])


def test_preset_accepts_canonical_prefix_and_case():
    assert resolve_task("nyu-mll/glue/SST2") == resolve_task("glue/sst2")


def test_glue_alias_becomes_canonical_hub_id():
    task = Task(dataset="glue", config="rte", selection_split="train", report_splits=["validation"])
    assert task.dataset == "nyu-mll/glue"


def test_unknown_preset_lists_the_presets():
    with pytest.raises(TaskError, match="glue/sst2"):
        resolve_task("glue/imdb")


def test_report_split_equal_to_selection_split_is_refused():
    with pytest.raises(TaskError, match="allow_overlap"):
        resolve_task({"dataset": "org/data", "selection_split": "val", "report_splits": ["val"]})


def test_allow_overlap_permits_scoring_the_selection_split():
    task = resolve_task(
        {
            "dataset": "org/d",
            "selection_split": "val",
            "report_splits": ["val"],
            "allow_overlap": True,
        }
    )
    assert task.splits == ["val"]


def test_holdout_selection_reported_is_overlap():
    fields = {"dataset": "org/d", "holdout": {"fraction": 0.1}, "report_splits": ["holdout"]}
    with pytest.raises(TaskError, match="allow_overlap"):
        resolve_task(fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"selection_split": "validation", "report_splits": ["test"]},
        {"selection_split": "test_matched", "report_splits": ["validation_matched"]},
        {"holdout": {"from": "test", "fraction": 0.1}, "report_splits": ["validation"]},
    ],
)
def test_glue_test_splits_are_refused(fields):
    with pytest.raises(TaskError, match="GLUE test splits carry no labels"):
        resolve_task({"dataset": "glue", "config": "sst2", **fields})


def test_unknown_recipe_key_is_a_task_error():
    with pytest.raises(TaskError, match="metric"):
        resolve_task({"dataset": "org/d", "metric": "accuracy"})


def test_three_input_columns_are_refused():
    with pytest.raises(TaskError, match="one or two"):
        resolve_task({"dataset": "org/d", "input_columns": ["a", "b", "c"]})


def test_holdout_with_another_selection_split_is_refused():
    with pytest.raises(TaskError, match="carved out of 'train'"):
        resolve_task(
            {"dataset": "org/d", "selection_split": "validation", "holdout": {"fraction": 0.1}}
        )


def test_overrides_are_validated_with_the_preset():
    assert resolve_task("glue/sst2", limit=50).limit == 50
    with pytest.raises(TaskError, match="allow_overlap"):
        resolve_task("glue/sst2", report_splits=["holdout"])


def test_dropping_the_holdout_restores_the_default_selection_split():
    task = resolve_task("glue/sst2", holdout=None, report_splits=["train"])
    assert (task.holdout, task.selection_split) == (None, "validation")


def test_holdout_source_and_reported_rest_are_loaded_once():
    task = resolve_task(
        {"dataset": "org/d", "holdout": {"fraction": 0.1}, "report_splits": ["train", "test"]}
    )
    assert task.source_splits() == ["train", "test"]
    assert task.splits == ["holdout", "train", "test"]


def test_task_round_trips_through_its_dump():
    task = resolve_task("glue/qqp", limit=10)
    assert resolve_task(task.model_dump(by_alias=True)) == task
