"""The HF cache is used, and HF_HUB_OFFLINE=1 is honoured by every command (issue 15).

Each test has its own HF cache folder (``HF_HUB_CACHE``), warmed with ``snapshot_download`` or
by an earlier hfsoup run, so that no test sees another's files. Offline is set both ways: the
environment variable and ``huggingface_hub.constants.HF_HUB_OFFLINE`` (read at import), or in a
subprocess's environment.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli
from factories import load_state_dict, save_ingredient, tiny_bert_config
from test_errors import assert_nothing_written, assert_one_line_error
from test_soup import max_diff, plain_average
from test_sweep_demo import sweep_setup  # noqa: F401 (a fixture, used by name)

reliability = pytest.mark.reliability


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A fresh, empty HF cache folder for this test (in this process and its subprocesses)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def go_offline(monkeypatch):
    """Set HF_HUB_OFFLINE=1 from now on: in the environment and in huggingface_hub's constant."""
    from huggingface_hub import constants

    def switch() -> None:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    return switch


def requests_seen(hub):
    """A rule that only records every request the test Hub gets."""
    return hub.add_fault(path=".*", times=None)


def weight_requests(hub):
    """A rule that only records requests for weight files (their Range headers)."""
    return hub.add_fault(path=r"/resolve/[^/]+/.*\.safetensors$", times=None)


def download(repo: str, **kwargs) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo, **kwargs)


def two_ingredients(tmp_path, publish, *, shard: str = "5GB"):
    dirs = [
        save_ingredient(tmp_path / f"ing{i}", tiny_bert_config(), seed=i + 1, max_shard_size=shard)
        for i in range(2)
    ]
    return [publish(d)[0] for d in dirs], dirs


def test_cached_weights_are_read_from_disk_not_the_hub(
    tmp_path, publish, own_cache, faulty_hub, cli
):
    repos, dirs = two_ingredients(tmp_path, publish)
    for repo in repos:
        download(repo)
    seen = weight_requests(faulty_hub)
    proc = cli("soup", *repos, "--output", tmp_path / "soup", "-q")
    assert proc.returncode == 0, proc.stderr
    assert seen.hits == 0, seen.ranges  # no byte of any weight file came over HTTP
    assert max_diff(load_state_dict(tmp_path / "soup"), plain_average(dirs)) <= 1e-6


def test_offline_soup_after_snapshot_download(
    tmp_path, publish, own_cache, go_offline, faulty_hub, cli
):
    repos, dirs = two_ingredients(tmp_path, publish, shard="8KB")
    for repo in repos:
        download(repo)
    go_offline()
    seen = requests_seen(faulty_hub)
    proc = cli("soup", *repos, "--output", tmp_path / "soup", "-q")
    assert proc.returncode == 0, proc.stderr
    assert seen.hits == 0
    assert max_diff(load_state_dict(tmp_path / "soup"), plain_average(dirs)) <= 1e-6
    results = json.loads((tmp_path / "soup" / "results.json").read_text())
    assert [r["sha"] for r in results["ingredients"]] == [
        (own_cache / f"models--{r.replace('/', '--')}" / "refs" / "main").read_text() for r in repos
    ]


def test_offline_branch_resolves_to_the_cached_commit(
    tmp_path, publish, own_cache, go_offline, faulty_hub, cli
):
    folder = save_ingredient(tmp_path / "v1", tiny_bert_config(), seed=1)
    repo, first = publish(folder)
    download(repo)
    # main moves on the Hub after the download: offline, the cached commit is the one used.
    save_ingredient(tmp_path / "v1", tiny_bert_config(), seed=5)
    _, second = publish(folder, repo=repo, message="v2")
    assert second != first
    go_offline()
    proc = cli("inspect", repo, "--json")
    assert proc.returncode == 0, proc.stderr
    shown = json.dumps(json.loads(proc.stdout))
    assert first in shown and second not in shown
    proc = cli("inspect", f"{repo}@{first}", "--json")  # a SHA is itself
    assert proc.returncode == 0, proc.stderr


