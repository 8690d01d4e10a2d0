"""Dependencies and honest cards: true metric notices, the Hub's RateLimit header, the output
lock without fcntl, repo IDs checked like the Hub checks them, and cards whose base_model and
model-index say what the soup is made of and was scored on."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from factories import save_ingredient, tiny_bert_config
from faults import FaultyHub
from filelock import FileLock
from test_errors import assert_nothing_written, assert_one_line_error

import hfsoup
from hfsoup.errors import IngredientSpecError, OutputExistsError
from hfsoup.io.hub import _retry_after, parse_ingredient, resolve
from hfsoup.io.writer import staged_output
from hfsoup.serve.hubserver import LocalHub

reliability = pytest.mark.reliability
WORKTREE = Path(__file__).resolve().parent.parent


def front_matter(readme: Path) -> dict:
    return yaml.safe_load(readme.read_text(encoding="utf-8").split("---")[1])


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child Python that imports this checkout's hfsoup."""
    path = os.pathsep.join([str(WORKTREE), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- 1. the metric notice says why the Hub's script was not used -----------------------------

# The Hub's evaluate-metric/f1 imports scikit-learn, as the real one does.
HUB_F1 = textwrap.dedent("""
    import datasets
    import evaluate
    from sklearn.metrics import f1_score


    class F1(evaluate.Metric):
        def _info(self):
            return evaluate.MetricInfo(
                description="the Hub's f1 script",
                citation="",
                features=datasets.Features(
                    {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
                ),
            )

        def _compute(self, predictions, references):
            return {"f1": float(f1_score(references, predictions))}
""")

# A child process in which the named packages are not installed: ``sys.modules[name] = None``
# is the import system's own "no such module" (``import`` raises ModuleNotFoundError and
# ``importlib.util.find_spec`` answers None), whatever site-packages holds.
CHILD = textwrap.dedent("""
    import json, logging, sys
    for name in filter(None, sys.argv[1].split(",")):
        sys.modules[name] = None
    logging.basicConfig(format="NOTICE %(message)s", level=logging.WARNING)
    from hfsoup.tasks.metrics import compute, load_metric
    metric = load_metric("f1")
    result = compute(metric, [0, 1, 1, 0, 1, 1], [0, 1, 0, 0, 1, 0])
    print(json.dumps({"description": metric.description, "f1": result["f1"]}))
""")


@pytest.fixture(scope="module")
def metric_hub(tmp_path_factory):
    """A Hub of its own whose evaluate-metric/f1 Space holds :data:`HUB_F1` (the session's Hub
    serves no canonical metrics, and other tests rely on that)."""
    from huggingface_hub import HfApi

    with FaultyHub(tmp_path_factory.mktemp("metric-hub"), anonymous_writes=True) as server:
        api = HfApi(endpoint=server.url)
        api.create_repo("evaluate-metric/f1", repo_type="space", space_sdk="static")
        api.upload_file(path_or_fileobj=HUB_F1.encode(), path_in_repo="f1.py",
                        repo_id="evaluate-metric/f1", repo_type="space")  # fmt: skip
        yield server


def load_f1_in_child(tmp_path: Path, endpoint: str, *, missing: str = ""):
    """Load metric f1 in a fresh interpreter (empty module cache) with ``missing`` packages
    not installed; returns (its JSON answer, its notice lines)."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, missing], capture_output=True, text=True, timeout=300,
        env=child_env(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "home"),
                      HF_MODULES_CACHE=str(tmp_path / "modules")),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    notices = [line for line in proc.stderr.splitlines() if line.startswith("NOTICE ")]
    return json.loads(proc.stdout.strip().splitlines()[-1]), notices


def test_the_hubs_metric_script_is_used_when_its_packages_are_installed(metric_hub, tmp_path):
    # The control: this Hub's script is what evaluate loads, so the next test goes through it.
    answer, notices = load_f1_in_child(tmp_path, metric_hub.url)
    assert answer["description"] == "the Hub's f1 script"
    assert notices == []


@reliability(
    "Metric whose Hub script imports a package that is not installed (scikit-learn, scipy)",
    "one notice: 'metric 'f1': the Hub's script needs scikit-learn, which is not installed; using "
    "hfsoup's bundled copy'; the scores are the bundled copy's",
)
def test_a_missing_package_is_named_in_the_notice(metric_hub, tmp_path):
    from sklearn.metrics import f1_score

    script = metric_hub.add_fault(method="GET", path=r"/spaces/evaluate-metric/f1/resolve/.*/f1\.py$",
                                  times=None)  # fmt: skip
    answer, notices = load_f1_in_child(tmp_path, metric_hub.url, missing="sklearn,scipy")
    assert script.hits >= 1  # the Hub's script was fetched, and refused for its import
    assert notices == [
        "NOTICE metric 'f1': the Hub's script needs scikit-learn, which is not installed; "
        "using hfsoup's bundled copy"
    ]
    assert answer["description"] != "the Hub's f1 script"
    assert answer["f1"] == pytest.approx(f1_score([0, 1, 0, 0, 1, 0], [0, 1, 1, 0, 1, 1]))


def test_an_unreachable_hub_is_named_as_such_in_the_notice(tmp_path):
    answer, notices = load_f1_in_child(
        tmp_path, f"http://127.0.0.1:{free_port()}", missing="sklearn,scipy"
    )
    assert notices == [
        "NOTICE metric 'f1': not reachable on the Hub (ConnectionError); using hfsoup's bundled copy"
    ]
    assert answer["description"] != "the Hub's f1 script"


def test_a_broken_hub_script_is_named_in_the_notice(tmp_path):
    from huggingface_hub import HfApi

    with LocalHub(tmp_path / "hub", anonymous_writes=True) as server:
        api = HfApi(endpoint=server.url)
        api.create_repo("evaluate-metric/f1", repo_type="space", space_sdk="static")
        broken = HUB_F1.replace("class F1", "raise RuntimeError('script bug')\n\n\nclass F1")
        api.upload_file(path_or_fileobj=broken.encode(), path_in_repo="f1.py",
                        repo_id="evaluate-metric/f1", repo_type="space")  # fmt: skip
        _, notices = load_f1_in_child(tmp_path, server.url)
    assert notices == [
        "NOTICE metric 'f1': the Hub's copy could not be loaded (RuntimeError: script bug); "
        "using hfsoup's bundled copy"
    ]


# --- 2. the dependency floor is what the code imports ----------------------------------------


def test_the_declared_huggingface_hub_floor_provides_httpx2():
    import tomllib

    deps = tomllib.loads((WORKTREE / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "huggingface_hub>=2.0,<3" in deps  # 2.0: the first release on httpx2
    assert any(d.startswith("filelock>=") for d in deps)


# --- 3. the Hub's RateLimit header -----------------------------------------------------------


def test_ratelimit_with_requests_left_asks_for_no_wait():
    assert _retry_after({"RateLimit": '"api";r=0;t=55'}) == 55.0
    assert _retry_after({"RateLimit": '"api";r=3;t=55'}) is None
    assert _retry_after({"Retry-After": "2", "RateLimit": '"api";r=0;t=55'}) == 2.0


@pytest.fixture
def published(tmp_path, publish):
    folder = save_ingredient(tmp_path / "ing", tiny_bert_config(), seed=1)
    return publish(folder)


@reliability(
    "429 with the Hub's RateLimit header ('\"api\";r=0;t=N') and no Retry-After",
    "nothing: hfsoup waits the N seconds until the window resets (within HFSOUP_MAX_RETRY_WAIT) "
    "and retries",
)
def test_a_ratelimit_reset_is_waited_out(faulty_hub, published):
    repo, sha = published
    info = faulty_hub.add_fault(method="GET", path=f"/api/models/{repo}", status=429,
                                headers={"RateLimit": '"api";r=0;t=2'})  # fmt: skip
    data = faulty_hub.add_fault(method="GET", path=f"/{repo}/resolve/.*/model.safetensors$",
                                status=429, headers={"RateLimit": '"api";r=0;t=1'})  # fmt: skip
    t0 = time.perf_counter()
    ingredient = resolve(parse_ingredient(repo))
    assert ingredient.sha == sha
    assert len(ingredient.source.read_range("model.safetensors", 0, 8)) == 8
    assert time.perf_counter() - t0 >= 3.0  # the 2 s and 1 s the two answers asked for
    assert info.hits == data.hits == 1


@reliability(
    "429 whose RateLimit header resets later than HFSOUP_MAX_RETRY_WAIT",
    "one line at once: '<what>: the Hub answered 429 and asked to retry after N s; hfsoup waits "
    "at most 60 s in all (HFSOUP_MAX_RETRY_WAIT)' (HubConnectionError)",
)
def test_a_ratelimit_reset_beyond_the_cap_fails_at_once(faulty_hub, published, cli):
    repo, _ = published
    faulty_hub.add_fault(method="GET", path=f"/api/models/{repo}", status=429, times=None,
                         headers={"RateLimit": '"api";r=0;t=3600'})  # fmt: skip
    t0 = time.perf_counter()
    proc = cli("inspect", repo)
    assert time.perf_counter() - t0 < 30
    assert_one_line_error(proc, repo, "asked to retry after 3600 s", "HFSOUP_MAX_RETRY_WAIT")


# --- 4. the output lock without fcntl --------------------------------------------------------

NO_FCNTL = textwrap.dedent("""
    import sys
    from pathlib import Path

    class NoFcntl:  # as on Windows: there is no such module
        def find_spec(self, name, path=None, target=None):
            if name == "fcntl":
                raise ModuleNotFoundError("No module named 'fcntl'", name="fcntl")

    sys.modules.pop("fcntl", None)
    sys.meta_path.insert(0, NoFcntl())
    import hfsoup.api, hfsoup.cli  # noqa: E401
    from hfsoup.io.writer import staged_output

    with staged_output(Path(sys.argv[1])) as folder:
        (folder / "model.safetensors").write_bytes(b"x")
    print("fcntl" in sys.modules)
""")


@reliability(
    "import hfsoup.api where there is no fcntl (Windows)",
    "nothing: hfsoup imports, and the output lock works through filelock",
)
def test_hfsoup_imports_and_locks_without_fcntl(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", NO_FCNTL, str(tmp_path / "soup")],
        capture_output=True, text=True, timeout=300, env=child_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    assert (tmp_path / "soup" / "model.safetensors").read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup"]


def test_a_held_filelock_refuses_a_second_writer(tmp_path):
    held = FileLock(str(tmp_path / ".soup.hfsoup-lock"), timeout=0)
    refused = pytest.raises(OutputExistsError, match="another hfsoup process is writing")
    with held, refused, staged_output(tmp_path / "soup"):
        pass
    with staged_output(tmp_path / "soup") as folder:
        (folder / "x").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["soup"]


# --- 5. repo IDs checked with huggingface_hub's rules ----------------------------------------


@pytest.mark.parametrize("text", ["org/a--b", "org/name.git", "org/name.", "org/" + "x" * 97])
def test_a_repo_id_the_hub_would_refuse_is_an_ingredient_error(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(IngredientSpecError, match="is not a valid Hub repo ID"):
        parse_ingredient(text)


def test_a_folder_with_such_a_name_is_still_a_local_ingredient(tmp_path, monkeypatch):
    (tmp_path / "org" / "a--b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    spec = parse_ingredient("org/a--b")
    assert (spec.repo, spec.path) == (None, tmp_path / "org" / "a--b")


@reliability(
    "Ingredient shaped like a repo ID that the Hub's rules refuse ('org/a--b', 'x.git')",
    "one line before any request: 'ingredient 'org/a--b' is not a valid Hub repo ID: Cannot have "
    "-- or .. in repo_id ...' (IngredientSpecError); nothing written",
)
def test_an_invalid_repo_id_is_one_line_before_any_request(tmp_path, cli, faulty_hub):
    seen = faulty_hub.add_fault(method="*", path=r"a--b", times=None)
    proc = cli("soup", "org/a--b", "org/c", "--output", tmp_path / "soup", "-q")
    assert_one_line_error(proc, "'org/a--b' is not a valid Hub repo ID", "--")
    assert seen.hits == 0
    assert_nothing_written(tmp_path)


# --- 6. cards: base_model is what the soup is made of; model-index only for Hub datasets -----


@pytest.fixture(scope="module")
def greedy_soup(sentiment, tmp_path_factory):
    out = tmp_path_factory.mktemp("greedy-card") / "soup"
    result = hfsoup.soup(sentiment["repos"], output=out, method="greedy", task=sentiment["task"],
                         progress=False)  # fmt: skip
    return out, result.results


def test_a_greedy_cards_base_model_is_the_accepted_ingredients(greedy_soup, sentiment):
    out, results = greedy_soup
    accepted = results["greedy"]["accepted"]
    assert 0 < len(accepted) < len(sentiment["repos"])  # the fixture makes greedy reject some
    meta = front_matter(out / "README.md")
    assert meta["base_model"] == [r for r in sentiment["repos"] if r in accepted]
    assert meta["base_model_relation"] == "merge"


def test_a_greedy_card_marks_the_rejected_ingredients_in_its_table(greedy_soup, sentiment):
    out, results = greedy_soup
    lines = (out / "README.md").read_text(encoding="utf-8").splitlines()
    for repo in sentiment["repos"]:
        row = next(line for line in lines if line.startswith("| ") and f"`{repo}`" in line)
        rejected = repo not in results["greedy"]["accepted"]
        assert ("(rejected by greedy)" in row) == rejected, row


def test_a_hub_datasets_model_index_entry_carries_its_commit(greedy_soup, sentiment, api):
    out, _ = greedy_soup
    dataset = sentiment["task"]["dataset"]
    sha = api.dataset_info(dataset).sha
    entries = [r["dataset"] for m in front_matter(out / "README.md")["model-index"]
               for r in m["results"]]  # fmt: skip
    assert entries and all(d["type"] == dataset and d["revision"] == sha for d in entries)


def test_local_data_files_give_no_model_index(tiny_greedy, tmp_path):
    import pandas as pd
    from greedy_fixtures import sentences

    for split, seed in (("validation", 1), ("test", 2)):
        pd.DataFrame(sentences(24, seed)).to_csv(tmp_path / f"{split}.csv", index=False)
    files = {s: str(tmp_path / f"{s}.csv") for s in ("validation", "test")}
    task = {**tiny_greedy["task"], "dataset": {"path": "csv", "data_files": files}}
    hfsoup.soup(tiny_greedy["repos"], output=tmp_path / "soup", method="greedy", task=task,
                progress=False)  # fmt: skip
    meta = front_matter(tmp_path / "soup" / "README.md")
    assert "model-index" not in meta
    assert "csv" not in yaml.safe_dump(meta)
    assert meta["base_model"]  # Hub ingredients still are the soup's parents


def test_a_soup_of_local_folders_has_no_base_model(tmp_path, cli):
    dirs = [save_ingredient(tmp_path / f"ing{i}", tiny_bert_config(), seed=i + 1) for i in (0, 1)]
    proc = cli("soup", *dirs, "--output", tmp_path / "soup", "-q")
    assert proc.returncode == 0, proc.stderr
    meta = front_matter(tmp_path / "soup" / "README.md")
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert meta["tags"] == ["hfsoup", "model-soup", "merge", "uniform-soup"]


@reliability(
    "Soup of local folders pushed to the Hub (card, recipe and results name local ingredients)",
    "no path of this machine in any pushed file: local ingredients are named relative to the "
    "soup ('../ft-a') and marked 'local folder, not on the Hub'; rebuilding from the card "
    "(with --allow-local) finds them from any working directory",
)
def test_a_pushed_card_names_no_folder_of_this_machine(tmp_path, cli, api, repo_id, monkeypatch):
    import torch
    from factories import load_state_dict
    from huggingface_hub import hf_hub_download

    work = tmp_path / "work"
    for i, name in enumerate(("ft-a", "ft-b")):
        save_ingredient(work / name, tiny_bert_config(), seed=i + 1)
    monkeypatch.chdir(work)
    target = repo_id("local-soup")
    proc = cli("soup", "./ft-a", "./ft-b", "--output", work / "soup", "--push-to", target, "-q")
    assert proc.returncode == 0, proc.stderr

    pushed = api.list_repo_files(target)
    assert {"README.md", "hfsoup_recipe.yaml", "results.json"} <= set(pushed)
    for name in pushed:
        data = Path(hf_hub_download(target, name)).read_bytes()
        assert str(tmp_path).encode() not in data, name
    recipe = yaml.safe_load((work / "soup" / "hfsoup_recipe.yaml").read_text())
    assert recipe["ingredients"] == ["../ft-a", "../ft-b"]
    results = json.loads((work / "soup" / "results.json").read_text())
    assert [row["repo"] for row in results["ingredients"]] == ["../ft-a", "../ft-b"]
    assert "local folder, not on the Hub" in (work / "soup" / "README.md").read_text()

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    proc = cli("run", work / "soup" / "README.md", "--output", tmp_path / "again",
               "--allow-local", "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    again, first = load_state_dict(tmp_path / "again"), load_state_dict(work / "soup")
    assert again.keys() == first.keys()
    assert all(torch.equal(again[k], first[k]) for k in first)
