"""The Gradio Space end to end: ``space_app/app.py`` in a subprocess against the test Hub,
driven with ``gradio_client`` and by a headless Chromium, on tiny real fine-tunes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from factories import load_state_dict
from greedy_fixtures import fine_tune, publish_dataset, sentences, tokenizer

pytest.importorskip(
    "gradio_client", reason="gradio_client not installed (pip install -e '.[test]')"
)

APP = Path(__file__).resolve().parents[1] / "space_app" / "app.py"
TOKEN = "hf_SpaceTestTokenNeverShown0123456789abcdef"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
LRS = [1e-2, 3e-3, 3e-2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_server(hub, tmp_path_factory):
    """The app, started first so that it imports while the fixtures train."""
    tmp = tmp_path_factory.mktemp("space")
    port = _free_port()
    log = tmp / "app.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HFSOUP_SPACE_WORKDIR": str(tmp / "work")}
    env.pop("SPACE_ID", None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(APP), "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    server = SimpleNamespace(
        url=f"http://127.0.0.1:{port}/", proc=proc, log=log, workdir=tmp / "work", seen=[]
    )
    yield server
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def models(hub, tmp_path_factory):
    """Three tiny fine-tunes of one init and a labelled dataset, on the test Hub."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url)
    tmp = tmp_path_factory.mktemp("space-models")
    tag = uuid.uuid4().hex[:6]
    tok = tokenizer(tmp)
    splits = {
        "train": sentences(300, 1),
        "validation": sentences(120, 2),
        "test": sentences(120, 3),
    }
    dataset = f"test-org/space-sentiment-{tag}"
    publish_dataset(api, dataset, splits, tmp)
    repos, dirs = [], []
    for i, lr in enumerate(LRS):
        folder = fine_tune(tmp / f"ft{i}", tok, splits["train"], lr=lr, seed=i, steps=60)
        repo = f"test-org/space-ft{i}-{tag}"
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=str(folder))
        repos.append(repo)
        dirs.append(folder)
    return SimpleNamespace(repos=repos, dirs=dirs, dataset=dataset, api=api)


