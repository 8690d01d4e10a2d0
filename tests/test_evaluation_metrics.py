"""Metrics: Hub first, bundled fallback with a notice, no hijack from the working directory."""

from __future__ import annotations

import shutil
import socket
import uuid
from pathlib import Path

import numpy as np
import pytest

from hfsoup.errors import TaskError
from hfsoup.tasks.metrics import (
    bundled_metrics,
    compute,
    is_mean_over_examples,
    load_metric,
    metric_value,
)

WRONG_ACCURACY = """
import datasets
import evaluate


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="a planted module that must never be picked up",
            citation="",
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references):
        return {"accuracy": -1.0}
"""


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """The Hub cannot be reached and holds no cached metric module.

    evaluate's Space URLs point at a port nothing listens on; cached canonical metrics (other
    tests may have loaded some from the test Hub) are moved aside for the test's duration.
    """
    import evaluate

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/spaces/{{path}}/resolve/{{revision}}/{{name}}"
    monkeypatch.setattr(evaluate.config, "HUB_EVALUATE_URL", url)
    cache = Path(evaluate.config.HF_MODULES_CACHE, evaluate.config.MODULE_NAME_FOR_DYNAMIC_MODULES)
    cached = list((cache / "metrics").glob("evaluate-metric--*"))
    aside = tmp_path / "cached-metrics"
    aside.mkdir()
    for folder in cached:
        shutil.move(folder, aside / folder.name)
    yield
    for folder in cached:
        shutil.move(aside / folder.name, folder)


def _reference_values(name: str, predictions: np.ndarray, references: np.ndarray) -> float:
    from scipy import stats
    from sklearn import metrics

    return {
        "accuracy": lambda: metrics.accuracy_score(references, predictions),
        "f1": lambda: metrics.f1_score(references, predictions),
        "matthews_correlation": lambda: metrics.matthews_corrcoef(references, predictions),
        # the metrics take float32 inputs; scipy then computes in float64
        "pearsonr": lambda: stats.pearsonr(predictions.astype(float), references.astype(float))[0],
        "spearmanr": lambda: stats.spearmanr(predictions, references)[0],
    }[name]()


def test_hfsoup_bundles_the_glue_metrics():
    assert bundled_metrics() == ["accuracy", "f1", "matthews_correlation", "pearsonr", "spearmanr"]


@pytest.mark.parametrize(
    "name", ["accuracy", "f1", "matthews_correlation", "pearsonr", "spearmanr"]
)
def test_bundled_copy_is_used_when_the_hub_is_unreachable(name, unreachable_hub, caplog):
    rng = np.random.default_rng(0)
    if name in ("pearsonr", "spearmanr"):
        references = rng.normal(size=200).astype(np.float32)
        predictions = (references + rng.normal(size=200)).round(1).astype(np.float32)  # ties
    else:
        references = rng.integers(0, 2, 200)
        predictions = np.where(rng.random(200) < 0.7, references, 1 - references)
    metric = load_metric(name)
    notice = [r.getMessage() for r in caplog.records if r.name == "hfsoup"]
    assert notice == [
        f"metric '{name}': not reachable on the Hub (ConnectionError); using hfsoup's bundled copy"
    ]
    value = metric_value(name, compute(metric, predictions, references))
    assert value == pytest.approx(_reference_values(name, predictions, references), abs=1e-9)


def test_bundled_f1_macro_matches_sklearn_on_three_classes(unreachable_hub):
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(1)
    references, predictions = rng.integers(0, 3, 100), rng.integers(0, 3, 100)
    result = compute(load_metric("f1"), predictions, references, average="macro")
    assert result["f1"] == pytest.approx(f1_score(references, predictions, average="macro"))


def test_bundled_matthews_handles_constant_predictions(unreachable_hub):
    result = compute(load_metric("matthews_correlation"), [1, 1, 1, 1], [0, 1, 0, 1])
    assert result == {"matthews_correlation": 0.0}


def test_accuracy_is_the_exact_ratio_of_counts(unreachable_hub):
    # Exact early rejection relies on accuracy being one float division correct / n.
    rng = np.random.default_rng(2)
    metric = load_metric("accuracy")
    for n in (7, 49, 103):
        references = rng.integers(0, 2, n)
        for correct in range(n + 1):
            predictions = references.copy()
            predictions[correct:] = 1 - predictions[correct:]
            assert compute(metric, predictions, references)["accuracy"] == correct / n


def test_working_directory_does_not_hijack_a_metric_name(tmp_path, monkeypatch):
    import evaluate

    monkeypatch.chdir(tmp_path)
    for folder in (tmp_path / "accuracy", tmp_path / "evaluate-metric" / "accuracy"):
        folder.mkdir(parents=True)
        (folder / "accuracy.py").write_text(WRONG_ACCURACY)
    # The trap is real: evaluate itself runs the planted module.
    assert evaluate.load("accuracy").compute(predictions=[1], references=[1]) == {"accuracy": -1.0}
    metric = load_metric("accuracy")
    assert compute(metric, [1, 0, 1, 1], [1, 1, 1, 1]) == {"accuracy": 0.75}


def test_a_metric_on_the_hub_is_preferred_to_the_bundled_copy(api, capsys):
    name = f"hits_{uuid.uuid4().hex[:8]}"
    space = f"test-org/{name}"
    api.create_repo(space, repo_type="space", space_sdk="static")
    script = WRONG_ACCURACY.replace("class Accuracy", "class Hits").replace(
        'return {"accuracy": -1.0}',
        'return {"hits": float(sum(p == r for p, r in zip(predictions, references)))}',
    )
    api.upload_file(
        path_or_fileobj=script.encode(), path_in_repo=f"{name}.py", repo_id=space, repo_type="space"
    )
    metric = load_metric(space)
    assert compute(metric, [1, 0, 1], [1, 1, 1]) == {"hits": 2.0}
    assert "bundled" not in capsys.readouterr().err


def test_unknown_metric_without_a_bundled_copy_is_a_task_error(unreachable_hub):
    with pytest.raises(TaskError, match="'bleu' could not be loaded from the Hub"):
        load_metric("bleu")


def test_community_metric_is_not_replaced_by_a_bundled_namesake(unreachable_hub):
    with pytest.raises(TaskError, match="ships no copy"):
        load_metric("someone/accuracy")


def test_only_accuracy_is_a_mean_over_examples():
    assert is_mean_over_examples("accuracy") and is_mean_over_examples("evaluate-metric/accuracy")
    assert not any(map(is_mean_over_examples, ["f1", "matthews_correlation", "pearsonr"]))
