"""The output under faults: a full disk, SIGTERM mid-soup, a second writer, a push that fails
midway. Whatever happens, no half-written folder appears under the name the user asked for."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from factories import save_ingredient, tiny_bert_config
from test_errors import assert_nothing_written, assert_one_line_error

import hfsoup

reliability = pytest.mark.reliability


@pytest.fixture
def local_pair(tmp_path):
    """Two ingredients in local folders (no Hub: these tests are about the output)."""
    return [save_ingredient(tmp_path / f"ing{i}", tiny_bert_config(), seed=i + 1) for i in (0, 1)]


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _write_no_space(self, offset, data):
    """A shard's bytes meet a full disk (the constant-memory writer's one write call)."""
    if offset > 0:  # the header went through; the weights do not
        _no_space()
    type(self)._real_put(self, offset, data)


@reliability(
    "Disk full while writing",
    "one line: 'disk full while writing DIR; nothing was written' (OutputWriteError); the "
    "temporary folder is removed",
)
@pytest.mark.parametrize("where", ["shard", "rename"])
def test_disk_full_removes_the_temporary_folder(local_pair, tmp_path, cli, monkeypatch, where):
    if where == "shard":
        from hfsoup.io.shards import SafetensorsOut

        monkeypatch.setattr(SafetensorsOut, "_real_put", SafetensorsOut._put, raising=False)
        monkeypatch.setattr(SafetensorsOut, "_put", _write_no_space)
    else:  # the final rename of the hidden folder into place
        real = os.replace
        monkeypatch.setattr(
            os, "replace", lambda a, b: _no_space() if "hfsoup-partial" in str(a) else real(a, b)
        )
    proc = cli("soup", *local_pair, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, "disk full while writing", "nothing was written")
    assert_nothing_written(tmp_path)


@reliability(
    "Disk full while replacing an existing output (--overwrite)",
    "one line: 'disk full while writing DIR; ...'; the previous output is left as it was",
)
def test_disk_full_on_overwrite_keeps_the_previous_output(local_pair, tmp_path, cli, monkeypatch):
    (tmp_path / "soup").mkdir()
    (tmp_path / "soup" / "mine.txt").write_text("keep me")
    real = os.replace
    monkeypatch.setattr(
        os, "replace", lambda a, b: _no_space() if "hfsoup-partial" in str(a) else real(a, b)
    )
    proc = cli("soup", *local_pair, "--output", tmp_path / "soup", "--overwrite", "-q")
    assert_one_line_error(proc, "disk full")
    assert (tmp_path / "soup" / "mine.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".soup.hfsoup")]


@reliability(
    "Two hfsoup processes write the same output folder",
    "the second: one line 'another hfsoup process is writing DIR' (OutputExistsError); the "
    "first's work is untouched",
)
def test_a_second_writer_is_refused(local_pair, tmp_path, cli):
    partial = tmp_path / ".soup.hfsoup-partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"the first writer's bytes")
    with open(tmp_path / ".soup.hfsoup-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the first process holds
        proc = cli("soup", *local_pair, "--output", tmp_path / "soup", "-q")
        assert_one_line_error(proc, "another hfsoup process is writing")
        assert (partial / "model.safetensors").read_bytes() == b"the first writer's bytes"
        assert not (tmp_path / "soup").exists()
    (tmp_path / ".soup.hfsoup-lock").unlink()
    partial.joinpath("model.safetensors").unlink()
    assert cli("soup", *local_pair, "--output", tmp_path / "soup", "-q").returncode == 0


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hfsoup", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"hfsoup ended early: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("hfsoup never reached the stalled read")
        time.sleep(0.05)


def _terminate(proc: subprocess.Popen) -> tuple[str, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)  # not the 30 s stall: it stops at once
    assert proc.returncode == 128 + signal.SIGTERM, err
    # The last line (datasets may print its own progress before hfsoup starts).
    last = err.strip().splitlines()[-1]
    assert last.startswith("hfsoup: interrupted; no output was written"), err
    assert "Traceback" not in err
    return out, last


def _stall(hub, repo: str, *, skip: int, seconds: float = 30):
    path = rf"/{re.escape(repo)}/resolve/[^/]+/model\.safetensors$"
    return hub.add_fault(method="GET", path=path, skip=skip, stall_seconds=seconds)


@reliability(
    "SIGTERM (or Ctrl-C) mid-soup",
    "one line: 'hfsoup: interrupted; no output was written', exit 143 (130 for Ctrl-C); no "
    "output folder, no temporary folder",
)
def test_sigterm_mid_fetch_leaves_nothing(faulty_hub, publish, tmp_path):
    repos = [
        publish(save_ingredient(tmp_path / f"ing{i}", tiny_bert_config(), seed=i + 1))[0]
        for i in (0, 1)
    ]
    stall = _stall(faulty_hub, repos[1], skip=1)  # past the header probe: mid-soup
    proc = _start("soup", *repos, "--output", str(tmp_path / "soup"), "-q")
    _wait_for(lambda: stall.hits == 1 and (tmp_path / ".soup.hfsoup-partial").exists(), proc)
    _terminate(proc)
    assert_nothing_written(tmp_path)


@reliability(
    "SIGTERM mid greedy soup, then --resume",
    "one line: 'interrupted; no output was written; the greedy run's progress is kept (rerun with "
    "--resume)'; the rerun continues from the saved decisions",
)
def test_sigterm_mid_greedy_keeps_progress_and_resume_continues(
    faulty_hub, tiny_greedy, tmp_path, cli, publish
):
    # A fresh copy of the third ingredient: its files must not be in the HF cache already (other
    # tests' greedy runs on tiny_greedy download them), or the stalled download never happens.
    repos = [*tiny_greedy["repos"][:2], publish(tiny_greedy["dirs"][2], stem="cold")[0]]
    task = tmp_path / "task.yaml"
    task.write_text(json.dumps(tiny_greedy["task"]))  # JSON is YAML
    args = ("soup", *repos, "--method", "greedy", "--task", task, "--output", tmp_path / "soup")
    # Each ingredient's file is read twice: its header, then whole for scoring. Stall the third
    # ingredient's whole-file download, after two ingredients are scored and saved.
    stall = _stall(faulty_hub, repos[2], skip=1, seconds=3)

    def send_sigterm() -> None:  # to this process: the CLI's handler is the one under test
        while stall.hits == 0:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    # In this process, not a subprocess: the greedy imports (evaluate, scipy) cost seconds.
    killer = threading.Thread(target=send_sigterm, daemon=True)
    killer.start()
    proc = cli(*args, "-q")
    killer.join()
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hfsoup: interrupted; no output was written"), proc.stderr
    assert "rerun with --resume" in last
    assert not (tmp_path / "soup").exists()
    state = json.loads((tmp_path / ".soup.hfsoup-partial" / "greedy_state.json").read_text())
    assert sorted(state["individual"]) == ["0", "1"]

    faulty_hub.faults.clear()
    proc = cli(*args, "--resume")  # progress on: its log says what was resumed
    assert proc.returncode == 0, proc.stderr
    assert "resuming: 2 ingredients scored" in proc.stderr
    assert (tmp_path / "soup" / "model.safetensors").is_file()
    assert not (tmp_path / ".soup.hfsoup-partial").exists()


@reliability(
    "--resume with nothing to resume",
    "one line: 'nothing to resume: no interrupted greedy run of DIR ...' (NothingToResumeError)",
)
def test_resume_without_an_interrupted_run_is_refused(tiny_greedy, tmp_path, cli):
    task = tmp_path / "task.yaml"
    task.write_text(json.dumps(tiny_greedy["task"]))
    proc = cli("soup", *tiny_greedy["repos"][:2], "--method", "greedy", "--task", task,
               "--output", tmp_path / "soup", "--resume", "-q")  # fmt: skip
    assert_one_line_error(proc, "nothing to resume")
    proc = cli("soup", *tiny_greedy["dirs"][:2], "--output", tmp_path / "soup", "--resume", "-q")
    assert_one_line_error(proc, "only greedy or learned runs can be resumed")
    assert_nothing_written(tmp_path)


@reliability(
    "Push fails midway (LFS upload refused)",
    "one line: 'push to REPO failed (the Hub answered 400); the soup is intact in DIR; retry "
    "with: hfsoup push DIR REPO' (PushError)",
)
def test_failed_lfs_upload_keeps_the_soup_and_prints_the_retry(
    faulty_hub, local_pair, tmp_path, repo_id, cli
):
    # Weights of its own: a soup whose bytes another test pushed already is not uploaded again.
    weights = [1.0, 1.0 + random.random()]
    hfsoup.soup([str(d) for d in local_pair], output=tmp_path / "soup", weights=weights,
                progress=False)  # fmt: skip
    before = {p.name: p.read_bytes() for p in (tmp_path / "soup").iterdir()}
    target = repo_id("pushed")
    # 400 is what a storage backend answers to an upload it gave up on (S3's RequestTimeout).
    fault = faulty_hub.add_fault(
        method="PUT", path=r"\.git/info/lfs/objects/", times=None, status=400
    )
    proc = cli("push", tmp_path / "soup", target)
    assert fault.hits >= 1
    assert_one_line_error(
        proc,
        "the Hub answered 400",
        "the soup is intact",
        f"hfsoup push {tmp_path / 'soup'} {target}",
    )
    assert {p.name: p.read_bytes() for p in (tmp_path / "soup").iterdir()} == before
    faulty_hub.faults.clear()
    assert cli("push", tmp_path / "soup", target).returncode == 0  # the printed retry works