@pytest.fixture(scope="module")
def ready(app_server, models):
    """The app's URL once it answers (it was starting while ``models`` trained)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if app_server.proc.poll() is not None:
            pytest.fail(f"the app exited:\n{app_server.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(app_server.url, timeout=5):
                return app_server
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the app did not start:\n{app_server.log.read_text()[-3000:]}")


@pytest.fixture
def client(ready):
    """A fresh browser-like session; every answer is kept to check no token leaks."""
    from gradio_client import Client

    c = Client(ready.url, verbose=False)

    def call(*args, api_name: str):
        out = c.predict(*args, api_name=api_name)
        ready.seen.append(out)
        return out

    return SimpleNamespace(call=call, raw=c)


def run_args(repos, *, method="uniform", kind="none", dataset="", limit=0):
    """The /run endpoint's inputs, in the page's order."""
    return ("\n".join(repos), method, ">=", False, "as the ingredients", "", kind, "glue/sst2",
            dataset, "", "validation", "test", "text", "label", "accuracy", limit)  # fmt: skip


def soup_folder(workdir: Path, repos: list[str], method: str) -> Path:
    """The newest soup the app wrote from ``repos`` with ``method``."""
    found = []
    for results in workdir.glob("*/soup/results.json"):
        data = json.loads(results.read_text())
        if data["method"] == method and [r["repo"] for r in data["ingredients"]] == repos:
            found.append(results.parent)
    assert found, f"no {method} soup of {repos} in {workdir}"
    return max(found, key=lambda p: p.stat().st_mtime)


def test_inspect_shows_each_sha_and_that_they_are_compatible(client, models):
    repos = [models.repos[0], f"{models.repos[1]}@main", models.repos[2]]
    status, table = client.call("\n".join(repos), api_name="/inspect")
    assert "compatible" in status and "not compatible" not in status
    # The doctor's report of `hfsoup inspect`, below the status line.
    assert "estimate for a uniform soup on this machine" in status and "tokenizer: vocab" in status
    assert [row[0] for row in table["data"]] == repos
    for row, repo in zip(table["data"], models.repos, strict=True):
        assert row[1] == models.api.model_info(repo).sha


def test_uniform_soup_with_a_task_shows_scores_comparison_and_card(client, models, ready):
    out = client.call(*run_args(models.repos, kind="custom dataset", dataset=models.dataset),
                      api_name="/run")  # fmt: skip
    status, log, scores, comparison, plot, card = out
    assert "Done" in status, status
    assert [row[0] for row in scores["data"]] == models.repos
    assert "validation (selection) accuracy" in scores["headers"]
    for method in ("best individual", "uniform soup", "ensemble (k× cost)", "greedy ensemble"):
        assert f"| {method} |" in comparison
    assert plot is None
    assert all(repo in card for repo in models.repos) and "model-soup" in card
    # The soup is the plain average of the ingredients.
    folder = soup_folder(ready.workdir, models.repos, "uniform")
    states = [load_state_dict(d) for d in models.dirs]
    soup = load_state_dict(folder)
    for name, tensor in soup.items():
        expected = torch.stack([s[name] for s in states]).float().mean(0)
        assert torch.allclose(tensor.float(), expected, atol=1e-6), name


def test_greedy_soup_is_shown_then_pushed_and_loads(client, models, ready, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = client.call(*run_args(models.repos, method="greedy", kind="custom dataset",
                                dataset=models.dataset, limit=100), api_name="/run")  # fmt: skip
    status, log, scores, comparison, plot, card = out
    assert "Done" in status and "greedy soup: kept" in status, status
    assert "scoring ingredient 3/3" in log
    assert "| greedy soup |" in comparison and "| uniform soup |" in comparison
    assert Path(plot).stat().st_size > 1000
    folder = soup_folder(ready.workdir, models.repos, "greedy")
    results = json.loads((folder / "results.json").read_text())
    assert f"(gradio_api/file={folder}/greedy_trajectory.png)" in card and "model-index" in card
    for row, ingredient in zip(scores["data"], results["ingredients"], strict=True):
        assert row[-2] == round(ingredient["scores"]["validation"]["accuracy"], 4)

    repo = f"test-org/space-pushed-{uuid.uuid4().hex[:6]}"
    pushed = client.call(repo, False, TOKEN, api_name="/push")
    assert pushed.startswith("✅") and repo in pushed, pushed
    model = AutoModelForSequenceClassification.from_pretrained(repo)
    expected = load_state_dict(folder)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_learned_is_offered_when_hfsoup_makes_learned_soups(client, models):
    methods = client.raw.view_api(print_info=False, return_format="dict")["named_endpoints"][
        "/run"
    ]["parameters"][1]["type"]["enum"]
    assert "learned" in methods, methods
    out = client.call(*run_args(models.repos, method="learned", kind="custom dataset",
                                dataset=models.dataset, limit=60), api_name="/run")  # fmt: skip
    status, log, scores, comparison, plot, card = out
    assert "Done" in status and "learned soup" in status, status
    assert "| learned soup |" in comparison


def test_a_missing_repo_is_one_readable_line(client):
    status, table = client.call("test-org/no-such-model-here", api_name="/inspect")
    assert status.startswith("❌") and "not found" in status
    assert "\n" not in status and "Traceback" not in status
    assert table["data"] == []
    status, *_ = client.call(*run_args(["test-org/no-such-model-here"]), api_name="/run")
    assert status.startswith("❌") and "\n" not in status and "Traceback" not in status


def test_a_bad_form_is_refused_before_any_job(client, models):
    status, *_ = client.call(*run_args(models.repos, method="greedy"), api_name="/run")
    assert "needs a task" in status and "\n" not in status
    status, *_ = client.call(*run_args(["/etc"]), api_name="/run")
    assert "local folders cannot be used" in status
    pushed = client.call("test-org/whatever", False, TOKEN, api_name="/push")
    assert "run one first" in pushed


def test_cancel_stops_the_worker_and_others_are_told_it_is_busy(client, ready, hub):
    from gradio_client import Client

    stalled = f"test-org/space-stalled-{uuid.uuid4().hex[:6]}"
    fault = hub.add_fault(path=f"/api/models/{stalled}", status=503, times=None)
    try:
        job = client.raw.submit(*run_args([stalled]), api_name="/run")
        other = Client(ready.url, verbose=False)
        deadline = time.monotonic() + 60
        while "Busy" not in other.predict(api_name="/busy"):
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.2)
        assert "Cancelled" in client.call(api_name="/cancel")
        status, *_ = job.result(timeout=30)
        assert "Cancelled" in status
    finally:
        hub.faults.remove(fault)
    status, _ = client.call("test-org/no-such-model-here", api_name="/inspect")
    assert "not found" in status  # a fresh worker answers the next job


def test_the_token_never_appears_in_any_output(client, models, ready):
    repo = f"test-org/space-token-{uuid.uuid4().hex[:6]}"
    client.call(*run_args(models.repos[:2]), api_name="/run")
    client.call(repo, False, TOKEN, api_name="/push")
    client.call("bad repo name", False, TOKEN, api_name="/push")
    assert TOKEN not in repr(ready.seen)
    assert TOKEN not in ready.log.read_text(errors="replace")
    for path in ready.workdir.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    snapshot = models.api.snapshot_download(repo)
    for path in Path(snapshot).rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def _chromium():
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(f"chromium not installed: {CHROMIUM} or {CHROMEDRIVER} is missing "
                    "(apt-get install -y chromium chromium-driver)")  # fmt: skip
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = Path(os.environ.get("TMPDIR", "/tmp"), f"hfsoup-chromium-{uuid.uuid4().hex}")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={profile}", "--window-size=1280,2400"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    return driver, profile


def test_a_browser_runs_a_uniform_soup(ready, models, tmp_path):
    driver, profile = _chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(ready.url)
        wait = WebDriverWait(driver, 120)
        box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#ingredients textarea")))
        box.send_keys("\n".join(models.repos))
        driver.find_element(By.ID, "run-btn").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Done"))
        driver.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Model card')]").click()
        card = wait.until(ec.visibility_of_element_located((By.ID, "card"))).text
        assert all(repo in card for repo in models.repos)
        shot = tmp_path / "space_uniform.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
