"""Pushing a soup: one commit, loads back by repo ID, and a failed push keeps the output."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli
from factories import load_state_dict

import hfsoup
from hfsoup.errors import PushError


def test_push_then_from_pretrained_round_trips(hub, bert_soup_ingredients, tmp_path, api, repo_id):
    from transformers import AutoModelForSequenceClassification

    repos, _ = bert_soup_ingredients
    target = repo_id("soup")
    result = hfsoup.soup(repos, output=tmp_path / "soup", push_to=target, progress=False)
    commits = api.list_repo_commits(target)
    assert len(commits) == 2  # the initial commit and exactly one upload
    assert result.url == f"{hub.url}/{target}/commit/{commits[0].commit_id}"  # newest first
    model = AutoModelForSequenceClassification.from_pretrained(target)
    local = load_state_dict(tmp_path / "soup")
    state = model.state_dict()
    assert state.keys() == local.keys()
    assert all(torch.equal(state[k], v) for k, v in local.items())
    files = set(api.list_repo_files(target))
    assert {"README.md", "config.json", "model.safetensors", "results.json"} <= files


def test_push_command_uploads_a_folder(hub, bert_soup_ingredients, tmp_path, api, repo_id):
    repos, _ = bert_soup_ingredients
    hfsoup.soup(repos, output=tmp_path / "soup", progress=False)
    target = repo_id("pushed")
    proc = run_cli("push", str(tmp_path / "soup"), target, "--private", env={"HF_TOKEN": "hf_test"})
    assert proc.returncode == 0, proc.stderr
    assert "model.safetensors" in api.list_repo_files(target, token="hf_test")
    assert api.model_info(target, token="hf_test").private


def test_failed_push_keeps_the_output_and_says_how_to_retry(
    hub, bert_soup_ingredients, tmp_path, repo_id, api
):
    repos, _ = bert_soup_ingredients
    target = repo_id("broken")
    hub.add_fault(method="POST", path=r"/api/models/.*/commit/", status=500, times=100)
    try:
        with pytest.raises(PushError, match=rf"hfsoup push .*soup {target}"):
            hfsoup.soup(repos, output=tmp_path / "soup", push_to=target, progress=False)
    finally:
        hub.faults.clear()
    assert (tmp_path / "soup" / "model.safetensors").is_file()
    url = hfsoup.push(tmp_path / "soup", target)  # the printed retry works once the Hub is back
    assert url == f"{hub.url}/{target}/commit/{api.list_repo_commits(target)[0].commit_id}"
    local = {p.name for p in (tmp_path / "soup").iterdir() if p.is_file()}
    assert "model.safetensors" in local
    assert local <= set(api.list_repo_files(target))


def test_push_refuses_a_folder_that_is_not_a_soup(tmp_path):
    with pytest.raises(PushError, match="not a soup folder"):
        hfsoup.push(tmp_path, "test-org/x")
