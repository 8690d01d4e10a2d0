"""The Space's rules without a server: reading the form, building the task, formatting results,
turning hfsoup's stderr into progress, and keeping errors to one line with no secret."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "space_app"))

from logic import (  # noqa: E402  (space_app is not a package: the Space runs it as a folder)
    CUSTOM,
    GLUE,
    IMAGE,
    NO_TASK,
    ProgressTracker,
    build_task,
    card_markdown,
    comparison_markdown,
    dtype_value,
    error_text,
    human_bytes,
    human_count,
    inspection_rows,
    inspection_status,
    parse_ingredients,
    parse_repo_id,
    score_table,
)

from hfsoup.errors import HfsoupError, IngredientNotFoundError, IngredientSpecError, TaskError


def test_ingredients_are_one_per_line_with_blanks_and_comments_skipped():
    text = "org/ft-1\n\n  org/ft-2@v1  \n# a note\norg/ft-3@main # best so far\n"
    assert parse_ingredients(text) == ["org/ft-1", "org/ft-2@v1", "org/ft-3@main"]


@pytest.mark.parametrize("line", ["/etc", "./here", "~/models", "..\\x"])
def test_local_folders_are_refused(line):
    with pytest.raises(IngredientSpecError, match="local folders cannot be used"):
        parse_ingredients(line)


@pytest.mark.parametrize("text", ["", "  \n# only a comment\n"])
def test_no_ingredient_is_a_clear_error(text):
    with pytest.raises(IngredientSpecError, match="at least one ingredient"):
        parse_ingredients(text)


def test_a_malformed_ingredient_is_refused_with_hfsoups_message():
    with pytest.raises(HfsoupError, match="not 'org/name'"):
        parse_ingredients("org/ft 1")


def test_push_repo_must_be_a_repo_id_without_revision():
    assert parse_repo_id("  me/my-soup ") == "me/my-soup"
    for bad in ("", "me/soup@main", "/tmp/x", "has space"):
        with pytest.raises(HfsoupError):
            parse_repo_id(bad)


def test_no_task_kind_means_no_task():
    assert build_task(NO_TASK, limit=10) is None


def test_glue_preset_takes_the_limit():
    task = build_task(GLUE, preset="glue/sst2", limit=200)
    assert task["dataset"] == "nyu-mll/glue" and task["config"] == "sst2"
    assert task["limit"] == 200 and task["holdout"]["from"] == "train"


def test_custom_dataset_fields_become_a_task_with_lists_split():
    task = build_task(
        CUSTOM, dataset=" org/pairs ", selection_split="dev", report_splits="test, ood",
        input_columns="premise hypothesis", label_column="", metrics="f1,accuracy", limit=0,
    )  # fmt: skip
    assert task["dataset"] == "org/pairs" and task["selection_split"] == "dev"
    assert task["report_splits"] == ["test", "ood"]
    assert task["input_columns"] == ["premise", "hypothesis"]
    assert task["label_column"] == "label" and task["metrics"] == ["f1", "accuracy"]
    assert "limit" not in task and "config" not in task


def test_image_dataset_defaults_to_the_image_column():
    task = build_task(IMAGE, dataset="org/beans", label_column="labels")
    assert task["input_columns"] == ["image"] and task["label_column"] == "labels"
    with pytest.raises(TaskError, match="one image column"):
        build_task(IMAGE, dataset="org/beans", input_columns="a b")


@pytest.mark.parametrize(
    ("kind", "fields", "message"),
    [
        (CUSTOM, {}, "dataset's Hub ID"),
        (CUSTOM, {"dataset": "org/d", "report_splits": "validation"}, "also the selection split"),
        (GLUE, {"preset": "glue/nope"}, "unknown task"),
        (CUSTOM, {"dataset": "org/d", "limit": 2.5}, "whole number"),
        ("bogus", {}, "unknown task kind"),
    ],
)
def test_bad_task_fields_are_refused_before_any_job(kind, fields, message):
    with pytest.raises(TaskError, match=message):
        build_task(kind, **fields)


def test_default_dtype_means_the_ingredients_own():
    assert dtype_value("as the ingredients") is None and dtype_value("bfloat16") == "bfloat16"


def test_errors_are_one_line_and_never_show_the_token():
    token = "hf_secret123"
    exc = IngredientNotFoundError(f"org/x: not found\n  (sent with {token})")
    assert error_text(exc, secrets=[token]) == "org/x: not found (sent with ***)"
    assert error_text(ValueError("boom\nmore")) == "unexpected ValueError: boom more"


def test_sizes_read_like_a_person_would_write_them():
    assert human_count(22_713_216) == "22.7M" and human_count(6400) == "6.4k"
    assert human_count(12) == "12" and human_bytes(25_400) == "24.8 KiB"
    assert human_bytes(3 * 1024**3) == "3.0 GiB" and human_bytes(None) == ""


def test_inspection_rows_and_status():
    report = {
        "compatible": False,
        "problem": "org/b: tensor 'x' has shape [2]\nexpected [3]",
        "ingredients": [
            {"ingredient": "org/a@v1", "sha": "a" * 40, "parameters": 6400, "bytes": 25_400,
             "dtypes": ["F16", "F32"], "model_type": "bert", "format": "safetensors"},
        ],
    }  # fmt: skip
    assert inspection_rows(report) == [
        ["org/a@v1", "a" * 40, "6.4k", "24.8 KiB", "F16, F32", "bert", "safetensors"]
    ]
    assert (
        inspection_status(report)
        == "❌ not compatible: org/b: tensor 'x' has shape [2] expected [3]"
    )
    report["compatible"] = True
    assert inspection_status(report).startswith("✅ 1 ingredient resolved: compatible")


RESULTS = {
    "method": "greedy",
    "ingredients": [
        {"repo": "org/a", "revision": "v1", "sha": "0123456789abcdef", "weight": 0.5,
         "scores": {"validation": {"accuracy": 0.91234}, "test": {"accuracy": 0.9}}},
        {"repo": "org/b", "revision": None, "sha": "fedcba9876543210", "weight": 0.0,
         "scores": {"validation": {"accuracy": 0.8}, "test": {"accuracy": 0.7}}},
    ],
    "table": {
        "best_individual": {"validation": {"accuracy": 0.91234}, "test": {"accuracy": 0.9}},
        "greedy_soup": {"validation": {"accuracy": 0.95}, "test": {"accuracy": 0.93}},
    },
    "selection": {"split": "validation", "metric": "accuracy"},
}  # fmt: skip


def test_score_table_marks_the_selection_split():
    headers, rows = score_table(RESULTS)
    assert headers == ["ingredient", "SHA", "weight", "validation (selection) accuracy",
                       "test accuracy"]  # fmt: skip
    assert rows == [
        ["org/a@v1", "0123456789ab", 0.5, 0.9123, 0.9],
        ["org/b", "fedcba987654", 0.0, 0.8, 0.7],
    ]


def test_an_unscored_soup_has_no_score_columns():
    headers, rows = score_table({"ingredients": [{"repo": "org/a", "sha": None, "weight": 1.0}]})
    assert headers == ["ingredient", "SHA", "weight"] and rows == [["org/a", "", 1.0]]
    assert "not scored" in comparison_markdown({"ingredients": []})


def test_comparison_is_hfsoups_markdown_table():
    text = comparison_markdown(RESULTS)
    assert "| greedy soup | 0.9500 | 0.9300 |" in text
    assert "| best individual | 0.9123 | 0.9000 |" in text
    assert "Chosen on `validation` by `accuracy`" in text


def test_card_shows_body_then_metadata_and_serves_its_images():
    card = "---\nlicense: mit\ntags:\n- hfsoup\n---\n# Soup\n\n![greedy trajectory](greedy_trajectory.png)\n![x](https://e.org/a.png)\n"
    shown = card_markdown(card, "/work/out/soup/")
    assert shown.startswith("# Soup")
    assert "![greedy trajectory](gradio_api/file=/work/out/soup/greedy_trajectory.png)" in shown
    assert "![x](https://e.org/a.png)" in shown
    assert shown.index("# Soup") < shown.index("```yaml\nlicense: mit\ntags:\n- hfsoup\n```")


def test_progress_follows_hfsoup_steps_and_tqdm_bars():
    tracker = ProgressTracker()
    assert tracker.status == "starting" and tracker.fraction is None
    tracker.feed("hfsoup: scoring ingredient 2/4: org/b")
    assert tracker.status == "scoring ingredient 2/4: org/b" and tracker.fraction == 0.25
    tracker.feed("scoring validation:  40%|####      | 2/5 [00:01<00:01]")
    tracker.feed("scoring validation:  80%|########  | 4/5 [00:02<00:00]")
    assert tracker.status == "scoring ingredient 2/4: org/b · scoring validation 80%"
    assert tracker.fraction == 0.8
    tracker.feed("scoring test:  20%|##        | 1/5 [00:00<00:01]")
    assert tracker.log.splitlines() == [
        "hfsoup: scoring ingredient 2/4: org/b",
        "scoring validation:  80%|########  | 4/5 [00:02<00:00]",
        "scoring test:  20%|##        | 1/5 [00:00<00:01]",
    ]
    tracker.feed("Fetching + averaging:  45%|####5     | 1.2M/2.6M [00:01<00:01, 1.1MB/s]")
    assert tracker.fraction == 0.45
    tracker.feed("hfsoup: greedy: trying org/c")
    assert tracker.status == "greedy: trying org/c" and tracker.fraction is None


def test_the_log_keeps_only_the_last_lines():
    tracker = ProgressTracker(keep=3)
    for i in range(10):
        tracker.feed(f"line {i}")
    assert tracker.log == "line 7\nline 8\nline 9"


def test_the_page_offers_the_registrys_methods_with_a_toy_one():
    from capabilities import registered_methods
    from logic import method_choices

    from hfsoup.registry import MergeMethod, register, unregister

    register(MergeMethod("toy", "a toy method registered by a test", needs_task=True))
    try:
        offered = method_choices({"methods": registered_methods(learned=False)})
    finally:
        unregister("toy")
    names = [m.name for m in offered]
    assert names[0] == "uniform" and "toy" in names and "learned" not in names
    toy = offered[names.index("toy")]
    assert toy.needs_task and toy.summary == "a toy method registered by a test"


def test_a_worker_that_lists_no_methods_gets_the_default_list():
    from logic import method_choices

    assert [(m.name, m.needs_task) for m in method_choices({"learned": True})] == [
        ("uniform", False), ("greedy", True), ("learned", True),
    ]  # fmt: skip
    assert [m.name for m in method_choices({})] == ["uniform", "greedy"]


def test_hfsoup_log_records_reach_the_page_as_hfsoup_lines():
    """Progress steps (INFO) and notices go to the page as the CLI prints them."""
    import logging

    from worker import _LineSink, log_to

    class Conn:
        sent: list = []

        def send(self, event):
            self.sent.append(event)

    logger = logging.getLogger("hfsoup")
    level, conn = logger.level, Conn()
    handler = log_to(_LineSink(conn))
    try:
        logger.info("scoring ingredient %d/%d: %s", 2, 5, "org/ft-2")
        logger.warning("a notice\nover two lines")
        logger.debug("not shown")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert conn.sent == [
        ("line", "hfsoup: scoring ingredient 2/5: org/ft-2"),
        ("line", "hfsoup: a notice over two lines"),
    ]
