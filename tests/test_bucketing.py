"""Length-bucketed text batches: examples sorted by token length, each batch padded to its own
longest, outputs put back in dataset order; equal to dataset-order batches up to float noise,
and greedy decisions unchanged."""

from __future__ import annotations

import pytest
import torch
from factories import make_model, tiny_bert_config
from test_evaluation_data import make_tokenizer, text_dataset, text_task
from test_greedy_early import small_batches

import hfsoup
from hfsoup.tasks import preprocess
from hfsoup.tasks.classification import Scorer
from hfsoup.tasks.kinds import Tally
from hfsoup.tasks.preprocess import load_preprocessor


def greedy_run(sentiment, out, accept: str, order: str):
    """A greedy soup of the fixture's fine-tunes on small batches, outputs cache off."""
    return hfsoup.soup(sentiment["repos"], output=out, method="greedy",
                       task=small_batches(sentiment), accept=accept, order=order, seed=0,
                       progress=False, cache=False)  # fmt: skip


def pad_tokens(scorer: Scorer, split: str) -> int:
    return sum(int((b["attention_mask"] == 0).sum()) for b in scorer.split(split).batches)


@pytest.fixture(scope="module")
def scorers(sentiment):
    """The sentiment task (batches of 8) prepared with and without buckets, and a fine-tune."""
    from transformers import AutoModelForSequenceClassification

    task, folder = small_batches(sentiment), str(sentiment["dirs"][0])
    tok = load_preprocessor(folder, image=False)
    bucketed = Scorer(task, tok, progress=False)
    plain = Scorer(task, tok, progress=False, bucket=False)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    return bucketed, plain, model


def test_text_batches_are_sorted_by_token_length(scorers):
    bucketed, plain, _ = scorers
    split = bucketed.split("validation")
    assert plain.split("validation").order is None
    assert not torch.equal(split.order, torch.arange(split.size))  # the lengths do vary
    assert sorted(split.order.tolist()) == list(range(split.size))
    lengths = torch.cat([b["attention_mask"].sum(1) for b in split.batches])
    assert (lengths[1:] >= lengths[:-1]).all()


def test_each_bucketed_batch_is_padded_only_to_its_longest_example(scorers):
    bucketed, _, _ = scorers
    for batch in bucketed.split("validation").batches:
        assert int(batch["attention_mask"].sum(1).max()) == batch["input_ids"].shape[1]


def test_buckets_pad_fewer_tokens_for_the_same_real_tokens(scorers):
    bucketed, plain, _ = scorers
    real = [sum(int(b["attention_mask"].sum()) for b in s.split("validation").batches)
            for s in (bucketed, plain)]  # fmt: skip
    assert real[0] == real[1]
    assert pad_tokens(bucketed, "validation") < pad_tokens(plain, "validation") / 2


def test_bucketed_outputs_equal_dataset_order_outputs(scorers):
    bucketed, plain, model = scorers
    for split in ("validation", "test"):
        ours, theirs = bucketed.outputs(model, split), plain.outputs(model, split)
        assert ours.shape == theirs.shape == (bucketed.split(split).size, 2)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@torch.no_grad()
def test_bucketed_outputs_come_back_in_dataset_order(scorers, sentiment):
    bucketed, _, model = scorers
    rows = sentiment["splits"]["validation"]
    tok = sentiment["tok"]
    alone = torch.cat([model(**tok(r["text"], return_tensors="pt")).logits for r in rows])
    torch.testing.assert_close(bucketed.outputs(model, "validation"), alone, atol=1e-5, rtol=0)
    labels = torch.tensor([r["label"] for r in rows])
    assert torch.equal(bucketed.split("validation").labels, labels)


def test_label_batches_follow_the_bucketed_examples(scorers, sentiment):
    bucketed, _, _ = scorers
    split = bucketed.split("validation")
    tok = sentiment["tok"]
    rows = sentiment["splits"]["validation"]
    seen = [tok.decode(ids[mask.bool()], skip_special_tokens=True)
            for b in split.batches for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True)]  # fmt: skip
    labels = torch.cat(split.label_batches()).tolist()
    by_text = {}
    for r in rows:
        by_text.setdefault(r["text"], set()).add(r["label"])
    assert len(seen) == len(labels) == len(rows)
    assert all(label in by_text[text] for text, label in zip(seen, labels, strict=True))


def test_an_early_stop_counts_the_examples_it_scored(scorers):
    """A stop after the first batches (in length order) counts exactly those examples."""
    bucketed, _, model = scorers
    split = bucketed.split("validation")
    predictions = bucketed.outputs(model, "validation").argmax(-1)
    correct = (predictions == split.labels)[split.order]  # in batch order
    total = split.size
    stopped = 0
    for incumbent in (Tally(total, total, total), Tally(0, total, total)):
        outcome = bucketed.score_against(model, "validation", incumbent)
        assert outcome.tally.hits == int(correct[: outcome.examples_scored].sum())
        stopped += outcome.examples_scored < total
    assert stopped  # at least the certain acceptance (against 0 hits) stops after one batch


