"""Network faults: dropped connections, 429/5xx with Retry-After, stalls, bytes that fail their
digest, gated and private repos. Each is injected by the test Hub (``hub.add_fault``) under the
real ``huggingface_hub`` client."""

from __future__ import annotations

import re
import struct
import time

import pytest
import torch
from factories import load_state_dict, save_ingredient, tiny_bert_config
from test_errors import assert_nothing_written, assert_one_line_error

import hfsoup
from hfsoup.errors import CorruptWeightsError
from hfsoup.io.hub import parse_ingredient, resolve

reliability = pytest.mark.reliability


@pytest.fixture
def pair(tmp_path, publish):
    """Two single-file ingredients on the Hub: ``(repos, local folders)``."""
    dirs = [save_ingredient(tmp_path / f"ing{i}", tiny_bert_config(), seed=i + 1) for i in (0, 1)]
    return [publish(d)[0] for d in dirs], dirs


@pytest.fixture
def fast_retries(monkeypatch):
    """Back-off of milliseconds, so that exhausting the retries takes no time."""
    monkeypatch.setattr("hfsoup.io.hubcalls.BACKOFF_S", 0.001)


def weights_path(repo: str) -> str:
    """The path of ``repo``'s model.safetensors, as a fault rule's pattern."""
    return rf"/{re.escape(repo)}/resolve/[^/]+/model\.safetensors$"


def data_start(folder) -> int:
    """Where the tensor data of ``folder``'s model.safetensors begins (after its header)."""
    raw = (folder / "model.safetensors").read_bytes()
    return 8 + struct.unpack("<Q", raw[:8])[0]


def assert_is_the_average(output, dirs) -> None:
    states = [load_state_dict(d) for d in dirs]
    soup = load_state_dict(output)
    for name, tensor in soup.items():
        expected = torch.stack([s[name].float() for s in states]).mean(0)
        torch.testing.assert_close(tensor.float(), expected)


@reliability(
    "Connection dropped mid-fetch",
    "nothing: the read is retried with back-off from the last byte received; the soup is exact",
)
def test_dropped_range_read_resumes_from_the_last_byte(faulty_hub, pair, tmp_path, fast_retries):
    repos, dirs = pair
    # skip=1 lets the header probe through; the drop hits the streamed read of the file (from
    # byte 0: the header is read again, to be hashed with the tensor data).
    faulty_hub.add_fault(method="GET", path=weights_path(repos[0]), skip=1, drop_after_bytes=1000)
    seen = faulty_hub.add_fault(method="GET", path=weights_path(repos[0]), times=None)
    hfsoup.soup(repos, output=tmp_path / "soup", progress=False)
    size = (dirs[0] / "model.safetensors").stat().st_size
    assert seen.ranges == [f"bytes=1000-{size - 1}"]
    assert_is_the_average(tmp_path / "soup", dirs)


@reliability(
    "Connection dropped on every retry",
    "one line: '<repo>/<file>: the connection to the Hub at URL broke (RemoteProtocolError) "
    "(gave up after 5 retries)' (HubConnectionError)",
)
def test_connection_dropped_every_time_ends_with_one_line(
    faulty_hub, pair, tmp_path, cli, fast_retries
):
    repos, _ = pair
    fault = faulty_hub.add_fault(
        method="GET", path=weights_path(repos[0]), skip=1, times=None, drop_after_bytes=100
    )
    proc = cli("soup", *repos, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, f"{repos[0]}/model.safetensors", "broke", "gave up after 5 retries")
    assert fault.hits == 6  # the first try and five retries: bounded
    assert_nothing_written(tmp_path)


@reliability(
    "429 / 5xx answered with Retry-After",
    "nothing: hfsoup waits as long as asked (at most HFSOUP_MAX_RETRY_WAIT, 60 s, in all), "
    "retries, and the soup completes",
)
def test_retry_after_is_waited_out(faulty_hub, pair, tmp_path):
    repos, dirs = pair
    info = faulty_hub.add_fault(
        method="GET", path=rf"/api/models/{re.escape(repos[1])}", status=429, retry_after=1
    )
    data = faulty_hub.add_fault(
        method="GET", path=weights_path(repos[0]), skip=1, status=503, retry_after=1
    )
    t0 = time.perf_counter()
    hfsoup.soup(repos, output=tmp_path / "soup", progress=False)
    assert time.perf_counter() - t0 >= 2.0  # one second asked for by each answer
    assert info.hits == data.hits == 1
    assert_is_the_average(tmp_path / "soup", dirs)


@reliability(
    "5xx that does not go away",
    "one line: '<repo>/<file>: the Hub answered 503 (gave up after 5 retries)' "
    "(HubConnectionError)",
)
def test_persistent_server_error_ends_with_one_line(faulty_hub, pair, tmp_path, cli, fast_retries):
    repos, _ = pair
    fault = faulty_hub.add_fault(
        method="GET", path=weights_path(repos[1]), skip=1, times=None, status=503
    )
    proc = cli("soup", *repos, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, "the Hub answered 503", "gave up after 5 retries")
    assert fault.hits == 6
    assert_nothing_written(tmp_path)


