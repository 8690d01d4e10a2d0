"""Greedy soups merged with a task-vector operator (issue 17, ``--combine``): decisions and
soup against an independent plain-torch Recipe 1 with TIES, task arithmetic at λ = 1 equal to
the plain greedy soup, the errors, resume, and the recipe rebuilding the same soup."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from factories import load_state_dict, make_model, tiny_bert_config
from greedy_fixtures import accuracy

import hfsoup


@pytest.fixture(scope="module")
def base_repo(hub, sentiment, tmp_path_factory) -> str:
    """The shared init the sentiment fine-tunes were trained from (θ₀), on the Hub."""
    from huggingface_hub import HfApi

    folder = tmp_path_factory.mktemp("combine-base") / "base"
    make_model(tiny_bert_config(), seed=0).save_pretrained(folder)
    sentiment["tok"].save_pretrained(folder)
    api = HfApi(endpoint=hub.url)
    api.create_repo("test-org/sentiment-base", exist_ok=True)
    api.upload_folder(repo_id="test-org/sentiment-base", folder_path=str(folder))
    sentiment["base_dir"] = folder
    return "test-org/sentiment-base"


def _top(tau: torch.Tensor, density: float) -> torch.Tensor:
    flat = tau.flatten()
    keep = torch.zeros_like(flat)
    keep[torch.argsort(flat.abs(), descending=True)[: max(1, int(density * flat.numel()))]] = 1
    return (flat * keep).view(tau.shape)


def plain_merge(combine: str, base: dict, members: list[dict], lam: float, density: float):
    """TIES (top-k trim, elected sign, disjoint mean) or task arithmetic over equal weights."""
    if len(members) == 1:
        return dict(members[0])
    out = {}
    for name, b in base.items():
        if name not in members[0]:
            continue
        if not b.is_floating_point():
            out[name] = members[0][name]
            continue
        taus = torch.stack([m[name].float() - b.float() for m in members])
        if combine == "task_arithmetic":
            out[name] = b.float() + lam * taus.mean(0)
            continue
        trimmed = torch.stack([_top(t, density) for t in taus])
        elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(trimmed) == elected
        count = agree.sum(0).float()
        mean = (trimmed * agree).sum(0) / torch.where(count == 0, 1.0, count)
        out[name] = b.float() + lam * mean
    return out


def reference(s, combine: str, *, lam=1.0, density=0.5, strict=False):
    """Recipe 1 with ``combine`` in plain torch, every candidate scored on the full split."""
    sds = [load_state_dict(d) for d in s["dirs"]]
    base = load_state_dict(s["base_dir"])
    val, folder, tok = s["splits"]["validation"], s["dirs"][0], s["tok"]
    scores = [accuracy(sd, folder, val, tok) for sd in sds]
    order = sorted(range(len(sds)), key=lambda i: -scores[i])
    kept, best = [order[0]], scores[order[0]]
    for j in order[1:]:
        score = accuracy(plain_merge(combine, base, [sds[i] for i in [*kept, j]], lam, density),
                         folder, val, tok)  # fmt: skip
        if score > best or (score == best and not strict):
            kept.append(j)
            best = score
    return kept, plain_merge(combine, base, [sds[i] for i in kept], lam, density)


def _max_diff(out: dict, expected: dict) -> float:
    return max((out[k].float() - expected[k].float()).abs().max().item() for k in expected)


def _soup(s, base, tmp_path, combine, **merge):
    return hfsoup.soup(s["repos"], output=tmp_path / "soup", method="greedy", task=s["task"],
                       merge={"base": base, "combine": combine, **merge}, progress=False)  # fmt: skip


def test_greedy_ties_decisions_and_soup_equal_a_plain_torch_recipe_1(
    hub, sentiment, base_repo, tmp_path
):
    result = _soup(sentiment, base_repo, tmp_path, "ties", **{"lambda": 1.0, "density": 0.8})
    kept, expected = reference(sentiment, "ties", lam=1.0, density=0.8)
    # Every later candidate was a TIES merge scored by both (this fixture rejects them all).
    assert len(result.results["greedy"]["trace"]) == len(sentiment["repos"])
    greedy = result.results["greedy"]
    assert greedy["accepted"] == [sentiment["repos"][i] for i in kept]
    assert greedy["combine"] == {"operator": "ties", "lambda": 1.0, "density": 0.8}
    out = load_state_dict(tmp_path / "soup")
    assert _max_diff(out, expected) <= 1e-6
    test = accuracy(out, tmp_path / "soup", sentiment["splits"]["test"], sentiment["tok"])
    assert result.results["table"]["greedy_soup"]["test"]["accuracy"] == pytest.approx(test)


def test_greedy_task_arithmetic_at_lambda_1_is_the_plain_greedy_soup(
    hub, sentiment, base_repo, tmp_path
):
    merged = _soup(sentiment, base_repo, tmp_path, "task_arithmetic")
    plain = hfsoup.soup(sentiment["repos"], output=tmp_path / "plain", method="greedy",
                        task=sentiment["task"], progress=False)  # fmt: skip
    assert merged.results["greedy"]["accepted"] == plain.results["greedy"]["accepted"]
    assert merged.results["table"]["uniform_soup"] == plain.results["table"]["uniform_soup"]
    assert (
        _max_diff(load_state_dict(tmp_path / "soup"), load_state_dict(tmp_path / "plain")) <= 1e-6
    )


def test_the_pinned_recipe_rebuilds_the_same_soup(hub, sentiment, base_repo, tmp_path):
    _soup(sentiment, base_repo, tmp_path, "dare_ties", density=0.7)
    recipe = yaml.safe_load((tmp_path / "soup" / "hfsoup_recipe.yaml").read_text())
    assert recipe["combine"] == "dare_ties" and recipe["density"] == 0.7
    assert recipe["lambda"] == 1.0 and recipe["base"]
    card = (tmp_path / "soup" / "README.md").read_text()
    assert "Greedy soup merged with dare_ties" in card and "density = 0.7" in card
    recipe["output"] = {"dir": str(tmp_path / "again")}
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(recipe))
    hfsoup.run(tmp_path / "again.yaml", progress=False)
    again, first = load_state_dict(tmp_path / "again"), load_state_dict(tmp_path / "soup")
    assert all(torch.equal(again[k], first[k]) for k in first)


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--combine", "ties"], "needs a base model"),
        (["--method", "uniform", "--combine", "ties", "--base", "BASE"], "combine does not apply"),
        (["--base", "BASE"], "only with combine"),
        (["--combine", "ties", "--base", "BASE", "--density", "1.5"], "density"),
        (["--combine", "task_arithmetic", "--base", "BASE", "--density", "0.5"], "density"),
        (["--combine", "ties", "--base", "BASE", "--lambda", "auto"], "lambda auto is not"),
        (["--combine", "dare_ties", "--base", "BASE", "--density", "auto"], "density auto is"),
        (
            ["--combine", "ties", "--base", "BASE", "--lambda", "auto", "--grid", "lambda=1,2"],
            "lambda auto is not",
        ),  # fmt: skip
    ],
)
def test_refused_options_are_one_line_exit_2_nothing_written(
    hub, sentiment, base_repo, cli, tmp_path, flags, says
):
    flags = [base_repo if f == "BASE" else f for f in flags]
    method = [] if "--method" in flags else ["--method", "greedy"]
    task = ["--task", tmp_path / "task.yaml"]
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(sentiment["task"]))
    out = tmp_path / "soup"
    proc = cli("soup", *sentiment["repos"][:2], *method, *flags, *task, "-o", out, "-q")
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / ".soup.hfsoup-partial").exists()


def test_interrupted_combine_run_resumes_with_the_same_decisions(
    hub, sentiment, base_repo, tmp_path, monkeypatch
):
    from hfsoup.tasks.classification import Scorer

    calls = {"n": 0}

    def interrupting(original):
        def interrupted(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            return original(self, *args, **kwargs)

        return interrupted

    # A candidate is scored by score_against (counting scorers) or score_with_early_stop.
    for name in ("score_with_early_stop", "score_against"):
        monkeypatch.setattr(Scorer, name, interrupting(getattr(Scorer, name)))
    with pytest.raises(KeyboardInterrupt):
        _soup(sentiment, base_repo, tmp_path, "ties")
    state = json.loads((tmp_path / ".soup.hfsoup-partial" / "greedy_state.json").read_text())
    assert len(state["trace"]) == 2
    calls["n"] = 10
    with pytest.raises(hfsoup.errors.NothingToResumeError, match="cannot resume"):
        hfsoup.soup(sentiment["repos"], output=tmp_path / "soup", method="greedy",
                    task=sentiment["task"], merge={"base": base_repo, "combine": "dare_ties"},
                    resume=True, progress=False)  # fmt: skip
    assert calls["n"] == 10  # another operator's state is refused before any scoring
    resumed = hfsoup.soup(sentiment["repos"], output=tmp_path / "soup", method="greedy",
                          task=sentiment["task"], merge={"base": base_repo, "combine": "ties"},
                          resume=True, progress=False)  # fmt: skip
    assert calls["n"] == 10 + 3  # only the undecided candidates were scored
    kept, _ = reference(sentiment, "ties")
    assert resumed.results["greedy"]["accepted"] == [sentiment["repos"][i] for i in kept]


@pytest.fixture(scope="module")
def aligned(hub, tmp_path_factory) -> dict:
    """Four fine-tunes in one basin: one from the shared init, three continued from it with
    other seeds and learning rates, so that TIES merges of them score as well as the best
    (greedy-TIES keeps several); the shared init (θ₀) and a dataset, all on the Hub."""
    from greedy_fixtures import fine_tune, publish_dataset, sentences, tokenizer
    from huggingface_hub import HfApi

    api, tmp = HfApi(endpoint=hub.url), tmp_path_factory.mktemp("aligned")
    tok = tokenizer(tmp)
    splits = {"train": sentences(300, 41), "validation": sentences(200, 42),
              "test": sentences(200, 43)}  # fmt: skip
    publish_dataset(api, "test-org/aligned-sentiment", splits, tmp)
    first = fine_tune(tmp / "ft0", tok, splits["train"], lr=1e-3, seed=0, steps=80)
    dirs = [first] + [fine_tune(tmp / f"ft{i}", tok, splits["train"], lr=lr, seed=i, steps=30,
                                start=first) for i, lr in ((1, 3e-4), (2, 1e-3), (3, 3e-4))]  # fmt: skip
    base = tmp / "base"
    make_model(tiny_bert_config(), seed=0).save_pretrained(base)
    tok.save_pretrained(base)
    repos = []
    for name, folder in [("base", base), *((f"ft{i}", d) for i, d in enumerate(dirs))]:
        repos.append(f"test-org/aligned-{name}")
        api.create_repo(repos[-1], exist_ok=True)
        api.upload_folder(repo_id=repos[-1], folder_path=str(folder))
    task = {"dataset": "test-org/aligned-sentiment", "selection_split": "validation",
            "report_splits": ["test"], "input_columns": ["text"], "label_column": "label",
            "metrics": ["accuracy"], "batch_size": 32}  # fmt: skip
    return {"base": repos[0], "repos": repos[1:], "dirs": dirs, "base_dir": base, "tok": tok,
            "splits": splits, "task": task}  # fmt: skip


def test_a_multi_ingredient_greedy_ties_soup_is_plain_torch_ties_and_its_card_rebuilds_it(
    aligned, cli, tmp_path
):
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(aligned["task"]))
    out = tmp_path / "soup"
    proc = cli("soup", *aligned["repos"], "--method", "greedy", "--combine", "ties", "--base",
               aligned["base"], "--task", tmp_path / "task.yaml", "-o", out, "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    kept, expected = reference(aligned, "ties")  # λ = 1, density = 0.5: the defaults
    assert len(kept) >= 2  # the case this test is for: a real TIES of several ingredients
    greedy = json.loads((out / "results.json").read_text())["greedy"]
    assert greedy["accepted"] == [aligned["repos"][i] for i in kept]
    assert _max_diff(load_state_dict(out), expected) <= 1e-6
    proc = cli("run", out / "README.md", "--output", tmp_path / "again", "-q")
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").read_bytes() == (
        tmp_path / "again" / "model.safetensors"
    ).read_bytes()
