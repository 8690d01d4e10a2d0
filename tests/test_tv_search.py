"""Task-vector coefficients chosen on the selection split (issue 17, part 2a): the chosen λ is
the argmax of an independent full sweep, early-rejected candidates decide as a full evaluation
would, the search is recorded, the pinned recipe rebuilds the same bytes, and the errors."""

from __future__ import annotations

import json

import pytest
import torch
from factories import load_state_dict, make_model, tiny_bert_config
from greedy_fixtures import accuracy, publish_sentiment

import hfsoup
from hfsoup.recipe import Recipe

RUNS = [{"lr": 1e-2, "steps": 60}, {"lr": 3e-3, "steps": 60}]
GRID = [0.2, 0.6, 1.0, 1.4]


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory, hub):
    from huggingface_hub import HfApi

    api, tmp = HfApi(endpoint=hub.url), tmp_path_factory.mktemp("tvsearch")
    data = publish_sentiment(api, tmp, RUNS, dataset="test-org/tvsearch-sentiment",
                             prefix="test-org/tvsearch-ft", seeds=(21, 22, 23),
                             sizes=(200, 80, 80), batch_size=16)  # fmt: skip
    base = tmp / "base"
    make_model(tiny_bert_config(), seed=0).save_pretrained(base)
    data["tok"].save_pretrained(base)
    api.create_repo("test-org/tvsearch-base", exist_ok=True)
    api.upload_folder(repo_id="test-org/tvsearch-base", folder_path=str(base))
    data["base"], data["base_dir"] = "test-org/tvsearch-base", base
    return data


def _recipe(s, out, **keys):
    return Recipe.model_validate({"method": "task_arithmetic", "ingredients": s["repos"],
                                  "base": s["base"], "task": s["task"],
                                  "output": {"dir": str(out)}, **keys})  # fmt: skip


@pytest.fixture(scope="module")
def searched(sentiment, tmp_path_factory):
    out = tmp_path_factory.mktemp("searched") / "soup"
    hfsoup.run(_recipe(sentiment, out, **{"lambda": "auto", "grid": {"lambda": GRID}}),
               progress=False)  # fmt: skip
    return out, json.loads((out / "results.json").read_text())


def _full_sweep(s) -> list[float]:
    base = load_state_dict(s["base_dir"])
    fts = [load_state_dict(d) for d in s["dirs"]]
    rows = s["splits"]["validation"]
    scores = []
    for lam in GRID:
        state = {n: base[n] + lam * sum(ft[n] - base[n] for ft in fts)
                 if base[n].is_floating_point() else base[n] for n in base}  # fmt: skip
        scores.append(accuracy(state, s["base_dir"], rows, s["tok"]))
    return scores


def test_chosen_lambda_is_the_first_argmax_of_a_full_sweep(sentiment, searched):
    _, results = searched
    full = _full_sweep(sentiment)
    best = max(range(len(GRID)), key=lambda i: (full[i], -i))  # first of the ties
    chosen = yaml_lambda(searched[0])
    assert chosen == GRID[best]
    assert [r["params"]["lambda"] for r in results["search"]] == GRID


def test_early_rejected_candidates_decide_as_full_evaluation(sentiment, searched):
    _, results = searched
    full, best = _full_sweep(sentiment), float("-inf")
    n = len(sentiment["splits"]["validation"])
    for record, score in zip(results["search"], full, strict=True):
        if record["score"] is None:  # stopped: a full evaluation is no better
            assert score <= best and record["examples_scored"] <= n
        else:
            assert record["score"] == pytest.approx(score) and record["examples_scored"] == n
            best = max(best, score)


def test_the_table_has_the_merged_row_beside_the_baselines(searched):
    out, results = searched
    assert set(results["table"]) == {"best_individual", "uniform_soup", "ensemble",
                                     "greedy_ensemble", "task_arithmetic"}  # fmt: skip
    assert (out / "coefficient_search.png").exists()
    assert "coefficient_search.png" in (out / "README.md").read_text()


