"""Scorer: outputs, scores, exact early rejection, ensembles, label alignment."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from factories import make_model, perturbed, tiny_bert_config, tiny_vit_config
from test_evaluation_data import make_tokenizer, sentences, text_dataset, text_task, write_split

from hfsoup.check.labels import label_permutation
from hfsoup.errors import IncompatibleIngredientsError
from hfsoup.tasks.classification import Scorer, required_count
from hfsoup.tasks.ensemble import ensemble, greedy_ensemble, reaches

N_SELECTION = 24


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Millisecond-sized models run fastest on one thread; two spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    return text_dataset(folder, {"validation": N_SELECTION, "test": 10})


@pytest.fixture(scope="module")
def scorer(text_data):
    return Scorer(text_task(text_data, batch_size=3), make_tokenizer(), progress=False)


@pytest.fixture(scope="module")
def models():
    """Five 'fine-tunes' of one tiny BERT (in eval mode, as from_pretrained leaves them)."""
    return [perturbed(make_model(tiny_bert_config()), seed, scale=0.5).eval() for seed in range(5)]


def _accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    return float(np.mean(outputs.argmax(-1).numpy() == labels.numpy()))


# -- outputs and scores ----------------------------------------------------------------------------
def test_logits_equal_one_unpadded_forward_per_example(scorer, models):
    model, tokenizer = models[0], make_tokenizer()
    outputs = scorer.logits(model, "validation")
    with torch.no_grad():
        expected = torch.cat(
            [model(**tokenizer(s, return_tensors="pt")).logits for s in sentences(N_SELECTION, 0)]
        )
    assert outputs.dtype == torch.float32 and outputs.device.type == "cpu"
    torch.testing.assert_close(outputs, expected, atol=1e-5, rtol=1e-5)


def test_logits_leave_the_model_in_its_training_mode(scorer, models):
    models[0].train()
    scorer.logits(models[0], "test")
    assert models[0].training
    models[0].eval()


def test_cached_logits_are_computed_once_per_key_and_split(scorer, models):
    calls = []
    handle = models[1].register_forward_hook(lambda *_: calls.append(1))
    try:
        first = scorer.logits(models[1], "test", key="ft-1")
        assert scorer.logits(models[1], "test", key="ft-1") is first
        scorer.logits(models[1], "validation", key="ft-1")
    finally:
        handle.remove()
    assert len(calls) == 4 + 8  # 10 test examples in batches of 3, then 24 selection examples
    assert set(scorer.cache) >= {("ft-1", "test"), ("ft-1", "validation")}


def test_scores_match_sklearn(text_data, models):
    from sklearn.metrics import accuracy_score, f1_score

    task = text_task(text_data, metrics=["f1", "accuracy"])
    scorer = Scorer(task, make_tokenizer(), progress=False)
    outputs = scorer.logits(models[2], "test")
    labels, predictions = scorer.split("test").labels.numpy(), outputs.argmax(-1).numpy()
    assert scorer.scores(outputs, "test") == pytest.approx(
        {"f1": f1_score(labels, predictions), "accuracy": accuracy_score(labels, predictions)}
    )


def test_single_output_is_scored_as_regression(tmp_path):
    from scipy import stats

    rng = np.random.default_rng(0)
    files = {
        split: write_split(
            tmp_path / f"{split}.parquet",
            {"sentence": sentences(12, i), "label": rng.uniform(0, 5, 12).round(2).tolist()},
        )
        for i, split in enumerate(("validation", "test"))
    }
    task = text_task({"path": "parquet", "data_files": files}, metrics=["pearsonr", "spearmanr"])
    scorer = Scorer(task, make_tokenizer(), progress=False)
    model = make_model(tiny_bert_config(num_labels=1, problem_type="regression")).eval()
    outputs = scorer.logits(model, "test")
    assert outputs.shape == (12, 1)
    predictions, labels = (
        outputs[:, 0].double().numpy(),
        scorer.split("test").labels.double().numpy(),
    )
    assert scorer.scores(outputs, "test") == pytest.approx(
        {
            "pearsonr": stats.pearsonr(predictions, labels)[0],
            "spearmanr": stats.spearmanr(predictions, labels)[0],
        },
        rel=1e-6,
    )


def test_image_task_is_scored_through_the_image_processor(tmp_path):
    import datasets
    from PIL import Image
    from transformers import ViTImageProcessor

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(9)]
    labels = rng.integers(0, 3, 9).tolist()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(3)})
    files = {
        s: write_split(tmp_path / f"{s}.parquet", {"image": images, "label": labels}, features)
        for s in ("validation", "test")
    }
    task = text_task(
        {"path": "parquet", "data_files": files}, input_columns=["image"], batch_size=4
    )
    processor = ViTImageProcessor(size={"height": 8, "width": 8})
    scorer = Scorer(task, processor, progress=False)
    model = make_model(tiny_vit_config(num_labels=3)).eval()
    outputs = scorer.logits(model, "test")
    with torch.no_grad():
        expected = model(**processor(images=images, return_tensors="pt")).logits
    torch.testing.assert_close(outputs, expected, atol=1e-5, rtol=1e-5)
    predictions = expected.argmax(-1).numpy()
    assert scorer.scores(outputs, "test") == {"accuracy": float(np.mean(predictions == labels))}


def test_scorer_from_a_saved_model_uses_its_tokenizer(tmp_path, text_data, models):
    models[0].save_pretrained(tmp_path / "ft")
    make_tokenizer().save_pretrained(tmp_path / "ft")
    scorer = Scorer.from_pretrained(text_task(text_data), str(tmp_path / "ft"), progress=False)
    outputs = scorer.logits(models[0], "test")
    assert scorer.scores(outputs, "test") == {
        "accuracy": _accuracy(outputs, scorer.split("test").labels)
    }


# -- exact early rejection -------------------------------------------------------------------------
def test_required_count_is_the_least_count_whose_accuracy_reaches():
    for total in range(1, 60):
        ratios = [np.mean([1.0] * c + [0.0] * (total - c)) for c in range(total + 1)]
        for c in range(total + 1):
            for threshold in (
                c / total,
                math.nextafter(c / total, 2),
                math.nextafter(c / total, -1),
            ):
                for strict in (False, True):
                    expected = next(
                        (k for k, r in enumerate(ratios) if reaches(r, threshold, strict=strict)),
                        total + 1,
                    )
                    assert required_count(threshold, total, strict=strict) == expected


def test_early_rejection_decides_like_a_full_evaluation(scorer, models):
    model = models[3]
    full = scorer.selection_score(scorer.logits(model, "validation"))
    correct = round(full * N_SELECTION)
    # Decisions flip at the ties near the model's own count: each, and the floats either side.
    ties = [c / N_SELECTION for c in range(max(correct - 3, 0), min(correct + 4, N_SELECTION + 1))]
    near = [math.nextafter(t, d) for t in ties for d in (-1, 2)]
    spread = np.random.default_rng(0).uniform(0, 1, 10).tolist()  # early stops at various batches
    for threshold in [*ties, *near, *spread, -1.0, 1.5]:
        for strict in (False, True):
            early = scorer.score_with_early_stop(model, "validation", threshold, strict=strict)
            decided = reaches(early.score, threshold, strict=strict)
            assert decided == reaches(full, threshold, strict=strict), (threshold, strict)
            assert early.score is None or early.score == full


def test_early_rejection_scores_fewer_examples_when_clearly_worse(scorer, models):
    full = scorer.selection_score(scorer.logits(models[0], "validation"))
    assert full < 0.9
    result = scorer.score_with_early_stop(models[0], "validation", threshold=1.0)
    assert result.score is None and result.examples_scored < N_SELECTION
    assert result.examples_scored % 3 == 0  # stops at a batch boundary


def test_a_candidate_that_can_still_reach_is_scored_in_full(scorer, models):
    full = scorer.selection_score(scorer.logits(models[0], "validation"))
    assert scorer.score_with_early_stop(models[0], "validation", full)[:2] == (full, N_SELECTION)


def test_metric_that_is_not_a_mean_is_scored_in_full(text_data, models):
    task = text_task(text_data, metrics=["matthews_correlation"], batch_size=3)
    scorer = Scorer(task, make_tokenizer(), progress=False)
    result = scorer.score_with_early_stop(models[0], "validation", threshold=2.0)
    assert result.examples_scored == N_SELECTION and result.score is not None


# -- ensembles -------------------------------------------------------------------------------------
def test_ensemble_is_the_mean_of_softmax_probabilities():
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(6, 3)) for _ in range(4)]
    probabilities = [np.exp(z) / np.exp(z).sum(axis=1, keepdims=True) for z in logits]
    result = ensemble([torch.tensor(z, dtype=torch.float32) for z in logits])
    np.testing.assert_allclose(result.numpy(), np.mean(probabilities, axis=0), rtol=1e-5)


def test_regression_ensemble_is_the_mean_of_outputs():
    outputs = [torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [0.0]])]
    assert ensemble(outputs).tolist() == [[2.0], [1.0]]


def _constructed_models() -> tuple[list[torch.Tensor], torch.Tensor]:
    """Ten examples of class 0; each model as log-probabilities of class 0 per example."""
    a = [0.6] * 8 + [0.45] * 2  # 0.8, the best
    b = [0.01] * 3 + [0.99] * 7  # 0.7, confidently wrong where a is right: a+b scores 0.7
    c = [0.55] * 4 + [0.45] * 4 + [0.9] * 2  # 0.6, right where a is wrong: a+c scores 1.0
    outputs = [
        torch.tensor(np.log([[p, 1 - p] for p in m]), dtype=torch.float32) for m in (c, a, b)
    ]
    return outputs, torch.zeros(10, dtype=torch.int64)


def test_greedy_ensemble_adds_models_that_do_not_lower_the_score():
    outputs, labels = _constructed_models()
    score = lambda o: _accuracy(o, labels)  # noqa: E731
    assert [score(o) for o in outputs] == [0.6, 0.8, 0.7]
    assert score(ensemble([outputs[1], outputs[2]])) == 0.7
    assert score(ensemble([outputs[1], outputs[0]])) == 1.0
    assert greedy_ensemble(outputs, score) == [1, 0]


def test_greedy_ensemble_ties_join_with_ge_but_not_when_strict():
    outputs, labels = _constructed_models()
    score = lambda o: _accuracy(o, labels)  # noqa: E731
    twin = [outputs[1], outputs[1].clone()]
    assert greedy_ensemble(twin, score) == [0, 1]
    assert greedy_ensemble(twin, score, strict=True) == [0]


def test_scorer_greedy_ensemble_uses_the_selection_split(scorer, models):
    outputs = [scorer.logits(m, "validation") for m in models]
    labels = scorer.split("validation").labels
    expected = greedy_ensemble(outputs, lambda o: _accuracy(o, labels))
    assert scorer.greedy_ensemble(outputs) == expected


# -- label alignment -------------------------------------------------------------------------------
def test_identical_labels_need_no_permutation():
    assert label_permutation({0: "neg", 1: "pos"}, {"0": "neg", "1": "pos"}) is None


def test_reordered_labels_give_the_permutation_that_aligns_head_rows():
    reference = make_model(tiny_bert_config(num_labels=3))
    names = dict(reference.config.id2label)
    order = [2, 0, 1]  # other's id i holds reference's label order[i]
    other_id2label = {i: names[order[i]] for i in range(3)}
    other_rows = reference.classifier.weight.detach()[order]
    perm = label_permutation(names, other_id2label)
    assert perm == [1, 2, 0]
    torch.testing.assert_close(other_rows[perm], reference.classifier.weight.detach())


def test_different_label_sets_are_incompatible():
    with pytest.raises(IncompatibleIngredientsError, match="different labels"):
        label_permutation({0: "neg", 1: "pos"}, {0: "neg", 1: "neutral"})


def test_repeated_label_is_incompatible():
    with pytest.raises(IncompatibleIngredientsError, match="repeats"):
        label_permutation({0: "neg", 1: "pos"}, {0: "neg", 1: "neg"})
