"""Hostile Hub servers and repos: a model_info that is not JSON, not an object, without a commit
SHA, listing unsafe or repeated file names, sizes or digests of the wrong form; redirect loops;
bodies of another length than asked; servers that trickle bytes. Each ends in one line (exit 2),
before any output is written, and never in a soup read from an unpinned or unchecked listing."""

from __future__ import annotations

import copy
import json
import re
import time

import pytest
from factories import save_ingredient, tiny_bert_config
from test_errors import assert_nothing_written, assert_one_line_error

reliability = pytest.mark.reliability


@pytest.fixture
def two_repos(tmp_path, publish):
    """Two tiny BERT fine-tunes of one config on the test Hub."""
    config = tiny_bert_config()
    return [publish(save_ingredient(tmp_path / f"ing{i}", config, seed=i + 1))[0] for i in (0, 1)]


def info_path(repo: str) -> str:
    """The fault path of ``repo``'s model_info (and only its)."""
    return rf"^/api/models/{re.escape(repo)}(/revision/[^/]+)?$"


def rewrite_info(edit, *, replace: bool = False):
    """A ``rewrite_json`` that applies ``edit`` to a copy of a model_info answer (``replace``:
    serves what ``edit`` returns instead)."""

    def rewrite(data):
        if not (isinstance(data, dict) and "siblings" in data):
            return data
        data = copy.deepcopy(data)
        result = edit(data)
        return result if replace else data

    return rewrite


def weights_sibling(data: dict) -> dict:
    return next(s for s in data["siblings"] if s["rfilename"] == "model.safetensors")


def config_sibling(data: dict) -> dict:
    return next(s for s in data["siblings"] if s["rfilename"] == "config.json")


def inspect_and_soup(cli, tmp_path, repos, add_fault):
    """``hfsoup inspect`` of the first repo and a uniform soup of all, each under the fault."""
    add_fault()
    inspected = cli("inspect", "-q", repos[0])
    add_fault()
    souped = cli("soup", "-q", *repos, "--output", tmp_path / "soup")
    return inspected, souped


# --- 1. a model_info answer that cannot be read ---------------------------------------------

UNREADABLE = {
    "html": dict(body=b"<html><body>Welcome</body></html>", content_type="text/html"),
    "truncated-json": dict(body=b'{"id": "x", "sha": '),
    "a-list": dict(rewrite_json=rewrite_info(lambda d: [d], replace=True)),
    "an-error-body-with-200": dict(body=b'{"error": "Injected"}'),
    "siblings-not-a-list": dict(rewrite_json=rewrite_info(lambda d: d.update(siblings="x"))),
    "sibling-not-an-object": dict(
        rewrite_json=rewrite_info(lambda d: d["siblings"].append("model.safetensors"))
    ),
    "sibling-without-rfilename": dict(
        rewrite_json=rewrite_info(lambda d: d["siblings"].append({"size": 3}))
    ),
    "lfs-not-an-object": dict(
        rewrite_json=rewrite_info(lambda d: weights_sibling(d).update(lfs="yes"))
    ),
    "bad-date": dict(rewrite_json=rewrite_info(lambda d: d.update(lastModified="yesterday"))),
}


@reliability(
    "model_info answered with 200 but unreadable: HTML, truncated JSON, a list, an error body, "
    "siblings that are not a list of objects, a sibling without rfilename, lfs that is not an "
    "object, a date that is not one",
    "one line: '<repo>: the Hub's answer about the repo cannot be read (JSONDecodeError: ...); "
    "the server at HF_ENDPOINT does not answer as the Hub does' (HubResponseError), for inspect "
    "and soup; nothing written",
)
@pytest.mark.parametrize("kind", list(UNREADABLE))
def test_an_unreadable_model_info_is_one_line(kind, faulty_hub, two_repos, cli, tmp_path):
    def add():
        faulty_hub.faults.clear()
        faulty_hub.add_fault(path=info_path(two_repos[0]), times=None, **UNREADABLE[kind])

    for proc in inspect_and_soup(cli, tmp_path, two_repos, add):
        assert_one_line_error(proc, two_repos[0], "the Hub's answer about the repo cannot be read")
    assert_nothing_written(tmp_path)


# --- 2. no commit SHA to pin to ---------------------------------------------------------------