def yaml_lambda(out) -> float:
    import yaml

    return yaml.safe_load((out / "hfsoup_recipe.yaml").read_text())["lambda"]


def test_the_pinned_recipe_rebuilds_the_same_bytes(searched, tmp_path):
    out, _ = searched
    again = tmp_path / "again"
    hfsoup.run(out / "hfsoup_recipe.yaml", output=again, progress=False)
    a, b = load_state_dict(out), load_state_dict(again)
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize(
    "keys, words",
    [
        ({"lambda": "auto", "task": None}, "set a task"),
        ({"lambda": "auto", "grid": {"density": [0.5]}}, "grid density"),
        ({"method": "ties", "density": "auto", "grid": {"density": [0.0, 0.5]}}, "outside"),
        ({"lambda": 0.5, "grid": {"lambda": [0.5]}}, "grid lambda"),
    ],
)
def test_search_errors_are_one_line_and_write_nothing(sentiment, tmp_path, keys, words):
    from hfsoup.errors import RecipeError

    out = tmp_path / "soup"
    with pytest.raises(RecipeError, match=words):
        hfsoup.run(_recipe(sentiment, out, **keys), progress=False)
    assert not out.exists()


# --- density auto (TIES, DARE-TIES) and alpha auto (WiSE-FT) against a brute-force sweep ---

LAMBDAS, DENSITIES, ALPHAS = [0.6, 1.0, 1.4], [0.2, 0.6], [0.0, 0.3, 0.6, 1.0]
SWEEPS = {
    "ties": ({"lambda": "auto", "density": "auto"}, {"lambda": LAMBDAS, "density": DENSITIES}),
    "dare_ties": ({"lambda": "auto", "density": "auto"}, {"lambda": LAMBDAS, "density": DENSITIES}),
    "wise_ft": ({"alpha": "auto"}, {"alpha": ALPHAS}),
}


def _points(method: str) -> list[dict[str, float]]:
    """The grid in the documented order: density-major, then the scale."""
    if method == "wise_ft":
        return [{"alpha": a} for a in ALPHAS]
    return [{"density": d, "lambda": lam} for d in DENSITIES for lam in LAMBDAS]


def _kept_top(tau: torch.Tensor, density: float) -> torch.Tensor:
    flat = tau.flatten()
    keep = torch.zeros_like(flat)
    keep[torch.argsort(flat.abs(), descending=True)[: max(1, int(density * flat.numel()))]] = 1
    return (flat * keep).view(tau.shape)


def _dropped(tau: torch.Tensor, density: float, i: int, name: str) -> torch.Tensor:
    from hfsoup.methods.task_vectors import dare_seed  # the documented seed derivation

    gen = torch.Generator().manual_seed(dare_seed(0, i, name))
    return tau * (torch.rand(tau.shape, generator=gen) < density) / density


def _merged_state(method: str, base: dict, fts: list[dict], p: dict[str, float]) -> dict:
    """The issue's definitions, equal weights, on whole tensors in float32."""
    out = {}
    for n, b in base.items():
        if not b.is_floating_point():
            out[n] = b
            continue
        if method == "wise_ft":
            soup = sum(ft[n] for ft in fts) / len(fts)
            out[n] = (1 - p["alpha"]) * b + p["alpha"] * soup
            continue
        taus = [ft[n] - b for ft in fts]
        if method == "ties":
            taus = [_kept_top(t, p["density"]) for t in taus]
        else:
            taus = [_dropped(t, p["density"], i, n) for i, t in enumerate(taus)]
        stacked = torch.stack(taus)
        elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(stacked) == elected
        count = agree.sum(0).float()
        mean = (stacked * agree).sum(0) / torch.where(count == 0, 1.0, count)
        out[n] = b + p["lambda"] * mean
    return out


