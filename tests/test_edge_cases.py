"""Edge cases found in review: revisions with slashes, weights that are not numbers, damaged
files a user can hand us, `run --private`, and greedy state surviving a failed final write."""

from __future__ import annotations

import errno
import json

import pytest
from factories import save_ingredient, tiny_bert_config
from test_errors import assert_nothing_written, assert_one_line_error

import hfsoup
from hfsoup.errors import IngredientNotFoundError, OutputWriteError
from hfsoup.io.hub import parse_ingredient
from hfsoup.io.writer import partial_dir


@pytest.mark.parametrize("revision", ["refs/pr/1", "feature/x", "v1.0"])
def test_a_revision_may_hold_slashes(revision):
    spec = parse_ingredient(f"org/model@{revision}")
    assert (spec.repo, spec.revision) == ("org/model", revision)


def test_a_repo_part_with_two_slashes_is_a_missing_folder():
    with pytest.raises(IngredientNotFoundError, match="no such local directory"):
        parse_ingredient("a/b/c@main")


@pytest.mark.parametrize("weight", ["nan", "inf"])
def test_weights_must_be_finite_and_are_checked_before_any_download(cli, tmp_path, weight):
    # Repo IDs nobody serves: the weights are refused before anything is resolved.
    proc = cli("soup", "org/never-a", "org/never-b", "--output", str(tmp_path / "soup"),
               "--weights", weight, "1")  # fmt: skip
    assert_one_line_error(proc, "finite")
    assert_nothing_written(tmp_path)


def test_greedy_soups_take_no_weights(cli, tmp_path):
    proc = cli("soup", "org/never-a", "org/never-b", "--output", str(tmp_path / "soup"),
               "--method", "greedy", "--task", "glue/sst2", "--weights", "1", "2")  # fmt: skip
    assert_one_line_error(proc, "greedy", "give no weights")


def test_a_local_ingredient_with_a_broken_config_is_one_line(cli, tmp_path):
    folder = save_ingredient(tmp_path / "broken", tiny_bert_config(), seed=1)
    (folder / "config.json").write_text("{not json")
    good = save_ingredient(tmp_path / "good", tiny_bert_config(), seed=2)
    proc = cli("soup", str(good), str(folder), "--output", str(tmp_path / "soup"))
    assert_one_line_error(proc, f"{folder}/config.json", "not valid JSON")
    assert_nothing_written(tmp_path)


def test_a_task_file_that_is_not_yaml_is_one_line(cli, tmp_path):
    task = tmp_path / "task.yaml"
    task.write_text("dataset: [unclosed\n")
    proc = cli("soup", "org/a", "org/b", "--method", "greedy", "--task", str(task),
               "--output", str(tmp_path / "soup"))  # fmt: skip
    assert_one_line_error(proc, "task file", "not valid YAML")


def test_run_private_creates_a_private_repo(hub, cli, tmp_path, repo_id, api, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # the test Hub lets any token create private repos
    # Seeds no other test uses: an identical soup would already be in the Hub's LFS store.
    local = [save_ingredient(tmp_path / f"ing{i}", tiny_bert_config(), seed=i) for i in (41, 42)]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"ingredients": [str(p) for p in local],
                                  "output": {"dir": str(tmp_path / "soup")}}))  # fmt: skip
    target = repo_id("private-run")
    proc = cli("run", str(recipe), "--push-to", target, "--private", "-q")
    assert proc.returncode == 0, proc.stderr
    assert api.model_info(target, token="hf_test").private


def test_greedy_state_survives_a_failed_final_write(tiny_greedy, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("hfsoup.pipeline.write_soup_files", disk_full)
    target = tmp_path / "soup"
    with pytest.raises(OutputWriteError, match="resume state kept"):
        hfsoup.soup(tiny_greedy["repos"], output=target, method="greedy",
                    task=tiny_greedy["task"], progress=False)  # fmt: skip
    kept = partial_dir(target)
    assert (kept / "greedy_state.json").is_file() and any((kept / "logits").iterdir())


def test_a_damaged_greedy_state_is_not_resumed_but_replaced(tiny_greedy, tmp_path):
    target = tmp_path / "soup"
    kept = partial_dir(target)
    kept.mkdir()
    (kept / "greedy_state.json").write_text("{truncated")
    result = hfsoup.soup(tiny_greedy["repos"], output=target, method="greedy",
                         task=tiny_greedy["task"], progress=False)  # fmt: skip
    assert len(result.results["greedy"]["trace"]) == len(tiny_greedy["repos"])
    assert not kept.exists() and (target / "results.json").is_file()