@reliability(
    "HF_HUB_OFFLINE=1 and a weight shard of an ingredient is not in the HF cache",
    "one line naming the file: 'org/b/model-00004-of-00004.safetensors: not in the HF cache for commit ... and HF_HUB_OFFLINE=1 forbids downloading it; fetch it first with `hf download ...`' (IngredientNotFoundError); no request, no retry; nothing written",
)
def test_offline_file_not_cached_is_one_line_and_fast(
    tmp_path, publish, own_cache, go_offline, faulty_hub, cli
):
    repos, _ = two_ingredients(tmp_path, publish, shard="8KB")
    download(repos[0])
    files = sorted(p.name for p in tmp_path.joinpath("ing1").glob("model-*.safetensors"))
    missing = files[-1]
    download(repos[1], ignore_patterns=[missing])
    go_offline()
    seen = requests_seen(faulty_hub)
    t0 = time.monotonic()
    proc = cli("soup", *repos, "--output", tmp_path / "soup", "-q")
    seconds = time.monotonic() - t0
    assert_one_line_error(proc, f"{repos[1]}/{missing}: not in the HF cache", "HF_HUB_OFFLINE=1")
    assert "retr" not in proc.stderr and "cannot reach" not in proc.stderr
    assert_nothing_written(tmp_path)
    assert seen.hits == 0
    assert seconds < 10, seconds  # no retries, no back-off
    # inspect probes every file's header: the same line for the shard that is not cached.
    proc = cli("inspect", repos[1])
    assert_one_line_error(proc, f"{repos[1]}/{missing}: not in the HF cache", "HF_HUB_OFFLINE=1")
    assert seen.hits == 0


@reliability(
    "HF_HUB_OFFLINE=1 and an ingredient (or its branch) is not in the HF cache",
    "one line: 'org/b: not in the HF cache (...); HF_HUB_OFFLINE=1 forbids downloading it; fetch it first with `hf download org/b`' or 'the HF cache has no commit for revision ...' (IngredientNotFoundError); nothing written",
)
def test_offline_repo_not_cached_is_one_line(tmp_path, publish, own_cache, go_offline, cli):
    repos, _ = two_ingredients(tmp_path, publish)
    download(repos[0])
    go_offline()
    proc = cli("soup", *repos, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, f"{repos[1]}: not in the HF cache", f"hf download {repos[1]}")
    assert_nothing_written(tmp_path)
    proc = cli("inspect", f"{repos[0]}@no-such-branch")
    assert_one_line_error(proc, "no commit for revision 'no-such-branch'")


@reliability(
    "HF_HUB_OFFLINE=1 with --push-to, or hfsoup push",
    "one line before anything is read: 'cannot push to org/soup: HF_HUB_OFFLINE=1 is set; push it later ...' (PushError); the soup folder intact",
)
def test_offline_push_is_refused_before_anything_is_read(
    tmp_path, publish, own_cache, go_offline, faulty_hub, cli, repo_id
):
    repos, _ = two_ingredients(tmp_path, publish)
    for repo in repos:
        download(repo)
    go_offline()
    seen = requests_seen(faulty_hub)
    target = repo_id("soup")
    proc = cli("soup", *repos, "--output", tmp_path / "soup", "--push-to", target, "-q")
    assert_one_line_error(proc, f"cannot push to {target}: HF_HUB_OFFLINE=1 is set")
    assert_nothing_written(tmp_path)
    assert seen.hits == 0
    # Offline, a soup is made from the cache; its push is refused, with the folder intact.
    assert cli("soup", *repos, "--output", tmp_path / "soup", "-q").returncode == 0
    proc = cli("push", tmp_path / "soup", target)
    assert_one_line_error(proc, f"cannot push to {target}: HF_HUB_OFFLINE=1 is set", "intact")
    assert seen.hits == 0
    assert (tmp_path / "soup" / "model.safetensors").is_file()