@pytest.fixture(scope="module", params=list(SWEEPS))
def swept(request, sentiment, tmp_path_factory):
    """One searched run per method, and the brute-force selection score of every grid point."""
    method = request.param
    autos, grid = SWEEPS[method]
    out = tmp_path_factory.mktemp(f"swept-{method}") / "soup"
    hfsoup.run(_recipe(sentiment, out, method=method, grid=grid, **autos), progress=False)
    base = load_state_dict(sentiment["base_dir"])
    fts = [load_state_dict(d) for d in sentiment["dirs"]]
    rows = sentiment["splits"]["validation"]
    full = [accuracy(_merged_state(method, base, fts, p), sentiment["base_dir"], rows,
                     sentiment["tok"]) for p in _points(method)]  # fmt: skip
    return method, out, json.loads((out / "results.json").read_text()), full


def test_auto_coefficients_are_the_first_argmax_of_a_brute_force_sweep(swept):
    import yaml

    method, out, results, full = swept
    points = _points(method)
    assert [r["params"] for r in results["search"]] == points
    best = points[max(range(len(points)), key=lambda i: (full[i], -i))]
    pinned = yaml.safe_load((out / "hfsoup_recipe.yaml").read_text())
    assert {key: pinned[key] for key in best} == best


def test_every_fully_scored_grid_point_scores_as_the_brute_force(swept):
    _, _, results, full = swept
    best = float("-inf")
    for record, score in zip(results["search"], full, strict=True):
        if record["score"] is None:  # rejected early: a full evaluation is no better
            assert score <= best
        else:
            assert record["score"] == pytest.approx(score)
            best = max(best, score)


# --- the search through the hfsoup command ---


@pytest.fixture
def task_file(sentiment, tmp_path):
    import yaml

    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(sentiment["task"]))
    return path


def test_the_grid_flag_sets_the_searched_points(sentiment, task_file, cli, tmp_path):
    out = tmp_path / "soup"
    proc = cli("soup", *sentiment["repos"], "--method", "ties", "--base", sentiment["base"],
               "--task", task_file, "--lambda", "auto", "--density", "auto",
               "--grid", "lambda=0.5,1.5", "density=0.4", "-o", out, "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    search = json.loads((out / "results.json").read_text())["search"]
    assert [r["params"] for r in search] == [{"density": 0.4, "lambda": 0.5},
                                             {"density": 0.4, "lambda": 1.5}]  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--lambda", "auto", "--grid", "lambda=x"], "'lambda=x'"),
        (["--lambda", "auto", "--grid", "lambda="], "'lambda='"),
        (["--lambda", "auto", "--grid", "lambda=0.5,,1"], "'lambda=0.5,,1'"),
        (["--lambda", "auto", "--grid", "strength=1"], "unknown coefficient 'strength'"),
        (["--lambda", "auto", "--grid"], "--grid"),
        (["--lambda", "auto", "--grid", "lambda=1", "lambda=2"], "lambda given twice"),
        (["--lambda", "auto", "--grid", "lambda=nan"], "grid lambda"),
        (["--density", "auto", "--grid", "density=0,0.5"], "(0, 1]"),
        (["--density", "0"], "(0, 1]"),
        (["--density", "1.5"], "(0, 1]"),
        (["--lambda", "0.5", "--grid", "lambda=1"], "set lambda auto"),
    ],
)
def test_malformed_search_flags_are_one_line_exit_2_nothing_written(
    sentiment, task_file, cli, tmp_path, flags, says
):
    out = tmp_path / "soup"
    proc = cli("soup", *sentiment["repos"], "--method", "ties", "--base", sentiment["base"],
               "--task", task_file, *flags, "-o", out, "-q")  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists() and not (tmp_path / ".soup.hfsoup-partial").exists()


def test_lambda_auto_without_a_task_is_refused_at_the_command(sentiment, cli, tmp_path):
    out = tmp_path / "soup"
    proc = cli("soup", *sentiment["repos"], "--method", "task_arithmetic", "--base",
               sentiment["base"], "--lambda", "auto", "-o", out, "-q")  # fmt: skip
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and "set a task" in line and "--task" in line, line
    assert not out.exists()
