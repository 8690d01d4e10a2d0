"""Hostile tasks and data for scored soups (greedy, learned, evaluate): task files that are
bombs, labels the model cannot have, columns that hold no text, options that were silently
ignored, metrics undefined on the split, inputs longer than the model takes, corrupt images."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from test_errors import assert_nothing_written, assert_one_line_error

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
    "one line within a second: 'task file F: line N: YAML anchors and aliases (&name, *name) are "
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