def test_two_column_text_is_bucketed_by_the_pair_length(tmp_path):
    data = text_dataset(tmp_path / "data", {"validation": 30, "test": 5}, pairs=True)
    task = text_task(data, input_columns=["sentence", "sentence2"], batch_size=4)
    tok = make_tokenizer()
    model = make_model(tiny_bert_config(), seed=3).eval()
    bucketed, plain = (
        Scorer(task, tok, progress=False),
        Scorer(task, tok, progress=False, bucket=False),
    )
    assert pad_tokens(bucketed, "validation") < pad_tokens(plain, "validation")
    torch.testing.assert_close(
        bucketed.outputs(model, "validation"), plain.outputs(model, "validation"), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(("accept", "order"), [(">=", "score"), (">", "random")])
def test_greedy_decides_the_same_with_and_without_buckets(
    hub, sentiment, tmp_path, monkeypatch, accept, order
):
    runs = {}
    for bucket in (True, False):
        monkeypatch.setattr(preprocess, "_BUCKET_TEXT", bucket)
        result = greedy_run(sentiment, tmp_path / f"soup-{bucket}", accept, order)
        runs[bucket] = result.results
    on, off = runs[True]["greedy"], runs[False]["greedy"]
    assert on["accepted"] == off["accepted"]
    assert [s["accepted"] for s in on["trace"]] == [s["accepted"] for s in off["trace"]]
    assert len(on["accepted"]) < len(sentiment["repos"])  # some rejection was decided
    for step_on, step_off in zip(on["trace"], off["trace"], strict=True):
        if step_on["score"] is not None and step_off["score"] is not None:
            assert step_on["score"] == step_off["score"]  # counts of the same examples
    table_on, table_off = runs[True]["table"], runs[False]["table"]
    for row in ("best_individual", "uniform_soup", "greedy_soup"):
        for split, scores in table_off[row].items():
            assert table_on[row][split] == pytest.approx(scores, abs=1e-12)


# -- scoring order for early decisions: the examples the ingredients miss first ----------------
@pytest.fixture(scope="module")
def ingredient_outputs(sentiment, scorers):
    from transformers import AutoModelForSequenceClassification

    _, plain, _ = scorers
    models = [
        AutoModelForSequenceClassification.from_pretrained(d).eval() for d in sentiment["dirs"]
    ]
    return [plain.outputs(m, "validation") for m in models]


def test_hardest_first_scores_the_most_missed_examples_first(sentiment, ingredient_outputs):
    tok = load_preprocessor(str(sentiment["dirs"][0]), image=False)
    scorer = Scorer(small_batches(sentiment), tok, progress=False)
    scorer.put_hardest_first(ingredient_outputs)
    split = scorer.split("validation")
    labels = torch.tensor([r["label"] for r in sentiment["splits"]["validation"]])
    missed = sum((o.argmax(-1) != labels).long() for o in ingredient_outputs)  # per example
    in_order = missed[split.order]
    assert (in_order[1:] <= in_order[:-1]).all()
    assert in_order[0] > 0 and in_order[-1] == 0  # some examples are missed, some never
    assert torch.equal(torch.cat(split.label_batches()), labels[split.order])


def test_hardest_first_outputs_still_come_back_in_dataset_order(
    sentiment, scorers, ingredient_outputs
):
    _, plain, model = scorers
    tok = load_preprocessor(str(sentiment["dirs"][0]), image=False)
    scorer = Scorer(small_batches(sentiment), tok, progress=False)
    scorer.put_hardest_first(ingredient_outputs)
    ours, theirs = scorer.outputs(model, "validation"), plain.outputs(model, "validation")
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("accept", "order"), [(">=", "score"), (">", "random")])
def test_hardest_first_decides_like_a_full_evaluation(
    hub, sentiment, tmp_path, monkeypatch, accept, order
):
    import random

    from test_greedy import reference_greedy
    from test_greedy_early import reference_in_order

    from hfsoup.methods import greedy

    if order == "score":
        kept, _ = reference_greedy(sentiment, strict=accept == ">")
    else:
        ranking = list(range(len(sentiment["repos"])))
        random.Random(0).shuffle(ranking)
        kept = reference_in_order(sentiment, ranking, strict=accept == ">")
    scored = {}
    for first in (True, False):
        monkeypatch.setattr(greedy, "_HARDEST_FIRST", first)
        result = greedy_run(sentiment, tmp_path / f"soup-{first}", accept, order)
        g = result.results["greedy"]
        assert g["accepted"] == [sentiment["repos"][i] for i in kept]
        assert ("order_examples" in result.results["timings"]) == first
        scored[first] = g["examples_scored"]
    assert scored[True] <= scored[False], scored
