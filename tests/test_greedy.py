"""Greedy soups: ordering, acceptance rules, bit-exact undo, exact early rejection, resume,
label alignment, and the numbers checked against an independent plain-torch greedy soup."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from factories import load_state_dict
from greedy_fixtures import accuracy

import hfsoup


def reference_greedy(s, strict=False):
    """The paper's Recipe 1 with plain torch and full evaluations: the accepted indices."""
    sds = [load_state_dict(d) for d in s["dirs"]]
    val = s["splits"]["validation"]
    scores = [accuracy(sd, s["dirs"][0], val, s["tok"]) for sd in sds]
    order = sorted(range(len(sds)), key=lambda i: -scores[i])
    kept, best = [order[0]], scores[order[0]]
    for j in order[1:]:
        avg = {k: torch.stack([sds[i][k] for i in [*kept, j]]).mean(0) for k in sds[0]}
        score = accuracy(avg, s["dirs"][0], val, s["tok"])
        if score > best or (score == best and not strict):
            kept.append(j)
            best = score
    return kept, scores


@pytest.mark.parametrize("accept", [">=", ">"])
def test_greedy_decisions_equal_an_independent_full_evaluation(hub, sentiment, tmp_path, accept):
    result = hfsoup.soup(sentiment["repos"], output=tmp_path / "soup", method="greedy",
                         task=sentiment["task"], accept=accept, progress=False)  # fmt: skip
    kept, scores = reference_greedy(sentiment, strict=accept == ">")
    greedy = result.results["greedy"]
    assert greedy["accepted"] == [sentiment["repos"][i] for i in kept]
    for row, score in zip(result.results["ingredients"], scores, strict=True):
        assert row["scores"]["validation"]["accuracy"] == pytest.approx(score, abs=1e-9)
    # The written soup is the plain average of the accepted ingredients.
    sds = [load_state_dict(sentiment["dirs"][i]) for i in kept]
    out = load_state_dict(tmp_path / "soup")
    assert (
        max((out[k] - torch.stack([sd[k] for sd in sds]).mean(0)).abs().max() for k in out) <= 1e-6
    )
    # Its reported test score is what an independent evaluation of the written soup gives.
    test = accuracy(out, tmp_path / "soup", sentiment["splits"]["test"], sentiment["tok"])
    assert result.results["table"]["greedy_soup"]["test"]["accuracy"] == pytest.approx(
        test, abs=1e-9
    )


def test_results_json_has_the_fixed_keys(hub, sentiment, tmp_path):
    hfsoup.soup(sentiment["repos"], output=tmp_path / "soup", method="greedy",
                task=sentiment["task"], progress=False)  # fmt: skip
    results = json.loads((tmp_path / "soup" / "results.json").read_text())
    row = results["ingredients"][0]
    assert {"repo", "revision", "sha", "scores"} <= row.keys()
    assert set(row["scores"]) == {"validation", "test"}
    step = results["greedy"]["trace"][1]
    assert {"repo", "score", "accepted", "examples_scored"} <= step.keys()
    assert set(results["table"]) == {
        "best_individual",
        "uniform_soup",
        "greedy_soup",
        "ensemble",
        "greedy_ensemble",
    }
    # The uniform soup's test score is an independent evaluation of all ingredients' average.
    sds = [load_state_dict(d) for d in sentiment["dirs"]]
    uniform = {k: torch.stack([sd[k] for sd in sds]).mean(0) for k in sds[0]}
    expected = accuracy(
        uniform, sentiment["dirs"][0], sentiment["splits"]["test"], sentiment["tok"]
    )
    assert results["table"]["uniform_soup"]["test"]["accuracy"] == pytest.approx(expected, abs=1e-9)
    assert (tmp_path / "soup" / "greedy_trajectory.png").stat().st_size > 1000
    assert not (tmp_path / "soup" / "greedy_state.json").exists()
    card = (tmp_path / "soup" / "README.md").read_text()
    assert "greedy_trajectory.png" in card and "model-index" in card


def test_ensemble_is_the_mean_of_probabilities(hub, sentiment, tmp_path):
    report = hfsoup.evaluate(sentiment["repos"], task=sentiment["task"], progress=False)
    from transformers import AutoModelForSequenceClassification

    rows, tok = sentiment["splits"]["test"], sentiment["tok"]
    batch = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
    probs = []
    for d in sentiment["dirs"]:
        with torch.no_grad():
            probs.append(
                AutoModelForSequenceClassification.from_pretrained(d)
                .eval()(**batch)
                .logits.softmax(-1)
            )
    pred = torch.stack(probs).mean(0).argmax(-1)
    expected = (pred == torch.tensor([r["label"] for r in rows])).sum().item() / len(rows)
    assert report["table"]["ensemble"]["test"]["accuracy"] == pytest.approx(expected, abs=1e-9)


