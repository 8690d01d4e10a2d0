"""Hostile servers and hostile network settings: range replies that are not the range asked,
bytes that differ from what the Hub lists, servers asking to wait for an hour, and credentials
written into the Hub's address. Faults are injected by the test Hub under the real clients."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import struct
import time
from email.utils import formatdate
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_cli
from factories import save_ingredient, tiny_bert_config
from safetensors.torch import load_file, save_file
from test_errors import assert_nothing_written, assert_one_line_error
from test_reliability_network import assert_is_the_average, weights_path

import hfsoup
from hfsoup.errors import CorruptWeightsError, scrub
from hfsoup.io.hub import parse_ingredient, resolve
from hfsoup.io.streaming import iter_tensors
from hfsoup.io.tensors import index_ingredient

reliability = pytest.mark.reliability


@pytest.fixture
def pair(tmp_path, publish):
    """Two single-file ingredients on the Hub: ``(repos, local folders)``."""
    # Seeds of their own: the blobs of other tests' ingredients must not be the ones tampered.
    dirs = [save_ingredient(tmp_path / f"ing{i}", tiny_bert_config(), seed=i + 41) for i in (0, 1)]
    return [publish(d)[0] for d in dirs], dirs


@pytest.fixture
def tamper(hub):
    """``tamper(file, offset)`` flips one byte of the Hub's stored copy of ``file`` (the listed
    sha256 stays the true one); the blob is put back when the test ends, since blobs are shared
    by every repo holding the same bytes."""
    saved: list[tuple[Path, bytes]] = []

    def flip(file: Path, offset: int) -> None:
        blob = hub.store.blob_path(hashlib.sha256(file.read_bytes()).hexdigest())
        raw = blob.read_bytes()
        saved.append((blob, raw))
        blob.write_bytes(raw[:offset] + bytes([raw[offset] ^ 0xFF]) + raw[offset + 1 :])

    yield flip
    for blob, raw in reversed(saved):
        blob.write_bytes(raw)


def header_end(file: Path) -> int:
    return 8 + struct.unpack("<Q", file.read_bytes()[:8])[0]


def cached_weight_files(repo: str) -> list[Path]:
    """The weight files of ``repo`` downloaded whole into the HF cache."""
    import os

    folder = Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo.replace('/', '--')}"
    return sorted(folder.glob("snapshots/*/*.safetensors"))


# -- Content-Range -------------------------------------------------------------------------------


@reliability(
    "206 reply whose Content-Range is not the range asked (another range, another file size, "
    "or none)",
    "one line: '<repo>/model.safetensors: asked the Hub for bytes A-B/SIZE and got Content-Range "
    "'...'' (HubConnectionError), at once (no retries); nothing written",
)
@pytest.mark.parametrize("answer", ["bytes 0-9/10", "bytes 0-{last}/{wrong_size}", ""])
def test_range_reply_for_another_range_is_refused_at_once(faulty_hub, pair, tmp_path, cli, answer):
    repos, dirs = pair
    size = (dirs[0] / "model.safetensors").stat().st_size
    answer = answer.format(last=size - 1, wrong_size=size + 1)
    # skip=1 lets the header probe through; the streamed read of the file gets the wrong range.
    fault = faulty_hub.add_fault(
        method="GET", path=weights_path(repos[0]), skip=1, times=None, content_range=answer
    )
    proc = cli("soup", *repos, "--output", tmp_path / "soup", "-q")
    received = f"Content-Range {answer!r}" if answer else "no Content-Range"
    assert_one_line_error(
        proc,
        f"{repos[0]}/model.safetensors",
        f"asked the Hub for bytes 0-{size - 1}/{size}",
        received,
    )
    assert fault.hits == 1  # a server answering the wrong range is broken: no back-off loop
    assert_nothing_written(tmp_path)


# -- bytes that are not the Hub's --------------------------------------------------------------


@reliability(
    "Range replies serving shifted bytes under an honest-looking Content-Range",
    "one line: '<repo>: model.safetensors: the header streamed from the Hub differs from the one "
    "read when indexing ...' or '... do not match its sha256 ...' (CorruptWeightsError); "
    "nothing written",
)
def test_shifted_range_bytes_are_refused(faulty_hub, pair, tmp_path, cli):
    repos, _ = pair
    faulty_hub.add_fault(
        method="GET", path=weights_path(repos[1]), skip=1, times=None, shift_bytes=8
    )
    proc = cli("soup", *repos, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, f"{repos[1]}: model.safetensors", "refused")
    assert_nothing_written(tmp_path)


@reliability(
    "Hub serves tensor bytes that differ from the sha256 it lists (uniform soup, range reads)",
    "one line: '<repo>: model.safetensors: the bytes streamed from the Hub do not match its "
    "sha256 ...; refused' (CorruptWeightsError); nothing written",
)
def test_streamed_bytes_that_fail_the_listed_sha256_are_refused(tamper, pair, tmp_path, cli):
    repos, dirs = pair
    weights = dirs[0] / "model.safetensors"
    # One byte of tensor data, past the header: every header still parses and matches.
    tamper(weights, header_end(weights) + 100)
    proc = cli("soup", *repos, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(
        proc, f"{repos[0]}: model.safetensors", "do not match its sha256", "refused"
    )
    assert_nothing_written(tmp_path)


@pytest.fixture
def gappy_repo(tmp_path, publish):
    """A repo whose model.safetensors holds three 1 MiB tensors ``a``, ``b``, ``c``."""
    folder = tmp_path / "gappy"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    gen = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(256, 1024, generator=gen) for n in "abc"}
    save_file(tensors, str(folder / "model.safetensors"))
    return publish(folder)[0], folder


def test_unread_stretches_of_a_streamed_file_are_hashed_too(faulty_hub, gappy_repo):
    repo, folder = gappy_repo
    weights = folder / "model.safetensors"
    index = index_ingredient(resolve(parse_ingredient(repo)))
    seen = faulty_hub.add_fault(method="GET", path=weights_path(repo), times=None)
    got = dict(iter_tensors(index, ["a", "c"]))
    expected = load_file(str(weights))
    for name in ("a", "c"):
        torch.testing.assert_close(got[name], expected[name])
    b = index.tensors["b"]
    size = weights.stat().st_size
    # The tensors asked for, with the header before them and the stretch of ``b`` between them
    # read only to be hashed: every byte of the file, once.
    spans = sorted(
        tuple(map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", r).groups())) for r in seen.ranges
    )
    assert spans[0][0] == 0 and spans[-1][1] == size - 1
    assert all(nxt[0] == prev[1] + 1 for prev, nxt in zip(spans, spans[1:], strict=False))
    assert (b.start, b.end - 1) in spans


@reliability(
    "Hub serves altered bytes in a stretch of the file no tensor asked for is read from",
    "one line: '... do not match its sha256 ...; refused' (CorruptWeightsError)",
)
def test_altered_bytes_between_the_tensors_read_are_caught(tamper, gappy_repo):
    repo, folder = gappy_repo
    weights = folder / "model.safetensors"
    index = index_ingredient(resolve(parse_ingredient(repo)))
    tamper(weights, index.tensors["b"].start + 10)  # in ``b``, which is not asked for
    with pytest.raises(
        CorruptWeightsError, match=r"model\.safetensors: .* do not match its sha256"
    ):
        list(iter_tensors(index, ["a", "c"]))


@pytest.fixture
def sharded_alike(tmp_path, publish):
    """Two ingredients sharded the same way (8 KB shards): each file streams in stored order."""
    dirs = [
        save_ingredient(tmp_path / f"ing{i}", tiny_bert_config(), seed=i + 51, max_shard_size="8KB")
        for i in (0, 1)
    ]
    return [publish(d)[0] for d in dirs], dirs


def test_ingredients_sharded_alike_are_verified_as_they_stream(sharded_alike, tmp_path, caplog):
    repos, dirs = sharded_alike
    assert len(list(dirs[0].glob("*.safetensors"))) > 1
    hfsoup.soup(repos, output=tmp_path / "soup", progress=False)
    assert_is_the_average(tmp_path / "soup", dirs)
    # Verified on the way: nothing downloaded whole, and no notice of an unverified file.
    assert [cached_weight_files(r) for r in repos] == [[], []]
    assert not [r for r in caplog.records if r.name == "hfsoup"]


@reliability(
    "Hub serves altered bytes in one shard of a sharded ingredient",
    "one line: '<repo>: model-0000N-of-0000M.safetensors: the bytes streamed from the Hub do not "
    "match its sha256 ...' (CorruptWeightsError); nothing written",
)
def test_an_altered_shard_is_refused_naming_it(tamper, sharded_alike, tmp_path, cli):
    repos, dirs = sharded_alike
    shard = sorted(dirs[1].glob("model-*.safetensors"))[-1]
    tamper(shard, header_end(shard) + 4)
    proc = cli("soup", *repos, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, f"{repos[1]}: {shard.name}", "do not match its sha256")
    assert_nothing_written(tmp_path)


@pytest.fixture
def sharded_unlike(tmp_path, publish):
    """The first ingredient in 8 KB shards, the second in one file. With 8 KB output shards
    (which follow the first's order) the second's file is read out of its stored order."""
    dirs = [
        save_ingredient(tmp_path / "ing0", tiny_bert_config(), seed=61, max_shard_size="8KB"),
        save_ingredient(tmp_path / "ing1", tiny_bert_config(), seed=62),
    ]
    return [publish(d)[0] for d in dirs], dirs


def test_an_ingredient_read_out_of_order_is_downloaded_whole_and_checked(
    sharded_unlike, tmp_path, caplog
):
    repos, dirs = sharded_unlike
    hfsoup.soup(repos, output=tmp_path / "soup", max_shard_size="8KB", progress=False)
    assert_is_the_average(tmp_path / "soup", dirs)
    notices = [r.getMessage() for r in caplog.records if r.name == "hfsoup"]
    assert len(notices) == 1, notices
    assert repos[1] in notices[0] and "downloading it whole" in notices[0]
    # The first ingredient streamed (and was hashed on the way); the second was downloaded whole
    # and checked, and what was averaged is exactly the Hub's bytes.
    assert cached_weight_files(repos[0]) == []
    [cached] = cached_weight_files(repos[1])
    assert cached.read_bytes() == (dirs[1] / "model.safetensors").read_bytes()


@reliability(
    "Altered bytes in an ingredient sharded unlike the first (read out of order)",
    "one line: '<repo>/model.safetensors: the downloaded bytes do not match the Hub's sha256 ... "
    "(twice); refused and removed from the cache' (CorruptWeightsError); nothing written",
)
def test_altered_bytes_in_an_ingredient_read_out_of_order_are_refused(
    tamper, sharded_unlike, tmp_path, cli
):
    repos, dirs = sharded_unlike
    weights = dirs[1] / "model.safetensors"
    tamper(weights, header_end(weights) + 4)
    proc = cli("soup", *repos, "--output", tmp_path / "soup", "--max-shard-size", "8KB", "-q")
    # The notice that the file is downloaded whole to be checked comes first, then the error.
    notice, error = proc.stderr.strip().splitlines()
    assert "downloading it whole to check its sha256" in notice
    assert_one_line_error(
        SimpleNamespace(returncode=proc.returncode, stderr=error),
        f"{repos[1]}/model.safetensors", "do not match", "sha256",
    )  # fmt: skip
    assert_nothing_written(tmp_path)


# -- Retry-After ---------------------------------------------------------------------------------


def _config_path(repo: str) -> str:
    return rf"/{re.escape(repo)}/resolve/[^/]+/config\.json$"


def _info_path(repo: str) -> str:
    return rf"/api/models/{re.escape(repo)}(/revision/.*)?$"


@reliability(
    "Server answers 429 with Retry-After: 3600 (model info, a whole-file download, a range read)",
    "one line: '<what>: the Hub answered 429 and asked to retry after 3600 s; hfsoup waits at "
    "most 60 s in all (HFSOUP_MAX_RETRY_WAIT)' (HubConnectionError), within seconds",
)
@pytest.mark.parametrize("where", ["model info", "resolve", "range read"])
def test_retry_after_longer_than_the_cap_fails_at_once(faulty_hub, pair, tmp_path, cli, where):
    repos, _ = pair
    path = {"model info": _info_path, "resolve": _config_path, "range read": weights_path}[where]
    skip = 1 if where == "range read" else 0  # let the header probe through
    fault = faulty_hub.add_fault(
        method="GET", path=path(repos[1]), skip=skip, times=None, status=429, retry_after=3600
    )
    t0 = time.perf_counter()
    proc = cli("soup", *repos, "--output", tmp_path / "soup", "-q")
    elapsed = time.perf_counter() - t0
    assert_one_line_error(
        proc,
        repos[1],
        "answered 429",
        "retry after 3600 s",
        "at most 60 s",
        "HFSOUP_MAX_RETRY_WAIT",
    )
    assert elapsed < 30
    assert fault.hits == 1
    assert_nothing_written(tmp_path)


@reliability(
    "Retry-After as an HTTP date an hour ahead",
    "one line: '... asked to retry after 3600 s; hfsoup waits at most 60 s in all ...' "
    "(HubConnectionError), at once",
)
def test_retry_after_as_an_http_date_is_read(faulty_hub, pair, tmp_path, cli):
    repos, dirs = pair
    past = faulty_hub.add_fault(
        method="GET", path=weights_path(repos[0]), skip=1, status=503,
        retry_after=formatdate(time.time() - 60, usegmt=True),
    )  # fmt: skip
    hfsoup.soup(repos, output=tmp_path / "soup", progress=False)  # a date past: retried at once
    assert past.hits == 1
    assert_is_the_average(tmp_path / "soup", dirs)
    faulty_hub.add_fault(
        method="GET", path=weights_path(repos[0]), skip=1, times=None, status=503,
        retry_after=formatdate(time.time() + 3600, usegmt=True),
    )  # fmt: skip
    proc = cli("soup", *repos, "--output", tmp_path / "soup2", "-q")
    assert_one_line_error(proc, "answered 503")
    assert re.search(r"retry after 3[56]\d\d s", proc.stderr), proc.stderr
    assert_nothing_written(tmp_path, "soup2")


@reliability(
    "Retry-After waits that add up past the cap (HFSOUP_MAX_RETRY_WAIT=1.5, 1 s asked each time)",
    "one line: '... asked to retry after 1 s; hfsoup waits at most 1.5 s in all "
    "(HFSOUP_MAX_RETRY_WAIT)' (HubConnectionError)",
)
def test_retry_after_waits_add_up_to_the_cap(faulty_hub, pair, tmp_path, cli, monkeypatch):
    repos, _ = pair
    monkeypatch.setenv("HFSOUP_MAX_RETRY_WAIT", "1.5")
    fault = faulty_hub.add_fault(
        method="GET", path=weights_path(repos[0]), skip=1, times=None, status=503, retry_after=1
    )
    t0 = time.perf_counter()
    proc = cli("soup", *repos, "--output", tmp_path / "soup", "-q")
    elapsed = time.perf_counter() - t0
    assert_one_line_error(proc, "retry after 1 s", "at most 1.5 s in all")
    assert fault.hits == 2  # waited once (1 s), then 1 s more would pass the cap
    assert 1 <= elapsed < 20
    assert_nothing_written(tmp_path)


@reliability(
    "HFSOUP_MAX_RETRY_WAIT that is not a number of seconds",
    "one line: 'HFSOUP_MAX_RETRY_WAIT must be a number of seconds >= 0, got 'soon'' (RecipeError)",
)
def test_unreadable_retry_wait_setting_is_one_line(pair, tmp_path, cli, monkeypatch):
    repos, _ = pair
    monkeypatch.setenv("HFSOUP_MAX_RETRY_WAIT", "soon")
    proc = cli("soup", *repos, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, "HFSOUP_MAX_RETRY_WAIT", "'soon'")
    assert_nothing_written(tmp_path)


# -- credentials in URLs -------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@reliability(
    "Token written into HF_ENDPOINT as userinfo (http://user:SECRET@host), Hub unreachable",
    "one line: '<repo>: cannot reach the Hub at http://***@127.0.0.1:PORT (gave up after N "
    "retries)' (HubConnectionError); the secret is printed nowhere, --debug tracebacks included",
)
@pytest.mark.parametrize("debug", [False, True])
def test_credentials_in_the_hub_address_are_never_printed(tmp_path, debug):
    secret = "hf_SECRETabcdefghijklmnopqrstuvwxyz"
    env = {
        "HF_ENDPOINT": f"http://user:{secret}@127.0.0.1:{_closed_port()}",
        "HFSOUP_MAX_RETRY_WAIT": "1",
    }
    args = ["soup", "org/a", "org/b", "--output", str(tmp_path / "soup"), "-q"]
    proc = run_cli(*args, *(["--debug"] if debug else []), env=env)
    assert proc.returncode == 2, proc.stderr
    assert secret not in proc.stdout + proc.stderr
    assert "SECRET" not in proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hfsoup: error: org/a: cannot reach the Hub at http://***@127.0.0.1:")
    if not debug:
        assert_one_line_error(proc, "cannot reach the Hub")
    assert_nothing_written(tmp_path)


def test_scrub_masks_userinfo_and_tokens(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "plain-secret-value")
    text = (
        "at https://me:pw@hub.example/api, ftp://tok@x/y, token hf_abcdefghijklmnopqrstuvwxyz0123 "
        "and plain-secret-value; org/name@rev and http://host/path@v1 stay"
    )
    assert scrub(text) == (
        "at https://***@hub.example/api, ftp://***@x/y, token hf_*** and ***; "
        "org/name@rev and http://host/path@v1 stay"
    )
