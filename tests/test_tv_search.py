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
