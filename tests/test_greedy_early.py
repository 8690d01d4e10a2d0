"""Exact early decisions both ways (rejection and acceptance) in greedy soups, checked against
full evaluations; the savings split in results.json; reuse of outputs for the greedy soup."""

from __future__ import annotations

import random

import pytest
import torch
from factories import load_state_dict
from greedy_fixtures import accuracy
from test_greedy import reference_greedy

import hfsoup
from hfsoup.tasks.classification import Scorer, required_count
from hfsoup.tasks.kinds import Tally

SEED = 0
WEAK_SEED = 0  # random order [0, 2, 1] for three ingredients: the weak one first


def small_batches(sentiment, size=8):
    # Small batches: finer stopping points, so early acceptances happen on the fixture.
    return {**sentiment["task"], "batch_size": size}


@pytest.fixture(scope="module")
def scored(sentiment):
    from transformers import AutoModelForSequenceClassification

    scorer = Scorer.from_pretrained(small_batches(sentiment), str(sentiment["dirs"][0]),
                                    progress=False)  # fmt: skip
    model = AutoModelForSequenceClassification.from_pretrained(sentiment["dirs"][0]).eval()
    full = scorer.tally(scorer.outputs(model, "validation"), "validation")
    return scorer, model, full


@pytest.mark.parametrize("strict", [False, True])
def test_score_against_decides_like_a_full_count(scored, strict):
    scorer, model, full = scored
    total = full.total
    assert full.hits < total  # a perfect candidate can never be rejected under ">="
    stopped = {"accepted": 0, "rejected": 0}
    # Incumbents on both sides of the candidate's own count, whatever that count is on this
    # machine (the fixture's fine-tune is trained here; its accuracy is not fixed).
    incumbents = set(range(0, total + 1, 7)) | set(range(full.hits + 1, total + 1))
    for hits in sorted(incumbents):
        incumbent = Tally(hits, total, total)
        outcome = scorer.score_against(model, "validation", incumbent, strict=strict)
        expected = full.hits >= required_count(hits / total, total, strict=strict)
        assert outcome.accepted == expected
        if outcome.score is None:
            assert outcome.examples_scored < total
            assert not outcome.tally.known
            stopped["accepted" if expected else "rejected"] += 1
        else:
            assert outcome.tally == full
    assert stopped["accepted"] and stopped["rejected"]


def test_score_against_a_partial_incumbent_is_only_decided_when_certain(scored):
    scorer, model, full = scored
    total = full.total
    for hits, seen in [(0, 0), (50, 60), (100, 120), (150, 176), (full.hits - 5, total - 16)]:
        incumbent = Tally(hits, seen, total)
        outcome = scorer.score_against(model, "validation", incumbent)
        # Every incumbent count in [hits, high] must give the same answer when decided.
        answers = {full.hits >= required_count(h / total, total) for h in
                   range(incumbent.hits, incumbent.high + 1)}  # fmt: skip
        if outcome.accepted is None:
            assert len(answers) == 2 and outcome.tally == full
        else:
            assert answers == {outcome.accepted}


def test_finish_counts_only_the_unscored_examples(scored):
    scorer, model, full = scored
    labels = scorer.split("validation").label_batches()
    calls = {"n": 0}
    original = scorer._forward

    def forward(m, batch):
        calls["n"] += 1
        return original(m, batch)

    scorer._forward = forward
    try:
        outputs = scorer.outputs(model, "validation")
        calls["n"] = 0
        seen = sum(len(b) for b in labels[:3])
        # The first three batches hold the shortest examples (length buckets), not the first.
        split = scorer.split("validation")
        first = torch.arange(seen) if split.order is None else split.order[:seen]
        correct = int((outputs[first].argmax(-1) == split.labels[first]).sum())
        finished = scorer.finish(model, "validation", Tally(correct, seen, full.total))
    finally:
        del scorer._forward
    assert finished == full
    assert calls["n"] == len(labels) - 3


def reference_in_order(s, ranking, strict=False):
    """Recipe 1 in a given order with plain torch and full evaluations: the accepted indices."""
    sds = [load_state_dict(d) for d in s["dirs"]]
    val = s["splits"]["validation"]
    kept = [ranking[0]]
    best = accuracy(sds[ranking[0]], s["dirs"][0], val, s["tok"])
    for j in ranking[1:]:
        avg = {k: torch.stack([sds[i][k] for i in [*kept, j]]).mean(0) for k in sds[0]}
        score = accuracy(avg, s["dirs"][0], val, s["tok"])
        if score > best or (score == best and not strict):
            kept.append(j)
            best = score
    return kept