@reliability(
    "model_info without a commit SHA, or with one that is not 40 hex digits (short, a path, a "
    "number): reads would follow the branch instead of one commit",
    "one line: '<repo>: the Hub's answer names no commit SHA (40 hex digits) to pin the "
    "ingredient to (sha: none)' (HubResponseError), before any file is read; no unpinned soup",
)
@pytest.mark.parametrize("sha", [None, "abc123", "../../main", 12345, "A" * 40])
def test_a_listing_without_a_commit_sha_is_refused(sha, faulty_hub, two_repos, cli, tmp_path):
    def edit(data):
        if sha is None:
            data.pop("sha")
        else:
            data["sha"] = sha

    def add():
        faulty_hub.faults.clear()
        faulty_hub.add_fault(
            path=info_path(two_repos[0]), times=None, rewrite_json=rewrite_info(edit)
        )
        # Records the repo's downloads, changes nothing.
        faulty_hub.add_fault(path=rf"^/{re.escape(two_repos[0])}/resolve/", times=None)

    inspected, souped = inspect_and_soup(cli, tmp_path, two_repos, add)
    for proc in (inspected, souped):
        assert_one_line_error(proc, two_repos[0], "names no commit SHA")
    assert_nothing_written(tmp_path)
    # Nothing of the repo was downloaded by a branch name.
    assert faulty_hub.faults[1].hits == 0


# --- 3. file names, sizes and digests ------------------------------------------------------


def add_sibling(sibling):
    return rewrite_info(lambda d: d["siblings"].append(sibling))


BAD_LISTINGS = {
    "absolute-name": (add_sibling({"rfilename": "/etc/passwd", "size": 10}), "'/etc/passwd'"),
    "dotdot-name": (add_sibling({"rfilename": "a/../../x.json", "size": 1}), "which is not a path"),
    "empty-part": (add_sibling({"rfilename": "a//b.json", "size": 1}), "which is not a path"),
    "backslash": (add_sibling({"rfilename": "..\\x.json", "size": 1}), "which is not a path"),
    "control-char": (add_sibling({"rfilename": "a\nb", "size": 1}), "which is not a path"),
    "number-name": (add_sibling({"rfilename": 5}), "a file named 5"),
    "same-name-twice": (
        rewrite_info(lambda d: d["siblings"].append(dict(weights_sibling(d), size=3))),
        "'model.safetensors' more than once",
    ),
    "negative-size": (
        rewrite_info(lambda d: weights_sibling(d).update(size=-5)),
        "with size -5, not a number of bytes",
    ),
    "string-size": (
        rewrite_info(lambda d: weights_sibling(d).update(size="big")),
        "with size 'big'",
    ),
    "float-size": (rewrite_info(lambda d: weights_sibling(d).update(size=12.5)), "size 12.5"),
    "bool-size": (rewrite_info(lambda d: weights_sibling(d).update(size=True)), "size True"),
    "config-negative-size": (
        rewrite_info(lambda d: config_sibling(d).update(size=-1)),
        "'config.json' with size -1",
    ),
    "sha256-not-hex": (
        rewrite_info(lambda d: weights_sibling(d)["lfs"].update(sha256="zz")),
        "sha256 'zz', which is not 64 hex digits",
    ),
    "sha256-a-number": (
        rewrite_info(lambda d: weights_sibling(d)["lfs"].update(sha256=5)),
        "sha256 5",
    ),
    "blob-id-not-hex": (
        rewrite_info(lambda d: config_sibling(d).update(blobId="nothex")),
        "git-sha1 'nothex', which is not 40 hex digits",
    ),
    "blob-id-a-number": (
        rewrite_info(lambda d: config_sibling(d).update(blobId=7)),
        "git-sha1 7",
    ),
}


@reliability(
    "model_info listing a file name that is not a path inside a repo (absolute, '..', empty "
    "part, backslash, control character, a number), a name twice, a size that is negative or "
    "not an integer, a sha256 or blob id that is not hex of its length",
    "one line naming the file and field: '<repo>: the Hub lists 'model.safetensors' with size "
    "-5, not a number of bytes; ...' (HubResponseError), for inspect and soup; nothing written",
)
@pytest.mark.parametrize("kind", list(BAD_LISTINGS))
def test_a_malformed_listing_is_refused(kind, faulty_hub, two_repos, cli, tmp_path):
    rewrite, fragment = BAD_LISTINGS[kind]

    def add():
        faulty_hub.faults.clear()
        faulty_hub.add_fault(path=info_path(two_repos[0]), times=None, rewrite_json=rewrite)

    for proc in inspect_and_soup(cli, tmp_path, two_repos, add):
        assert_one_line_error(proc, two_repos[0], fragment)
    assert_nothing_written(tmp_path)


