"""Hostile tasks and data for scored soups (greedy, learned, evaluate): task files that are
bombs, labels the model cannot have, columns that hold no text, options that were silently
ignored, metrics undefined on the split, inputs longer than the model takes, corrupt images."""

from __future__ import annotations

import json
import math
import time
import uuid

import pytest
from greedy_fixtures import sentences
from test_errors import assert_nothing_written, assert_one_line_error

from hfsoup.errors import TaskError

reliability = pytest.mark.reliability


@pytest.fixture(autouse=True)
def _no_datasets_bars():
    """In-process CLI calls: datasets may have been imported (bars on) before -q could say."""
    import datasets

    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def assert_error_after_notices(proc, *fragments: str) -> None:
    """One error line; before it at most the test Hub's 'metric ... bundled copy' notices (it
    hosts no evaluate-metric Spaces, so every metric falls back)."""
    lines = proc.stderr.strip().splitlines()
    notices = [line for line in lines[:-1] if "using hfsoup's bundled copy" in line]
    assert len(notices) == len(lines) - 1, proc.stderr
    proc.stderr = lines[-1] + "\n"
    assert_one_line_error(proc, *fragments)


def publish_rows(api, tmp, splits: dict[str, list[dict]], features=None) -> str:
    """A dataset repo on the test Hub, one parquet file per split (``datasets`` features kept)."""
    import datasets

    repo = f"test-org/rt-task-{uuid.uuid4().hex[:8]}"
    data = tmp / f"ds-{repo.rsplit('-', 1)[1]}" / "data"
    data.mkdir(parents=True)
    for name, rows in splits.items():
        table = {key: [row[key] for row in rows] for key in rows[0]}
        datasets.Dataset.from_dict(table, features=features).to_parquet(
            str(data / f"{name}-00000-of-00001.parquet")
        )
    api.create_repo(repo, repo_type="dataset")
    api.upload_folder(repo_id=repo, repo_type="dataset", folder_path=str(data.parent))
    return repo


def write_task(tmp, task: dict):
    path = tmp / "task.yaml"
    path.write_text(json.dumps(task))  # JSON is YAML
    return path


def greedy(cli, tiny, tmp, task: dict, *extra: str):
    return cli("soup", *tiny["repos"], "--method", "greedy", "--task", write_task(tmp, task),
               "--output", tmp / "soup", "-q", *extra)  # fmt: skip


# --- 1. task files are read with a recipe's bounds -------------------------------------------

_BOMB = "".join(
    f"{a}: &{a} [{', '.join([f'*{b}'] * 9) if b else ', '.join(['x'] * 9)}]\n"
    for a, b in zip("abcdefgh", ["", *"abcdefg"], strict=True)
)