@pytest.fixture(scope="module")
def weak_first(tmp_path_factory, hub):
    """Three fine-tunes from one init: a barely trained one and two trained ones; in the seeded
    random order the weak one comes first, so candidates are accepted well before the end."""
    from greedy_fixtures import publish_sentiment
    from huggingface_hub import HfApi

    runs = [{"lr": 3e-3, "steps": 2}, {"lr": 3e-3}, {"lr": 5e-3}]
    return publish_sentiment(
        HfApi(endpoint=hub.url), tmp_path_factory.mktemp("weak"), runs,
        dataset="test-org/early-sentiment", prefix="test-org/early-ft", seeds=(4, 5, 6),
        sizes=(300, 200, 200), batch_size=8,
    )  # fmt: skip


@pytest.mark.parametrize("accept", [">=", ">"])
def test_early_acceptances_decide_like_full_evaluation(hub, weak_first, tmp_path, accept):
    ranking = list(range(3))
    random.Random(WEAK_SEED).shuffle(ranking)
    assert ranking[0] == 0
    result = hfsoup.soup(weak_first["repos"], output=tmp_path / "soup", method="greedy",
                         task=weak_first["task"], accept=accept, order="random",
                         seed=WEAK_SEED, progress=False)  # fmt: skip
    greedy = result.results["greedy"]
    kept = reference_in_order(weak_first, ranking, strict=accept == ">")
    assert greedy["accepted"] == [weak_first["repos"][i] for i in kept]
    early = [s for s in greedy["trace"] if s.get("stopped_early") == "accepted"]
    assert early, greedy["trace"]
    assert greedy["examples_saved_acceptances"] > 0
    total = len(weak_first["splits"]["validation"])
    for step in greedy["trace"][1:]:
        if step["score"] is not None:
            assert step["score"] == pytest.approx(step["tally"][0] / total, abs=1e-12)


@pytest.mark.parametrize(("accept", "order", "seed"),
                         [(">=", "score", 0), (">", "score", 0), (">=", "random", SEED),
                          (">", "random", SEED)])  # fmt: skip
def test_greedy_with_early_decisions_decides_like_full_evaluation(hub, sentiment, tmp_path,
                                                                  accept, order, seed):  # fmt: skip
    result = hfsoup.soup(sentiment["repos"], output=tmp_path / "soup", method="greedy",
                         task=small_batches(sentiment), accept=accept, order=order, seed=seed,
                         progress=False)  # fmt: skip
    if order == "score":
        kept, _ = reference_greedy(sentiment, strict=accept == ">")
    else:
        ranking = list(range(len(sentiment["repos"])))
        random.Random(seed).shuffle(ranking)
        kept = reference_in_order(sentiment, ranking, strict=accept == ">")
    greedy = result.results["greedy"]
    assert greedy["accepted"] == [sentiment["repos"][i] for i in kept]
    total = len(sentiment["splits"]["validation"])
    steps = greedy["trace"][1:]
    for step in steps:
        hits, seen, n = step["tally"]
        assert n == total and seen <= step["examples_scored"] <= total
        if step["score"] is None:  # never a made-up score: only what was counted
            assert seen < total and step["stopped_early"] in {"accepted", "rejected"}
        else:
            assert step["score"] == pytest.approx(hits / total, abs=1e-12)
    saved = greedy["examples_saved"]
    assert saved == greedy["examples_saved_rejections"] + greedy["examples_saved_acceptances"]
    assert greedy["examples_saved_rejections"] == sum(
        total - s["examples_scored"] for s in steps if not s["accepted"]
    )
    assert greedy["examples_saved_acceptances"] == sum(
        total - s["examples_scored"] for s in steps if s["accepted"]
    )
    # The last accepted step is the greedy soup: its score is known from the soup's scoring.
    last = [s for s in greedy["trace"] if s["accepted"]][-1]
    sel = result.results["table"]["greedy_soup"]["validation"]["accuracy"]
    assert last["score"] == pytest.approx(sel, abs=1e-12)


def test_single_ingredient_greedy_soup_reuses_its_outputs(hub, sentiment, tmp_path, monkeypatch):
    twice = [sentiment["repos"][0], sentiment["repos"][0]]
    live = {"n": 0}
    original = Scorer.outputs

    def counting(self, model, split, *, key=None):
        if key is None:
            live["n"] += 1
        return original(self, model, split, key=key)

    monkeypatch.setattr(Scorer, "outputs", counting)
    result = hfsoup.soup(twice, output=tmp_path / "gt", method="greedy", task=sentiment["task"],
                         accept=">", progress=False)  # fmt: skip
    table = result.results["table"]
    assert [s["accepted"] for s in result.results["greedy"]["trace"]] == [True, False]
    assert table["greedy_soup"] == table["best_individual"]
    assert live["n"] == 2  # the uniform soup's two splits only; the greedy soup was reused