def test_upper_case_digests_are_compared_as_hex(faulty_hub, two_repos, cli, tmp_path):
    """A sha256 listed in capitals is the same digest: the soup is made and checked."""
    upper = rewrite_info(
        lambda d: weights_sibling(d)["lfs"].update(
            sha256=weights_sibling(d)["lfs"]["sha256"].upper()
        )
    )
    faulty_hub.add_fault(path=info_path(two_repos[0]), times=None, rewrite_json=upper)
    proc = cli("soup", "-q", *two_repos, "--output", tmp_path / "soup")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "soup" / "model.safetensors").is_file()


@reliability(
    "model_info whose cardData is not an object (a string, a list)",
    "nothing: the card metadata is read from the README's front matter instead; the soup is made",
)
@pytest.mark.parametrize("card", ["hello", [1, 2]])
def test_card_data_that_is_not_an_object_is_ignored(card, faulty_hub, two_repos, cli, tmp_path):
    rewrite = rewrite_info(lambda d: d.update(cardData=card))
    faulty_hub.add_fault(path=info_path(two_repos[0]), times=None, rewrite_json=rewrite)
    proc = cli("soup", "-q", *two_repos, "--output", tmp_path / "soup")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "soup" / "model.safetensors").is_file()


# --- 4. redirects ---------------------------------------------------------------------------


@reliability(
    "Hub that redirects model_info or a file read in a loop, or to an address that is not "
    "http(s) (ftp://)",
    "one line within seconds: '<repo>: the Hub at URL redirected the request in a loop (too many "
    "redirects)' / '... to an address that is not http(s)' (HubResponseError), no retries",
)
@pytest.mark.parametrize(
    "target, location, fragment",
    [
        ("info", "?again", "in a loop"),
        ("weights", "?again", "in a loop"),
        ("weights", "ftp://127.0.0.1/model.safetensors", "not http(s)"),
    ],
)
def test_a_redirect_loop_is_one_line_at_once(
    target, location, fragment, faulty_hub, two_repos, cli, tmp_path
):
    path = info_path(two_repos[0]) if target == "info" else r"/resolve/[0-9a-f]{40}/model\."

    def add():
        faulty_hub.faults.clear()
        faulty_hub.add_fault(path=path, times=None, status=302, headers={"Location": location})

    started = time.monotonic()
    for proc in inspect_and_soup(cli, tmp_path, two_repos, add):
        assert_one_line_error(proc, two_repos[0], fragment)
    assert time.monotonic() - started < 30
    assert_nothing_written(tmp_path)


# --- 5. bodies of another length than asked --------------------------------------------------


@reliability(
    "Range reply whose Content-Length is not the length of the range (shorter, far longer), or a "
    "200 reply (HTML) shorter than the file",
    "one line at once: '<repo>/model.safetensors: the Hub announced a body of '10' bytes for N "
    "bytes asked; ...' (HubResponseError), instead of retrying a reply that cannot be right",
)
@pytest.mark.parametrize(
    "fault",
    [
        dict(headers={"Content-Length": "10"}),
        dict(headers={"Content-Length": "999999999"}),
        dict(body=b"<html>Not here</html>", content_type="text/html"),
    ],
    ids=["short", "long", "html-200"],
)
def test_a_body_of_another_length_is_refused_at_once(fault, faulty_hub, two_repos, cli, tmp_path):
    def add():
        faulty_hub.faults.clear()
        faulty_hub.add_fault(path=r"/resolve/[0-9a-f]{40}/model\.safetensors$", times=None, **fault)

    started = time.monotonic()
    for proc in inspect_and_soup(cli, tmp_path, two_repos, add):
        assert_one_line_error(proc, two_repos[0], "the Hub announced a body of")
    assert time.monotonic() - started < 20
    assert_nothing_written(tmp_path)


# --- 6. greedy runs see the same checks --------------------------------------------------------