@reliability(
    "--task FILE.yaml that is an alias bomb, nested 5,000 deep, 50 MB, not UTF-8, or names a key "
    "twice",
    "one line within a second: 'task file F:N: YAML anchors and aliases (&name, *name) are "
    "not allowed' / '... nested deeper than 32 levels' / '... is larger than 1 MiB' / '... is not "
    "UTF-8 text' / \"... key 'dataset' appears twice\" (RecipeError); nothing read or written",
)
@pytest.mark.parametrize(
    "content, message",
    [
        (_BOMB, "anchors and aliases"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than"),
        ("dataset: x\n# " + "y" * (50 << 20) + "\n", "larger than 1 MiB"),
        (b"\xff\xfe\x00 dataset: x", "not UTF-8"),
        ("dataset: a\ndataset: b\n", "'dataset' appears twice"),
    ],
    ids=["alias-bomb", "deep", "50MB", "not-utf8", "duplicate-key"],
)
def test_a_hostile_task_file_is_one_line(tiny_greedy, cli, tmp_path, content, message):
    path = tmp_path / "task.yaml"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    start = time.monotonic()
    proc = cli("soup", *tiny_greedy["repos"], "--method", "greedy", "--task", path,
               "--output", tmp_path / "soup", "-q")  # fmt: skip
    assert time.monotonic() - start < 5
    assert_one_line_error(proc, "task file", message)
    assert_nothing_written(tmp_path)


# --- 2. labels must be the model's labels -----------------------------------------------------


def _relabel(rows, change):
    return [{**row, "label": change(i, row["label"])} for i, row in enumerate(rows)]


@reliability(
    "Dataset whose labels the model cannot have: ids past its id2label (5 for 2 labels), negative "
    "ids, a ClassLabel with another number of classes, fractional numbers for a classifier",
    "one line: \"split 'validation' has label 5 in column 'label' but the model has 2 labels "
    "(ids 0..1); its scores would mean nothing\" / '... has 3 classes (a, b, c) but the model has "
    "2 labels ...' (TaskError), before any score; nothing written",
)
@pytest.mark.parametrize(
    "change, features, message",
    [
        (lambda i, y: 5 if i % 2 else y, None, "has label 5 in column 'label' but the model has 2"),
        (lambda i, y: -3 if i == 0 else y, None, "negative labels (-3)"),
        (lambda i, y: y, "classlabel3", "has 3 classes (a, b, c) but the model has 2 labels"),
        (lambda i, y: y + 0.5, None, "fractional numbers"),
    ],
    ids=["past-id2label", "negative", "classlabel-count", "fractional"],
)
def test_labels_the_model_cannot_have_are_refused(
    tiny_greedy, cli, tmp_path, api, change, features, message
):
    import datasets

    if features == "classlabel3":
        features = datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["a", "b", "c"])}
        )
    rows = _relabel(sentences(24, 1), change)
    repo = publish_rows(api, tmp_path, {"validation": rows, "test": sentences(24, 2)}, features)
    proc = greedy(cli, tiny_greedy, tmp_path, {**tiny_greedy["task"], "dataset": repo})
    assert_one_line_error(proc, message)
    assert_nothing_written(tmp_path)


@reliability(
    "evaluate on labels past the model's id2label",
    "one line: \"split 'validation' has label 7 ... but the model has 2 labels\" (TaskError), "
    "never a score",
)
def test_evaluate_refuses_labels_past_the_models_labels(tiny_greedy, cli, tmp_path, api):
    rows = _relabel(sentences(24, 1), lambda i, y: 7)
    repo = publish_rows(api, tmp_path, {"validation": rows, "test": sentences(24, 2)})
    task = write_task(tmp_path, {**tiny_greedy["task"], "dataset": repo})
    proc = cli("evaluate", *tiny_greedy["repos"], "--task", task, "-q")
    assert_one_line_error(proc, "has label 7", "the model has 2 labels")
    assert proc.stdout == ""


@reliability(
    "Labels that are None or NaN, label names stored as large_string that the model does not "
    "know, or the text column given as the label column",
    "one line: \"split 'validation' has 1 example(s) without a label (None or NaN in column "
    "'label')\" / \"labels ['neg', 'pos'] in split 'validation' are not among the model's labels "
    '(negative, positive)" (TaskError), never a traceback',
)
@pytest.mark.parametrize(
    "rows, extra, message",
    [
        (_relabel(sentences(24, 1), lambda i, y: None if i == 0 else y), {}, "without a label"),
        (
            _relabel(sentences(24, 1), lambda i, y: math.nan if i == 0 else float(y)),
            {},
            "without a label",
        ),
        (_relabel(sentences(24, 1), lambda i, y: ["neg", "pos"][y]), {}, "['neg', 'pos']"),
        (sentences(24, 1), {"label_column": "text"}, "are not among the model's labels"),
    ],
    ids=["none", "nan", "unknown-names", "text-as-labels"],
)
def test_labels_that_are_not_labels_are_one_line(
    tiny_greedy, cli, tmp_path, api, rows, extra, message
):
    test_rows = sentences(24, 2)
    if isinstance(rows[1]["label"], str):
        test_rows = _relabel(test_rows, lambda i, y: ["neg", "pos"][y])
    elif isinstance(rows[1]["label"], float):
        test_rows = _relabel(test_rows, lambda i, y: float(y))
    repo = publish_rows(api, tmp_path, {"validation": rows, "test": test_rows})
    proc = greedy(cli, tiny_greedy, tmp_path, {**tiny_greedy["task"], "dataset": repo, **extra})
    assert_one_line_error(proc, message)
    assert_nothing_written(tmp_path)