def test_rejected_candidate_is_undone_bit_for_bit(hub, sentiment):
    from hfsoup.api import load_ingredients
    from hfsoup.methods.greedy import SoupSession

    session = SoupSession(load_ingredients(sentiment["repos"][:3]))
    session.restart(0)
    session.add(1)
    session.show_sum()
    before = session.live.snapshot()
    session.show_candidate(2)
    assert any(not torch.equal(before[k], v) for k, v in session.live.snapshot().items())
    session.show_sum()
    after = session.live.snapshot()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_early_rejection_scores_fewer_examples_with_identical_decisions(hub, sentiment, tmp_path):
    result = hfsoup.soup(sentiment["repos"], output=tmp_path / "soup", method="greedy",
                         task=sentiment["task"], progress=False)  # fmt: skip
    greedy = result.results["greedy"]
    rejected = [s for s in greedy["trace"] if not s["accepted"]]
    assert rejected, "the fixture should produce at least one rejection"
    assert greedy["examples_scored"] < greedy["examples_full_evaluation"]
    assert any(s["examples_scored"] < 200 for s in rejected)


def test_interrupted_run_resumes_without_recomputing(hub, sentiment, tmp_path, monkeypatch):
    from hfsoup.tasks.classification import Scorer

    calls = {"n": 0}
    original = Scorer.score_against

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Scorer, "score_against", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hfsoup.soup(sentiment["repos"], output=tmp_path / "soup", method="greedy",
                    task=sentiment["task"], progress=False)  # fmt: skip
    assert not (tmp_path / "soup").exists()
    state = json.loads((tmp_path / ".soup.hfsoup-partial" / "greedy_state.json").read_text())
    assert len(state["individual"]) == 5 and len(state["trace"]) == 2

    logits_calls = {"n": 0}
    original_logits = Scorer.logits

    def counting(self, model, split, *, key=None):
        if key is not None:
            logits_calls["n"] += 1
        return original_logits(self, model, split, key=key)

    calls["n"] = 10  # no more interruptions
    monkeypatch.setattr(Scorer, "logits", counting)
    resumed = hfsoup.soup(sentiment["repos"], output=tmp_path / "soup", method="greedy",
                          task=sentiment["task"], progress=False)  # fmt: skip
    assert logits_calls["n"] == 0  # ingredients were not re-scored
    assert calls["n"] == 10 + 3  # only the three undecided candidates were scored
    fresh = hfsoup.soup(sentiment["repos"], output=tmp_path / "fresh", method="greedy",
                        task=sentiment["task"], progress=False)  # fmt: skip
    assert resumed.results["greedy"]["accepted"] == fresh.results["greedy"]["accepted"]


def test_identical_ingredients_tie_accepted_by_ge_rejected_by_gt(hub, sentiment, tmp_path):
    twice = [sentiment["repos"][0], sentiment["repos"][0]]
    ge = hfsoup.soup(
        twice, output=tmp_path / "ge", method="greedy", task=sentiment["task"], progress=False
    )
    gt = hfsoup.soup(twice, output=tmp_path / "gt", method="greedy", task=sentiment["task"],
                     accept=">", progress=False)  # fmt: skip
    assert [s["accepted"] for s in ge.results["greedy"]["trace"]] == [True, True]
    assert [s["accepted"] for s in gt.results["greedy"]["trace"]] == [True, False]


def test_labels_in_another_order_are_aligned(hub, sentiment, tmp_path, publish):
    from safetensors.torch import load_file, save_file

    src = sentiment["dirs"][1]
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    for f in src.iterdir():
        (swapped / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["id2label"] = {"0": "positive", "1": "negative"}
    config["label2id"] = {"positive": 0, "negative": 1}
    (swapped / "config.json").write_text(json.dumps(config))
    state = load_file(src / "model.safetensors")
    for name in ("classifier.weight", "classifier.bias"):
        state[name] = state[name].flip(0).contiguous()
    save_file(state, swapped / "model.safetensors", metadata={"format": "pt"})
    repo = publish(swapped)[0]
    hfsoup.soup(
        [sentiment["repos"][0], sentiment["repos"][1]], output=tmp_path / "plain", progress=False
    )
    hfsoup.soup([sentiment["repos"][0], repo], output=tmp_path / "aligned", progress=False)
    a, b = load_state_dict(tmp_path / "plain"), load_state_dict(tmp_path / "aligned")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_greedy_without_a_task_is_a_clear_error(hub, sentiment, tmp_path):
    proc = run_cli(
        "soup", *sentiment["repos"][:2], "--method", "greedy", "--output", str(tmp_path / "s")
    )
    assert proc.returncode == 2
    assert "needs a task" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_greedy_prints_the_table(hub, sentiment, tmp_path):
    task = tmp_path / "task.yaml"
    import yaml

    task.write_text(yaml.safe_dump(sentiment["task"]))
    proc = run_cli("soup", *sentiment["repos"], "--method", "greedy", "--task", str(task),
                   "--output", str(tmp_path / "s"), "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for method in ("best individual", "uniform soup", "greedy soup", "ensemble", "greedy ensemble"):
        assert method in proc.stdout
    proc = run_cli("evaluate", *sentiment["repos"][:2], "--task", str(task), "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)["table"]) == {
        "best_individual",
        "ensemble",
        "greedy_ensemble",
    }