def test_offline_greedy_and_evaluate_after_an_earlier_run(tiny_greedy, tmp_path, faulty_hub):
    """An online greedy run warms the cache (weights, tokenizer, data set); offline, the same
    greedy soup and an evaluate run read everything from it and make no request."""
    home = tmp_path / "hf_home"
    env = {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub")}
    task = tmp_path / "task.yaml"
    task.write_text(json.dumps(tiny_greedy["task"]))  # JSON is YAML
    repos = tiny_greedy["repos"]
    greedy = ("soup", *repos, "--method", "greedy", "--task", str(task), "-q", "--output")
    online = run_cli(*greedy, str(tmp_path / "online"), env=env)
    assert online.returncode == 0, online.stderr
    seen = requests_seen(faulty_hub)
    metric = faulty_hub.add_fault(path="evaluate-metric", times=None)
    faulty_hub.faults.reverse()  # first match wins: this one records the metric requests
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    proc = run_cli(*greedy, str(tmp_path / "offline"), env=offline)
    assert proc.returncode == 0, proc.stderr
    results = [
        json.loads((tmp_path / d / "results.json").read_text()) for d in ("online", "offline")
    ]
    # The same SHAs, weights and scores: the same soup, read from the cache.
    assert results[1]["ingredients"] == results[0]["ingredients"]
    proc = run_cli("evaluate", *repos, "--task", str(task), "--json", env=offline)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [r["sha"] for r in report["ingredients"]] == [
        r["sha"] for r in results[0]["ingredients"]
    ]
    assert (seen.hits, metric.hits) == (0, 0), faulty_hub.unhandled


def snapshot_files(cache, repo: str) -> list[str]:
    folder = cache / f"models--{repo.replace('/', '--')}" / "snapshots"
    return sorted(p.name for p in folder.glob("*/*"))


def test_cache_flag_writes_streamed_weights_through_for_a_later_offline_run(
    tmp_path, publish, own_cache, go_offline, faulty_hub, cli
):
    repos, dirs = two_ingredients(tmp_path, publish, shard="8KB")
    proc = cli("soup", *repos, "--output", tmp_path / "default", "-q")
    assert proc.returncode == 0, proc.stderr
    # By default a uniform soup streams its weights and leaves no copy of them in the cache.
    assert not [
        f for r in repos for f in snapshot_files(own_cache, r) if f.endswith(".safetensors")
    ]
    proc = cli("soup", *repos, "--output", tmp_path / "cached", "--cache", "-q")
    assert proc.returncode == 0, proc.stderr
    for repo, folder in zip(repos, dirs, strict=True):
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        assert set(shards) <= set(snapshot_files(own_cache, repo))
        blobs = own_cache / f"models--{repo.replace('/', '--')}" / "blobs"
        assert not list(blobs.glob(".*.hfsoup"))  # no temporary file left behind
    go_offline()
    seen = requests_seen(faulty_hub)
    proc = cli("soup", *repos, "--output", tmp_path / "offline", "-q")
    assert proc.returncode == 0, proc.stderr
    assert seen.hits == 0
    a, b = (load_state_dict(tmp_path / d) for d in ("default", "offline"))
    assert max_diff(a, b) == 0


def test_no_cache_greedy_writes_no_weights_into_the_cache(tiny_greedy, tmp_path, own_cache, cli):
    task = tmp_path / "task.yaml"
    task.write_text(json.dumps(tiny_greedy["task"]))
    repos = tiny_greedy["repos"]
    proc = cli("soup", *repos, "--method", "greedy", "--task", task, "--no-cache", "-q",
               "--output", tmp_path / "soup")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not list(own_cache.rglob("*.safetensors"))
    assert (tmp_path / "soup" / "model.safetensors").is_file()


@reliability(
    "A weight file in the HF cache damaged on disk (huggingface_hub checks sizes only)",
    "one line: 'org/b: model.safetensors: the bytes in the HF cache (...) do not match its sha256 ...; refused (damaged on disk: fetch it again with `hf download ... --force-download`)' (CorruptWeightsError); nothing written",
)
def test_a_damaged_cached_file_is_refused_in_one_line(tmp_path, publish, own_cache, cli):
    """huggingface_hub checks only a download's size: hfsoup hashes what it reads from the
    cache against the Hub's digest, so a blob damaged on disk is never averaged in."""
    repos, _ = two_ingredients(tmp_path, publish)
    for repo in repos:
        download(repo)
    blob = (own_cache / f"models--{repos[1].replace('/', '--')}" / "snapshots").glob(
        "*/model.safetensors"
    )
    blob = next(blob).resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # a weight byte: the header still parses, the digest fails
    blob.write_bytes(bytes(data))
    proc = cli("soup", *repos, "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, f"{repos[1]}: model.safetensors: the bytes in the HF cache")
    assert "damaged on disk" in proc.stderr
    assert_nothing_written(tmp_path)


@reliability(
    "HF_HUB_OFFLINE=1 and the task's data set is not in the datasets cache",
    "one line: \"dataset 'org/data' is not in the datasets cache, and HF_HUB_OFFLINE=1 forbids downloading it; ...\" (HubConnectionError)",
)
def test_offline_evaluate_with_a_data_set_not_cached_is_one_line(tiny_greedy, tmp_path):
    home = tmp_path / "hf_home"
    env = {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub")}
    repos = tiny_greedy["repos"]
    fetch = "import sys\nfrom huggingface_hub import snapshot_download\n"
    fetch += "for r in sys.argv[1:]: snapshot_download(r)"
    subprocess.run([sys.executable, "-c", fetch, *repos], env={**os.environ, **env}, check=True)
    task = tmp_path / "task.yaml"
    task.write_text(json.dumps(tiny_greedy["task"]))
    proc = run_cli("evaluate", *repos, "--task", str(task), env={**env, "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(
        proc, f"dataset {tiny_greedy['dataset']!r} is not in the datasets cache", "HF_HUB_OFFLINE=1"
    )


def test_inspect_reads_the_headers_of_cached_files_not_the_hub(
    tmp_path, publish, own_cache, go_offline, faulty_hub, cli
):
    """``inspect`` probes each weight file's header: for a cached file it reads the cached copy,
    online (no weight request) and offline (no request at all)."""
    repos, _ = two_ingredients(tmp_path, publish, shard="8KB")
    download(repos[0])
    seen = weight_requests(faulty_hub)
    proc = cli("inspect", repos[0], "--json")
    assert proc.returncode == 0, proc.stderr
    assert seen.hits == 0, seen.ranges
    online = json.loads(proc.stdout)
    online.pop("estimate")  # it names the RAM available now
    # The uncached ingredient's headers do come over HTTP: the rule sees weight requests.
    assert cli("inspect", repos[1], "--json").returncode == 0
    assert seen.hits > 0
    go_offline()
    everything = requests_seen(faulty_hub)
    faulty_hub.faults.reverse()  # first match wins: this rule sees every request from now on
    proc = cli("inspect", repos[0], "--json")
    assert proc.returncode == 0, proc.stderr
    assert everything.hits == 0
    shown = json.loads(proc.stdout)
    shown.pop("estimate")
    assert shown == online


@pytest.mark.parametrize("method", ["greedy", "learned"])
def test_greedy_and_learned_read_cached_weights_from_disk(
    method, tiny_greedy, tmp_path, own_cache, faulty_hub, cli
):
    """Greedy and learned soups read whole weight files: cached ones come from disk."""
    task = tmp_path / "task.yaml"
    task.write_text(json.dumps(tiny_greedy["task"]))
    repos = tiny_greedy["repos"]
    for repo in repos:
        download(repo)
    seen = weight_requests(faulty_hub)
    extra = ("--learned-epochs", "1") if method == "learned" else ()
    proc = cli("soup", *repos, "--method", method, "--task", task, *extra, "-q",
               "--output", tmp_path / "soup")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert seen.hits == 0, seen.ranges
    assert (tmp_path / "soup" / "model.safetensors").is_file()


def test_offline_learned_after_an_earlier_run(tiny_greedy, tmp_path, faulty_hub):
    """An online learned run warms the cache; offline, the same learned soup (a subprocess with
    HF_HUB_OFFLINE=1) makes no request and gives the same weights and alphas."""
    home = tmp_path / "hf_home"
    env = {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub")}
    task = tmp_path / "task.yaml"
    task.write_text(json.dumps(tiny_greedy["task"]))
    learned = ("soup", *tiny_greedy["repos"], "--method", "learned", "--task", str(task),
               "--learned-epochs", "1", "-q", "--output")  # fmt: skip
    online = run_cli(*learned, str(tmp_path / "online"), env=env)
    assert online.returncode == 0, online.stderr
    seen = requests_seen(faulty_hub)
    proc = run_cli(*learned, str(tmp_path / "offline"), env={**env, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert seen.hits == 0, faulty_hub.unhandled
    results = [
        json.loads((tmp_path / d / "results.json").read_text()) for d in ("online", "offline")
    ]
    assert results[1]["ingredients"] == results[0]["ingredients"]
    assert results[1]["learned"]["alpha"] == results[0]["learned"]["alpha"]
    a, b = (load_state_dict(tmp_path / d) for d in ("online", "offline"))
    assert max_diff(a, b) == 0


def test_offline_run_of_a_recipe_and_of_a_soups_card(tmp_path, publish, own_cache, faulty_hub):
    """``hfsoup run`` offline (a subprocess with HF_HUB_OFFLINE=1): a recipe naming branches
    resolves them from the cache's refs, a card's pinned SHAs are themselves."""
    repos, dirs = two_ingredients(tmp_path, publish, shard="8KB")
    for repo in repos:
        download(repo)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "r", "ingredients": repos,
                                  "output": {"dir": str(tmp_path / "a")}}))  # fmt: skip
    offline = {"HF_HUB_CACHE": str(own_cache), "HF_HUB_OFFLINE": "1"}
    seen = requests_seen(faulty_hub)
    proc = run_cli("run", str(recipe), "-q", env=offline)
    assert proc.returncode == 0, proc.stderr
    assert max_diff(load_state_dict(tmp_path / "a"), plain_average(dirs)) <= 1e-6
    card = tmp_path / "a" / "README.md"
    proc = run_cli("run", str(card), "--output", str(tmp_path / "b"), "-q", env=offline)
    assert proc.returncode == 0, proc.stderr
    assert seen.hits == 0
    a, b = (tmp_path / d / "model.safetensors" for d in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()


def test_offline_sweep_with_a_push_prefix_is_refused_before_training(tmp_path, faulty_hub):
    task = tmp_path / "task.yaml"
    task.write_text(json.dumps({"dataset": "test-org/none", "selection_split": "validation",
                                "input_columns": ["text"], "metrics": ["accuracy"]}))  # fmt: skip
    seen = requests_seen(faulty_hub)
    t0 = time.monotonic()
    proc = run_cli("sweep", "test-org/not-cached", "--task", str(task), "--n", "2",
                   "--push-prefix", "test-org/sw", "--output-dir", str(tmp_path / "sweep"),
                   env={"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert_one_line_error(proc, "cannot push to test-org/sw-1: HF_HUB_OFFLINE=1 is set")
    assert seen.hits == 0
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("command", ["soup-greedy", "evaluate", "inspect"])
def test_offline_whole_file_not_cached_is_one_line_and_fast(
    command, tiny_greedy, tmp_path, own_cache, go_offline, faulty_hub, cli
):
    """Greedy and evaluate read whole weight files, inspect their headers: offline, an
    ingredient whose weights are not cached is one line naming it, no request, no retry."""
    task = tmp_path / "task.yaml"
    task.write_text(json.dumps(tiny_greedy["task"]))
    repos = tiny_greedy["repos"][:2]
    download(repos[0])
    download(repos[1], ignore_patterns=["*.safetensors"])
    go_offline()
    seen = requests_seen(faulty_hub)
    args = {
        "soup-greedy": ("soup", *repos, "--method", "greedy", "--task", task,
                        "--output", tmp_path / "soup"),
        "evaluate": ("evaluate", *repos, "--task", task),
        "inspect": ("inspect", repos[1]),
    }[command]  # fmt: skip
    t0 = time.monotonic()
    proc = cli(*args, "-q")
    seconds = time.monotonic() - t0
    assert_one_line_error(proc, f"{repos[1]}: the HF cache holds no weights", "HF_HUB_OFFLINE=1")
    assert "retr" not in proc.stderr and "cannot reach" not in proc.stderr
    assert seen.hits == 0
    assert seconds < 10, seconds
    assert not (tmp_path / "soup").exists()


def test_hub_serve_does_not_care_about_hf_hub_offline(tmp_path):
    """``hfsoup hub serve`` is a server: HF_HUB_OFFLINE=1 in its environment changes nothing."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "hfsoup", "hub", "serve", "--data", str(tmp_path / "hub"),
         "--port", str(port), "--token", "hf_local_team"], env=env,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        code = ("import sys; from huggingface_hub import HfApi; api = HfApi(endpoint=sys.argv[1],"
                " token='hf_local_team'); api.create_repo('team/x'); print(api.model_info('team/x').sha)")  # fmt: skip
        for _ in range(100):
            proc = subprocess.run([sys.executable, "-c", code, url], capture_output=True,
                                  text=True, timeout=60)  # fmt: skip
            if proc.returncode == 0:
                break
            time.sleep(0.2)
        assert proc.returncode == 0, proc.stderr
        assert len(proc.stdout.strip()) == 40
        assert server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_offline_sweep_trains_from_the_cache(sweep_setup, tmp_path, faulty_hub):  # noqa: F811
    """A sweep run once online (no push) caches its base model and data set; offline, the same
    sweep (a subprocess with HF_HUB_OFFLINE=1) trains from the cache and makes no request."""
    home = tmp_path / "hf_home"
    env = {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub")}
    sweep = ("sweep", "test-org/tiny-pretrained", "--task", str(sweep_setup["task"]), "--n", "1",
             "--train-limit", "32", "--output-dir")  # fmt: skip
    online = run_cli(*sweep, str(tmp_path / "online"), env=env)
    assert online.returncode == 0, online.stderr
    seen = requests_seen(faulty_hub)
    proc = run_cli(*sweep, str(tmp_path / "offline"), env={**env, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert seen.hits == 0, faulty_hub.unhandled
    made = [Path(p) for p in proc.stdout.split()]
    assert len(made) == 1 and (made[0] / "config.json").is_file(), proc.stdout


def test_offline_by_the_constant_alone(tmp_path, publish, own_cache, monkeypatch, faulty_hub, cli):
    """``huggingface_hub.constants.HF_HUB_OFFLINE`` set in Python (no environment variable) is
    honoured as the variable is: the soup comes from the cache, with no request."""
    from huggingface_hub import constants

    repos, dirs = two_ingredients(tmp_path, publish)
    for repo in repos:
        download(repo)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen = requests_seen(faulty_hub)
    proc = cli("soup", *repos, "--output", tmp_path / "soup", "-q")
    assert proc.returncode == 0, proc.stderr
    assert seen.hits == 0
    assert max_diff(load_state_dict(tmp_path / "soup"), plain_average(dirs)) <= 1e-6