@pytest.fixture
def short_timeout(monkeypatch):
    # HF_HUB_DOWNLOAD_TIMEOUT, read at each request, as huggingface_hub's downloads do.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DOWNLOAD_TIMEOUT", 0.3)


@reliability(
    "Server stalls once",
    "nothing: the read times out after HF_HUB_DOWNLOAD_TIMEOUT, is retried, and the soup is exact",
)
def test_a_stalled_read_times_out_and_is_retried(
    faulty_hub, pair, tmp_path, short_timeout, fast_retries
):
    repos, dirs = pair
    fault = faulty_hub.add_fault(method="GET", path=weights_path(repos[0]), skip=1, stall_seconds=2)
    hfsoup.soup(repos, output=tmp_path / "soup", progress=False)
    assert fault.hits == 1
    assert_is_the_average(tmp_path / "soup", dirs)


@reliability(
    "Server stalls on every retry",
    "one line: '<repo>/<file>: no answer from the Hub at URL within 10s (gave up after 5 retries)' "
    "(HubConnectionError)",
)
def test_a_server_that_keeps_stalling_ends_with_one_line(
    faulty_hub, pair, tmp_path, cli, short_timeout, fast_retries
):
    repos, _ = pair
    faulty_hub.add_fault(
        method="GET", path=weights_path(repos[0]), skip=1, times=None, stall_seconds=1
    )
    proc = cli("soup", *repos, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, "no answer from the Hub", "within 0.3s", "gave up after 5 retries")
    assert_nothing_written(tmp_path)


@reliability(
    "Whole-file download fails the Hub's sha256 (weights, greedy path)",
    "one line: '<repo>/model.safetensors: the downloaded bytes do not match the Hub's sha256 "
    "...; refused and removed from the cache' (CorruptWeightsError)",
)
def test_weights_that_fail_their_sha256_are_refused(faulty_hub, pair):
    repos, _ = pair
    faulty_hub.add_fault(method="GET", path=weights_path(repos[0]), times=None, corrupt=True)
    source = resolve(parse_ingredient(repos[0])).source
    with pytest.raises(CorruptWeightsError, match=r"model\.safetensors: .* sha256 [0-9a-f]{12}"):
        source.local_file("model.safetensors")
    faulty_hub.faults.clear()
    # The bad copy did not stay in the cache: a fresh read gets the true bytes.
    path = resolve(parse_ingredient(repos[0])).source.local_file("model.safetensors")
    assert b"__metadata__" in path.read_bytes()[:4096]


@reliability(
    "Config file fails the Hub's git blob id",
    "one line: '<repo>/config.json: the downloaded bytes do not match the Hub's git-sha1 ...' "
    "(CorruptWeightsError)",
)
def test_a_config_that_fails_its_git_oid_is_refused(faulty_hub, pair, cli):
    repos, _ = pair
    path = rf"/{re.escape(repos[1])}/resolve/[^/]+/config\.json$"
    faulty_hub.add_fault(method="GET", path=path, times=None, corrupt=True)
    proc = cli("inspect", *repos)
    assert_one_line_error(proc, f"{repos[1]}/config.json", "git-sha1", "refused")


@reliability(
    "Download damaged once in transit",
    "nothing: the file is downloaded again and checked again",
)
def test_a_download_damaged_once_is_fetched_again(faulty_hub, pair):
    repos, dirs = pair
    fault = faulty_hub.add_fault(method="GET", path=weights_path(repos[1]), corrupt=True)
    path = resolve(parse_ingredient(repos[1])).source.local_file("model.safetensors")
    assert fault.hits == 1
    assert path.read_bytes() == (dirs[1] / "model.safetensors").read_bytes()


@reliability(
    "Private repo without a token",
    "one line: '<repo>: repository not found (or private: set HF_TOKEN or run `hf auth login` "
    "with an account that can read it)' (IngredientNotFoundError)",
)
def test_private_repo_without_a_token_says_how_to_log_in(hub, api, pair, repo_id, tmp_path, cli):
    repos, dirs = pair
    private = repo_id("private")
    api.create_repo(private, private=True, token="hf_owner")
    api.upload_folder(repo_id=private, folder_path=str(dirs[0]), token="hf_owner")
    proc = cli("soup", repos[0], private, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, private, "HF_TOKEN", "hf auth login")
    assert_nothing_written(tmp_path)


@reliability(
    "Gated repo without access",
    "one line: '<repo> is gated or private; set HF_TOKEN or run `hf auth login` ...' "
    "(AccessDeniedError)",
)
def test_gated_repo_says_how_to_log_in(faulty_hub, pair, tmp_path, cli):
    repos, _ = pair
    faulty_hub.add_fault(
        path=rf"/{re.escape(repos[1])}/", times=None, status=403, error_code="GatedRepo"
    )
    proc = cli("soup", *repos, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, repos[1], "gated", "hf auth login")
    assert_nothing_written(tmp_path)