# --- 3. input columns must hold text ----------------------------------------------------------


@reliability(
    "Text column with None rows, or an input column that holds numbers",
    "one line: \"split 'validation' has 1 example(s) with no text (None) in column 'text'\" / "
    "\"input column 'label' of split 'validation' holds values of type int64, not text\" "
    "(TaskError), never the tokenizer's traceback",
)
@pytest.mark.parametrize(
    "column, message", [("text", "with no text (None)"), ("label", "int64, not text")]
)
def test_input_columns_without_text_are_one_line(tiny_greedy, cli, tmp_path, api, column, message):
    rows = [
        {**row, "text": None if i == 0 else row["text"]} for i, row in enumerate(sentences(24, 1))
    ]
    repo = publish_rows(api, tmp_path, {"validation": rows, "test": sentences(24, 2)})
    task = {**tiny_greedy["task"], "dataset": repo, "input_columns": [column]}
    assert_one_line_error(greedy(cli, tiny_greedy, tmp_path, task), message)
    assert_nothing_written(tmp_path)


# --- 4. options of zero are values, not absent flags ------------------------------------------


@reliability(
    "--limit 0, --batch-size 0, --max-length 0, --holdout-fraction 0 or nan, --holdout-seed -1",
    "one line: 'invalid task key limit: Input should be greater than or equal to 1' / "
    "'... holdout.fraction: Input should be a finite number' (TaskError); never silently "
    "ignored (scoring every row, or no holdout)",
)
@pytest.mark.parametrize(
    "flags, message",
    [
        (("--limit", "0"), "limit"),
        (("--batch-size", "0"), "batch_size"),
        (("--max-length", "0"), "max_length"),
        (("--holdout-fraction", "0"), "holdout.fraction"),
        (("--holdout-fraction", "nan"), "holdout.fraction: Input should be a finite number"),
        (("--holdout-fraction", "0.5", "--holdout-seed", "-1"), "holdout.seed"),
    ],
    ids=["limit", "batch-size", "max-length", "holdout-0", "holdout-nan", "holdout-seed"],
)
def test_zero_and_out_of_range_task_options_are_refused(tiny_greedy, cli, tmp_path, flags, message):
    task = dict(tiny_greedy["task"])
    if "--holdout-fraction" in flags:
        task.pop("selection_split")
        flags = (*flags, "--holdout-from", "validation")
    proc = greedy(cli, tiny_greedy, tmp_path, task, *flags)
    assert_one_line_error(proc, message)
    assert_nothing_written(tmp_path)


# --- 5. a metric undefined on the split -------------------------------------------------------


@reliability(
    "Greedy soup or evaluate where every ingredient scores NaN (pearsonr of constant predictions)",
    "one line: \"every ingredient scores NaN on selection split 'validation' by 'pearsonr': the "
    'metric is undefined there ..." (TaskError); no soup chosen on NaN comparisons',
)
@pytest.mark.parametrize("command", ["greedy", "evaluate"])
def test_every_ingredient_scoring_nan_is_refused(tiny_greedy, cli, tmp_path, command):
    task = {**tiny_greedy["task"], "metrics": ["pearsonr"]}
    if command == "greedy":
        proc = greedy(cli, tiny_greedy, tmp_path, task)
    else:
        proc = cli("evaluate", *tiny_greedy["repos"], "--task", write_task(tmp_path, task), "-q")
    assert_error_after_notices(proc, "every ingredient scores NaN", "'pearsonr'")
    assert_nothing_written(tmp_path)


def test_nan_scores_never_win_and_all_nan_is_undecidable():
    from hfsoup.methods.greedy import best_index, check_decidable
    from hfsoup.tasks.kinds import HIGHER, LOWER

    assert best_index([math.nan, 0.2, 0.7, math.nan], HIGHER) == 2
    assert best_index([math.nan, None, 0.1], HIGHER) == 2
    assert best_index([math.nan, 0.2, 0.7, math.nan], LOWER) == 1  # a lower-is-better kind
    check_decidable([{"v": {"m": math.nan}}, {"v": {"m": 0.5}}], "v", "m")
    with pytest.raises(TaskError, match="every ingredient scores NaN"):
        check_decidable([{"v": {"m": math.nan}}, {"v": {"m": math.nan}}], "v", "m")


