"""Hostile pushes: stale weights left beside new ones, symlinks out of the folder, files hfsoup
did not write (.env, keys), and push targets that are not repo IDs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from factories import load_state_dict, save_ingredient, tiny_bert_config
from test_errors import assert_nothing_written, assert_one_line_error

import hfsoup
from hfsoup.errors import PushError

reliability = pytest.mark.reliability


@pytest.fixture
def pair(tmp_path):
    """Two ingredients in local folders: the soups are local, the pushes go to the test Hub."""
    return [
        str(save_ingredient(tmp_path / f"ing{i}", tiny_bert_config(), seed=i + 1)) for i in (0, 1)
    ]


def make_soup(pair, folder, *, shards: int, weights=None):
    """A soup of ``pair`` in ``folder`` written as ``shards`` weight files."""
    size = "5GB" if shards == 1 else "10KB"
    hfsoup.soup(pair, output=folder, weights=weights, max_shard_size=size, progress=False)
    written = sorted(p.name for p in folder.glob("model*.safetensors"))
    assert len(written) == shards, written
    return load_state_dict(folder)


def weight_files(names) -> set[str]:
    return {n for n in names if n.startswith(("model", "pytorch_model"))}


@reliability(
    "Re-push of a soup with another shard layout (one file -> 3 shards, 3 shards -> one file)",
    "the repo holds only the new soup's weight files: the old model.safetensors (or old shards and "
    "index) are deleted in the same commit, and from_pretrained loads the new weights",
)
@pytest.mark.parametrize("before, after", [(1, 3), (3, 1)], ids=["1-to-3", "3-to-1"])
def test_a_repush_replaces_stale_weight_files(hub, pair, tmp_path, api, repo_id, before, after):
    from transformers import AutoModelForSequenceClassification

    target = repo_id("repush")
    old = make_soup(pair, tmp_path / "old", shards=before)
    hfsoup.push(tmp_path / "old", target)
    new = make_soup(pair, tmp_path / "new", shards=after, weights=[0.9, 0.1])
    assert any(not torch.equal(old[k], new[k]) for k in new)  # the two soups can be told apart
    commits_before = len(api.list_repo_commits(target))
    hfsoup.push(tmp_path / "new", target)
    assert len(api.list_repo_commits(target)) == commits_before + 1  # one commit replaces them
    local = {p.name for p in (tmp_path / "new").iterdir()}
    remote = set(api.list_repo_files(target))
    assert weight_files(remote) == weight_files(local)
    state = AutoModelForSequenceClassification.from_pretrained(target).state_dict()
    assert state.keys() == new.keys()
    assert all(torch.equal(state[k], v) for k, v in new.items())


def test_a_push_keeps_remote_files_hfsoup_does_not_own(hub, pair, tmp_path, api, repo_id):
    target = repo_id("kept")
    make_soup(pair, tmp_path / "soup", shards=1)
    api.create_repo(target)
    api.upload_file(repo_id=target, path_or_fileobj=b"MIT", path_in_repo="LICENSE")
    api.upload_file(
        repo_id=target, path_or_fileobj=b"\x89PNG", path_in_repo="greedy_trajectory.png"
    )
    api.upload_file(repo_id=target, path_or_fileobj=b"{}", path_in_repo="vocab.json")
    hfsoup.push(tmp_path / "soup", target)
    remote = set(api.list_repo_files(target))
    assert "LICENSE" in remote  # the user's own file
    assert not {"greedy_trajectory.png", "vocab.json"} & remote  # an earlier soup's, not this one's


@reliability(
    "push DIR holding a symlink (to a file or a folder outside DIR, or as a weight file) or a FIFO",
    "one line: 'refusing to push DIR: it holds NAME (a symlink); a push uploads only regular files "
    "inside the folder and follows no link; nothing was uploaded' (PushError); the repo is not "
    "even created",
)
@pytest.mark.parametrize("kind", ["file link", "folder link", "weights link", "fifo"])
def test_symlinks_and_special_files_are_refused_before_any_upload(
    pair, tmp_path, api, repo_id, cli, kind
):
    soup = tmp_path / "soup"
    make_soup(pair, soup, shards=1)
    secret = tmp_path / "secret.txt"
    secret.write_text("hf_not_for_upload")
    if kind == "file link":
        name, what = "notes.txt", "a symlink"
        os.symlink(secret, soup / name)
    elif kind == "folder link":
        name, what = "extra", "a symlink"
        os.symlink(tmp_path, soup / name, target_is_directory=True)
    elif kind == "weights link":
        name, what = "model.safetensors", "a symlink"
        (tmp_path / "elsewhere.safetensors").write_bytes((soup / name).read_bytes())
        (soup / name).unlink()
        os.symlink(tmp_path / "elsewhere.safetensors", soup / name)
    else:
        name, what = "pipe", "not a regular file"
        os.mkfifo(soup / name)
    target = repo_id("linked")
    proc = cli("push", soup, target)
    assert_one_line_error(proc, f"{name} ({what})", "nothing was uploaded")
    assert not api.repo_exists(target)


@reliability(
    "push DIR holding files hfsoup did not write (.env, a key, a stale shard, a subfolder)",
    "they are not uploaded; one stderr line: 'hfsoup: push leaves out N file(s) of DIR that hfsoup "
    "did not write: ... (add them with --include PATTERN)'",
)
def test_files_hfsoup_did_not_write_are_left_out_with_a_notice(pair, tmp_path, api, repo_id, cli):
    soup = tmp_path / "soup"
    make_soup(pair, soup, shards=3)
    own = {p.name for p in soup.iterdir()}
    extras = {".env": "HF_TOKEN=hf_secret", "id_rsa": "-----BEGIN", "notes/run.txt": "log",
              "model-00001-of-00009.safetensors": "stale"}  # fmt: skip
    for name, text in extras.items():
        (soup / name).parent.mkdir(exist_ok=True)
        (soup / name).write_text(text)
    target = repo_id("extras")
    proc = cli("push", soup, target)
    assert proc.returncode == 0, proc.stderr
    assert set(api.list_repo_files(target)) - {".gitattributes"} == own
    notices = [line for line in proc.stderr.splitlines() if "leaves out" in line]
    assert len(notices) == 1, proc.stderr
    assert notices[0].startswith("hfsoup: push leaves out 4 file(s)")
    assert all(name in notices[0] for name in extras)


def test_include_adds_the_files_its_patterns_name(pair, tmp_path, api, repo_id, cli):
    soup = tmp_path / "soup"
    make_soup(pair, soup, shards=1)
    (soup / "eval").mkdir()
    (soup / "eval" / "scores.json").write_text("{}")
    (soup / "LICENSE").write_text("MIT")
    (soup / ".env").write_text("HF_TOKEN=hf_secret")
    target = repo_id("included")
    proc = cli("push", soup, target, "--include", "eval", "--include", "LIC*")
    assert proc.returncode == 0, proc.stderr
    remote = set(api.list_repo_files(target))
    assert {"eval/scores.json", "LICENSE", "model.safetensors"} <= remote
    assert ".env" not in remote
    hfsoup.push(soup, target, include=[".env"])  # the Python API takes the same patterns
    assert ".env" in api.list_repo_files(target)


@reliability(
    "push --include with a pattern outside DIR (../*, /etc/passwd) or matching nothing",
    "one line: 'include pattern '../*' must be a glob relative to DIR, inside it; nothing was "
    "uploaded' / '... matches no regular file inside DIR' (PushError); the repo is not created",
)
@pytest.mark.parametrize("pattern", ["../*", "/etc/passwd", "~/.ssh/*", "no-such-*"])
def test_include_patterns_never_reach_outside_the_folder(
    pair, tmp_path, api, repo_id, cli, pattern
):
    make_soup(pair, tmp_path / "soup", shards=1)
    target = repo_id("outside")
    proc = cli("push", tmp_path / "soup", target, "--include", pattern)
    assert_one_line_error(proc, repr(pattern), "nothing was uploaded")
    assert not api.repo_exists(target)


@reliability(
    "push DIR whose weights are ambiguous or incomplete (model.safetensors beside an index, an "
    "index naming a missing shard or a file that is no weight file, e.g. .env)",
    "one line: 'DIR holds both model.safetensors and model.safetensors.index.json ...' / "
    "'DIR/model.safetensors.index.json names X, which DIR does not hold ...' (PushError)",
)
@pytest.mark.parametrize("damage", ["both layouts", "missing shard", "index names a secret"])
def test_a_soup_with_ambiguous_weights_is_not_pushed(pair, tmp_path, api, repo_id, cli, damage):
    soup = tmp_path / "soup"
    make_soup(pair, soup, shards=3)
    if damage == "both layouts":
        make_soup(pair, tmp_path / "single", shards=1)
        (soup / "model.safetensors").write_bytes(
            (tmp_path / "single/model.safetensors").read_bytes()
        )
        expected = "holds both model.safetensors and model.safetensors.index.json"
    elif damage == "missing shard":
        index = json.loads((soup / "model.safetensors.index.json").read_text())
        gone = sorted(set(index["weight_map"].values()))[1]
        (soup / gone).unlink()
        expected = f"names {gone}, which"
    else:
        (soup / ".env").write_text("HF_TOKEN=hf_secret")
        index = json.loads((soup / "model.safetensors.index.json").read_text())
        first = next(iter(index["weight_map"]))
        index["weight_map"][first] = ".env"
        (soup / "model.safetensors.index.json").write_text(json.dumps(index))
        expected = "names .env, which is not a weight file"
    target = repo_id("ambiguous")
    assert_one_line_error(cli("push", soup, target), expected)
    assert not api.repo_exists(target)


BAD_IDS = ["org/name/extra", "has space/x", "org/--x", "org/x.git", "org/trailing-", "x" * 200, ""]


@reliability(
    "--push-to (soup, run, a recipe's output.push_to) or push REPO_ID that is not a repo ID",
    "one line: 'output.push_to: 'a/b/c' is not a Hub repo ID: use 'name' or 'org/name' ...' "
    "(RecipeError; PushError for push), before any request reaches the Hub; nothing written",
)
@pytest.mark.parametrize("bad", BAD_IDS, ids=lambda s: s[:16] or "empty")
def test_a_bad_push_target_fails_before_any_work(faulty_hub, publish, pair, tmp_path, cli, bad):
    ingredient, _ = publish(pair[0])  # a Hub ingredient: resolving it would reach the Hub
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"ingredients": [ingredient, pair[1]],
                                  "output": {"dir": str(tmp_path / "soup"), "push_to": bad}}))  # fmt: skip
    seen = faulty_hub.add_fault(times=None)  # no misbehaviour: it only counts requests
    calls = [
        ("soup", ingredient, pair[1], "--output", tmp_path / "soup", "--push-to", bad, "-q"),
        ("run", recipe, "-q"),
        ("push", pair[0], bad),
    ]
    if bad:  # `--push-to ""` means "no override" to run
        calls.append(("run", recipe, "--push-to", bad, "-q"))
    for args in calls:
        proc = cli(*args)
        assert_one_line_error(proc, "is not a Hub repo ID", repr(bad)[:50])
    assert seen.hits == 0
    assert_nothing_written(tmp_path)


def test_a_file_swapped_for_a_link_after_the_check_is_refused_when_opened(tmp_path):
    from hfsoup.report.pushplan import open_regular

    (tmp_path / "secret").write_text("hf_secret")
    os.symlink(tmp_path / "secret", tmp_path / "README.md")
    with pytest.raises(PushError, match="README.md: it is a symlink"):
        open_regular(tmp_path, "README.md")


def test_a_failed_push_prints_a_retry_with_the_same_includes(faulty_hub, pair, tmp_path, repo_id):
    soup = tmp_path / "soup"
    make_soup(pair, soup, shards=1)
    (soup / "my notes.txt").write_text("notes")
    target = repo_id("retry")
    faulty_hub.add_fault(method="POST", path=r"/api/models/.*/commit/", status=500, times=None)
    with pytest.raises(PushError, match=f"hfsoup push {soup} {target} --include 'my notes.txt'"):
        hfsoup.push(soup, target, include=["my notes.txt"])


def test_card_images_are_the_figures_the_soups_draw():
    from hfsoup.methods.learned_run import ALPHA_PNG
    from hfsoup.report.pushplan import CARD_IMAGES
    from hfsoup.report.summary import TRAJECTORY_PNG

    assert set(CARD_IMAGES) == {TRAJECTORY_PNG, ALPHA_PNG}


def test_push_refuses_a_missing_folder(tmp_path):
    with pytest.raises(PushError, match="not a soup folder"):
        hfsoup.push(tmp_path / "absent", "test-org/x")