def test_a_greedy_run_refuses_a_listing_without_a_commit_sha(
    faulty_hub, tiny_greedy, cli, tmp_path
):
    task = tmp_path / "task.yaml"
    task.write_text(json.dumps(tiny_greedy["task"]))
    repo = tiny_greedy["repos"][1]
    faulty_hub.add_fault(
        path=info_path(repo), times=None, rewrite_json=rewrite_info(lambda d: d.pop("sha"))
    )
    proc = cli("soup", "-q", *tiny_greedy["repos"], "--method", "greedy", "--task", task,
               "--output", tmp_path / "soup")  # fmt: skip
    assert_one_line_error(proc, repo, "names no commit SHA")
    assert_nothing_written(tmp_path)


# --- 7. a server that trickles bytes ----------------------------------------------------------


@pytest.fixture
def short_timeout(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DOWNLOAD_TIMEOUT", 0.3)
    monkeypatch.setattr("hfsoup.io.hubcalls.BACKOFF_S", 0.01)


@reliability(
    "Hub that trickles a file's bytes (one byte every 50 ms: never silent long enough for the "
    "read timeout)",
    "one line within seconds: '<repo>/model.safetensors: the Hub sent only N bytes in 0.3s "
    "(slower than 1024 bytes/s) (gave up after 5 retries)' (HubConnectionError); each try is "
    "bounded by HF_HUB_DOWNLOAD_TIMEOUT; nothing written",
)
def test_a_trickling_server_is_bounded_by_the_download_timeout(
    faulty_hub, two_repos, cli, tmp_path, short_timeout
):
    faulty_hub.add_fault(
        method="GET", path=r"/resolve/[0-9a-f]{40}/model\.safetensors$", times=None,
        trickle_seconds=0.05,
    )  # fmt: skip
    started = time.monotonic()
    proc = cli("soup", "-q", *two_repos, "--output", tmp_path / "soup")
    assert time.monotonic() - started < 30
    assert_one_line_error(proc, "model.safetensors", "the Hub sent only", "gave up after 5")
    assert_nothing_written(tmp_path)


# --- 8. repo IDs huggingface_hub refuses, names the system cannot look up ----------------------


@reliability(
    "Ingredient shaped like a repo ID that huggingface_hub refuses (org/a--b, org/x.git, a name "
    "over 96 characters, ending in '-'), or a name too long for the file system",
    "one line: 'ingredient 'org/a--b' is not a valid Hub repo ID: <huggingface_hub's reason>' "
    "(or 'is not 'org/name', 'org/name@revision' or a local directory') (IngredientSpecError), "
    "before any request; no HFValidationError or OSError traceback",
)
@pytest.mark.parametrize(
    "name", ["org/a--b", "org/x.git", "org/" + "a" * 120, "org/a-", "a" * 5000], ids=str.__len__
)
def test_repo_ids_the_hub_refuses_are_one_line(name, faulty_hub, cli):
    seen = faulty_hub.add_fault(times=None)  # records every request, changes nothing
    proc = cli("inspect", "-q", name)
    assert_one_line_error(proc, f"ingredient '{name[:40]}")
    assert len(proc.stderr) < 800
    line = proc.stderr.strip()
    assert "is not a valid Hub repo ID" in line or "is not 'org/name', 'org/name@revision'" in line
    assert seen.hits == 0


@reliability(
    "Hub that trickles a whole-file download (config.json, tokenizer, a greedy run's weights): "
    "huggingface_hub resumes with fresh retries whenever a byte came",
    "one line within seconds: '<repo>/config.json: the Hub sent only N bytes in 0.3s (slower "
    "than 1024 bytes/s) (gave up after 5 retries)' (HubConnectionError); nothing written",
)
def test_a_trickled_whole_file_download_is_bounded(
    faulty_hub, two_repos, cli, tmp_path, short_timeout, monkeypatch
):
    monkeypatch.setenv("HFSOUP_MAX_RETRY_WAIT", "1")
    faulty_hub.add_fault(
        method="GET", path=r"/resolve/[0-9a-f]{40}/config\.json$", times=None,
        trickle_seconds=0.05,
    )  # fmt: skip
    started = time.monotonic()
    proc = cli("soup", "-q", *two_repos, "--output", tmp_path / "soup")
    assert time.monotonic() - started < 30
    assert_one_line_error(proc, "config.json", "the Hub sent only")
    assert_nothing_written(tmp_path)