# --- 6. inputs longer than the model takes ----------------------------------------------------


@reliability(
    "Text longer than the model's position embeddings (a 2,000-word example, --max-length 1e8)",
    "a notice: \"hfsoup: split 'validation': examples cut to 32 tokens, the most the model takes "
    '(max_length is 100000000)"; the soup is made (no shape error from the forward pass)',
)
def test_text_longer_than_the_model_takes_is_cut_to_it(tiny_greedy, cli, tmp_path, api):
    rows = [{"text": "good " * 2000, "label": 1}, *sentences(23, 1)]
    repo = publish_rows(api, tmp_path, {"validation": rows, "test": sentences(24, 2)})
    task = {**tiny_greedy["task"], "dataset": repo}
    proc = greedy(cli, tiny_greedy, tmp_path, task, "--max-length", "100000000")
    assert proc.returncode == 0, proc.stderr
    assert "hfsoup: split 'validation': examples cut to 32 tokens" in proc.stderr
    assert (tmp_path / "soup" / "model.safetensors").is_file()


# --- 7. data files that do not parse, images that do not decode -------------------------------


@reliability(
    "Dataset whose files disagree on a column's type (datasets cannot generate the split)",
    "one line: \"cannot load split 'validation' of dataset ...: An error occurred while "
    "generating the dataset: Failed to parse string: '...' as a scalar of type int64\" "
    "(TaskError): the cause, and not datasets' own logged error line beside it",
)
def test_a_dataset_that_does_not_generate_is_one_line_with_the_cause(
    tiny_greedy, cli, tmp_path, api
):
    from greedy_fixtures import publish_dataset

    repo = f"test-org/rt-task-{uuid.uuid4().hex[:8]}"
    numbers = [{**row, "text": 12345} for row in sentences(24, 1)]
    publish_dataset(api, repo, {"validation": numbers, "test": sentences(24, 2)}, tmp_path)
    proc = greedy(cli, tiny_greedy, tmp_path, {**tiny_greedy["task"], "dataset": repo})
    assert_one_line_error(proc, "cannot load split", "Failed to parse string")
    assert_nothing_written(tmp_path)


@reliability(
    "Image dataset with a corrupt image (bytes that are no image, a PNG header and nothing)",
    "one line: \"row 5 of split 'validation': the image in column 'image' cannot be decoded "
    '(UnidentifiedImageError)" (TaskError)',
)
@pytest.mark.parametrize("bad", [b"not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 30])
def test_a_corrupt_image_is_one_line_naming_its_row(tmp_path, bad):
    import io

    import datasets
    import numpy as np
    from PIL import Image
    from transformers import ViTImageProcessor

    from hfsoup.tasks.preprocess import prepare_split
    from hfsoup.tasks.task import Task

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    pics = [{"bytes": buf.getvalue(), "path": None}] * 5 + [{"bytes": bad, "path": None}]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    split = datasets.Dataset.from_dict({"image": pics, "label": [0] * 6}, features=features)
    task = Task(dataset="x", input_columns=["image"], report_splits=["test"], batch_size=4)
    processor = ViTImageProcessor(size={"height": 8, "width": 8})
    with pytest.raises(TaskError, match=r"row 5 of split 'validation': the image .* decoded"):
        prepare_split(split, task, processor, name="validation")


# --- 8. learned options -----------------------------------------------------------------------


@reliability(
    "--learned-lr inf",
    "one line: 'learned.lr: must be a finite positive number, got inf' (RecipeError), before "
    "any ingredient is scored; not a soup of NaN refused as an overflow",
)
def test_an_infinite_learning_rate_is_refused(tiny_greedy, cli, tmp_path):
    proc = cli("soup", *tiny_greedy["repos"], "--method", "learned", "--learned-lr", "inf",
               "--task", write_task(tmp_path, tiny_greedy["task"]), "--output", tmp_path / "soup",
               "-q")  # fmt: skip
    assert_one_line_error(proc, "learned.lr: must be a finite positive number, got inf")
    assert_nothing_written(tmp_path)
