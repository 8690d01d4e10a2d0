"""Shared fixtures: a Hub-protocol server on 127.0.0.1 that the real clients talk to.

The environment is set before anything imports huggingface_hub, datasets or evaluate, because
they read ``HF_ENDPOINT`` at import time.
"""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from pathlib import Path

import pytest

_ROOT = Path(tempfile.mkdtemp(prefix="hfsoup-tests-"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PORT = _free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{_PORT}"
os.environ["HF_HOME"] = str(_ROOT / "hf_home")
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HF_HUB_OFFLINE", None)

from faults import FaultyHub  # noqa: E402  (stdlib only; after the environment)


def pytest_configure(config):
    # Tiny models run far faster on one thread than fighting over 2 busy cores.
    import torch

    torch.set_num_threads(1)


# The tokens that read private repos on the session Hub: those the tests send for them.
HUB_TOKENS = ("hf_test", "hf_owner", "hf_SECRET_canary_123")


@pytest.fixture(scope="session")
def hub() -> FaultyHub:
    """The test Hub, shared by the whole session; repos are kept apart by unique names.

    The product's local Hub with fault injection (tests/faults.py): ``hub.add_fault(...)``.

    Writes need no token here (``anonymous_writes``, a test-only switch: most tests upload with a
    plain ``HfApi``), but private repos are still read only with one of :data:`HUB_TOKENS`. The
    token rules themselves are tested on hubs that enforce them (test_hubserver_auth.py).
    """
    server = FaultyHub(_ROOT / "hub", port=_PORT, tokens=HUB_TOKENS, anonymous_writes=True).start()
    yield server
    server.stop()


@pytest.fixture
def repo_id() -> callable:
    """Factory of fresh repo IDs: ``repo_id("bert")`` -> ``"test-org/bert-1a2b3c4d"``."""

    def make(stem: str = "model") -> str:
        return f"test-org/{stem}-{uuid.uuid4().hex[:8]}"

    return make


@pytest.fixture
def api(hub):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url)


@pytest.fixture
def publish(api, repo_id):
    """Upload a local model folder to a fresh repo; returns ``(repo_id, commit_sha)``."""

    def upload(folder, stem: str = "ft", repo: str | None = None, message: str = "upload"):
        repo = repo or repo_id(stem)
        api.create_repo(repo, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message=message)
        return repo, info.oid

    return upload


@pytest.fixture
def bert_soup_ingredients(tmp_path, publish):
    """Three tiny BERT fine-tunes of one init on the Hub; the second sharded differently."""
    from factories import save_ingredient, tiny_bert_config

    config = tiny_bert_config()
    repos, dirs = [], []
    for i in range(3):
        folder = save_ingredient(
            tmp_path / f"ing{i}", config, seed=i + 1, max_shard_size="8KB" if i == 1 else "5GB"
        )
        repos.append(publish(folder)[0])
        dirs.append(folder)
    return repos, dirs


def run_cli(*args: str, cwd=None, env: dict[str, str] | None = None):
    """Run the real console entry point in a subprocess; returns the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "hfsoup", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def faulty_hub(hub):
    """The test Hub, with every fault rule a test adds removed when the test ends."""
    yield hub
    hub.faults.clear()


@pytest.fixture
def cli(capfd):
    """Run the ``hfsoup`` command in this process (no interpreter start-up): returns an object
    with ``returncode``, ``stdout`` and ``stderr`` of that call alone, like ``run_cli``."""
    from types import SimpleNamespace

    from hfsoup.cli import main

    def call(*args: str):
        capfd.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's own refusals: one line, then exit 2
            code = exc.code
        out, err = capfd.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return call


@pytest.fixture(scope="session")
def tiny_greedy(tmp_path_factory, hub):
    """Three tiny BERT ingredients with a tokenizer, and a 24-row labelled dataset, on the Hub.

    Untrained perturbations of one init: enough for a greedy run in seconds, where what is
    tested is plumbing (faults, resume, secrets), not which ingredient wins.
    """
    from factories import save_ingredient, tiny_bert_config
    from greedy_fixtures import publish_dataset, sentences, tokenizer
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url)
    tmp = tmp_path_factory.mktemp("tiny-greedy")
    tag = uuid.uuid4().hex[:8]
    dataset = f"test-org/tiny-sentiment-{tag}"
    publish_dataset(api, dataset, {"validation": sentences(24, 1), "test": sentences(24, 2)}, tmp)
    tok = tokenizer(tmp)
    repos, dirs = [], []
    for i in range(3):
        folder = save_ingredient(tmp / f"ing{i}", tiny_bert_config(), seed=i + 1)
        tok.save_pretrained(folder)
        repo = f"test-org/tiny-greedy-{i}-{tag}"
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=str(folder))
        repos.append(repo)
        dirs.append(folder)
    task = {"dataset": dataset, "selection_split": "validation", "report_splits": ["test"],
            "input_columns": ["text"], "label_column": "label", "metrics": ["accuracy"]}  # fmt: skip
    return {"repos": repos, "dirs": dirs, "task": task, "dataset": dataset, "tok": tok}


# Learning rates of the sentiment fine-tunes: different enough that greedy rejects some.
LRS = [3e-3, 1e-2, 1e-3, 3e-2, 5e-3]


@pytest.fixture(scope="session")
def sentiment(tmp_path_factory, hub):
    """Five real tiny fine-tunes on the Hub and a dataset repo with train/validation/test."""
    from greedy_fixtures import publish_sentiment
    from huggingface_hub import HfApi

    return publish_sentiment(
        HfApi(endpoint=hub.url), tmp_path_factory.mktemp("sentiment"), [{"lr": lr} for lr in LRS],
        dataset="test-org/keyword-sentiment", prefix="test-org/sentiment-ft", seeds=(1, 2, 3),
        sizes=(300, 200, 200), batch_size=32,
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _outputs_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own, empty outputs cache across runs (hfsoup.tasks.output_cache), so
    that no test reads the ingredient outputs another scored; tests of the cache itself run
    several runs inside one test."""
    monkeypatch.setenv("HFSOUP_OUTPUTS_CACHE", str(tmp_path_factory.mktemp("outputs-cache")))
