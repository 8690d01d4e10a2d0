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

from hfsoup.hubserver import LocalHub  # noqa: E402  (stdlib only; after the environment)


def pytest_configure(config):
    # Tiny models run far faster on one thread than fighting over 2 busy cores.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def hub() -> LocalHub:
    """The test Hub, shared by the whole session; repos are kept apart by unique names."""
    server = LocalHub(_ROOT / "hub", port=_PORT).start()
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
