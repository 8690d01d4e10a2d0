"""The public Python API; the CLI is a thin shell over these functions.

>>> import hfsoup
>>> hfsoup.soup(["org/ft-1", "org/ft-2@v1"], output="out/soup")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hfsoup.compute.distributed import processes
from hfsoup.compute.placement import plan_placement
from hfsoup.dtypes import SCORE_DTYPES
from hfsoup.errors import IncompatibleIngredientsError, RecipeError
from hfsoup.ingredients import to_entry as _entry
from hfsoup.io.tensors import IngredientIndex
from hfsoup.pipeline import (
    DTYPES,
    IngredientLike,
    RunOptions,
    SoupResult,
    checked,
    load_ingredients,
    memory_budgets,
    push,
    resolve_device,
    run_recipe,
)
from hfsoup.recipe import OutputConfig, Recipe, build_recipe, load_recipe
from hfsoup.report.outputs import hardware_record
from hfsoup.report.outputs import pin_recipe as pin_recipe  # importable from here, as before
from hfsoup.units import parse_size
from hfsoup.untrusted import check_soup_recipe

if TYPE_CHECKING:
    from hfsoup.check.doctor import Examination, Finding


@dataclass
class Inspection:
    """What ``inspect`` found: each ingredient's pin and size, and whether they can be souped."""

    ingredients: list[IngredientIndex]
    compatible: bool
    problem: str | None = None
    # The doctor's report (hfsoup.check.doctor): tokenizers, labels, layouts, sizes, estimates.
    examination: Examination | None = None

    @property
    def findings(self) -> list[Finding]:
        """Errors, warnings and notes across the ingredients (see :mod:`hfsoup.check.doctor`)."""
        return self.examination.findings if self.examination else []

    @property
    def estimate(self) -> dict[str, Any]:
        """Download size, peak memory and time of the chosen method (an estimate)."""
        return self.examination.estimate if self.examination else {}

    def to_dict(self) -> dict[str, Any]:
        rows = [_describe(ix) for ix in self.ingredients]
        if self.examination is None:
            return {"compatible": self.compatible, "problem": self.problem, "ingredients": rows}
        details = self.examination.details
        return {
            "compatible": self.compatible,
            "problem": self.problem,
            "ingredients": [{**r, **d} for r, d in zip(rows, details, strict=True)],
            "findings": [f.to_dict() for f in self.findings],
            "estimate": self.estimate,
        }


def _describe(ix: IngredientIndex) -> dict[str, Any]:
    spec = ix.ingredient.spec
    return {
        "ingredient": spec.label,
        "repo": spec.repo or str(spec.path),
        "revision": spec.revision,
        "sha": ix.ingredient.sha,
        "parameters": ix.num_parameters,
        "bytes": ix.nbytes,
        "dtypes": sorted({t.dtype for t in ix.tensors.values()}),
        "model_type": ix.config.get("model_type"),
        "architectures": ix.config.get("architectures"),
        "format": "pickle" if ix.pickle else "safetensors",
    }


def inspect(
    ingredients: Sequence[IngredientLike], *, token: str | None = None, allow_pickle: bool = False,
    method: str = "uniform", bandwidth: str | int | None = None, dtype: str | None = None,
    max_shard_size: str | int = "5GB", base: IngredientLike | None = None,
    combine: str | None = None, scored: bool = False,
) -> Inspection:  # fmt: skip
    """Resolve ingredients and examine them from listings, headers and small files alone.

    No weight byte is read: compatibility (tensors, shapes, labels, ``model_type``), the
    tokenizers (a token with another id in one ingredient makes them incompatible), label
    maps, layout files, dtypes, download size, and the peak memory and time a ``method`` soup
    would take on this machine (an estimate; see :mod:`hfsoup.check.doctor`).

    Args:
        method: ``uniform``, ``greedy`` or ``learned``: the soup to estimate for.
        bandwidth: bytes per second from the Hub (``"100MB"`` or ``"100MB/s"``); default an
            assumed 50 MB/s.
        dtype / max_shard_size: the output options, as for :func:`soup`.
        base: the base model θ₀ of a task-vector merge or of a greedy soup with ``combine``
            (its download and its float32 copy are counted; checked to fit the ingredients).
        combine: the greedy soup's operator (``task_arithmetic``, ``ties``, ``dare_ties``).
        scored: a task-vector merge scored on a task (its coefficient search holds θ₀ and
            the merged task vector τ in float32 beside the live model).

    Raises:
        RecipeError: an unknown method, an unreadable size, a base missing for a method that
            needs one or given to one that takes none, ``combine`` for a method without it.

    Example:
        >>> hfsoup.inspect(["org/ft-1", "org/ft-2"]).compatible  # doctest: +SKIP
        True
        >>> est = hfsoup.inspect(["org/ft-1", "org/ft-2"], method="ties",  # doctest: +SKIP
        ...                      base="org/pretrained", scored=True).estimate
    """
    from hfsoup.check.doctor import examine
    from hfsoup.registry import estimable_methods, get_method

    estimate = get_method(method).estimate  # RecipeError: an unknown method
    if estimate is None:
        known = ", ".join(estimable_methods())
        raise RecipeError(f"method {method!r} has no estimate yet (inspect estimates {known})")
    if dtype is not None and dtype not in DTYPES:
        raise RecipeError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if isinstance(bandwidth, str):
        bandwidth = bandwidth.strip().removesuffix("/s")  # "100MB/s" reads as "100MB"
    sizes = {"max_shard_size": max_shard_size, "bandwidth": bandwidth}
    for key, value in sizes.items():
        try:
            sizes[key] = None if value is None else parse_size(value)
        except ValueError as exc:
            raise RecipeError(f"{key}: {exc}") from exc
    _check_inspected_base(get_method(method), base, combine)
    indexes = load_ingredients(ingredients, token=token, allow_pickle=allow_pickle)
    problem = None
    try:
        # Aligned copies (label rows permuted), so the report sees labels in another order.
        indexes = checked(indexes)
    except IncompatibleIngredientsError as exc:
        problem = str(exc)
    base_index = None
    if base is not None:
        from hfsoup.check.compat import check_base

        (base_index,) = load_ingredients([base], token=token, allow_pickle=allow_pickle)
        try:
            check_base(base_index, indexes)
        except IncompatibleIngredientsError as exc:
            problem = problem or str(exc)
    examination = examine(indexes, method=method, estimate=estimate, bandwidth=sizes["bandwidth"],
                          max_shard_size=sizes["max_shard_size"],
                          dtype=DTYPES[dtype] if dtype else None, base=base_index,
                          scored=scored, combine=combine)  # fmt: skip
    problem = problem or examination.tokenizer_problem
    return Inspection(indexes, compatible=problem is None, problem=problem,
                      examination=examination)  # fmt: skip


def _check_inspected_base(method: Any, base: Any, combine: str | None) -> None:
    """Refuse, as a soup would, a base or ``combine`` that ``method`` does not take."""
    from hfsoup.methods.greedy_soup import COMBINE_OPERATORS as allowed

    takes = set(method.config.model_fields) if method.config else set()
    if combine is not None:
        if "combine" not in takes:
            raise RecipeError(f"combine does not apply to method {method.name!r}",
                              options=["combine"])  # fmt: skip
        if combine not in allowed:
            raise RecipeError(f"combine must be one of {', '.join(allowed)}, got {combine!r}",
                              options=["combine"])  # fmt: skip
    needs = combine not in (None, "average") if "combine" in takes else method.needs_base
    if needs != (base is not None):
        raise RecipeError(
            f"method {method.name!r} needs a base model θ₀: set base" if needs
            else f"method {method.name!r} takes no base model here; drop base",
            options=["base"],
        )  # fmt: skip


def soup(
    ingredients: Sequence[IngredientLike],
    *,
    output: str | Path,
    method: str = "uniform",
    weights: Sequence[float] | None = None,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    task: Any = None,
    accept: str = ">=",
    order: str = "score",
    seed: int = 0,
    name: str | None = None,
    push_to: str | None = None,
    private: bool = False,
    learned: dict[str, Any] | None = None,
    merge: dict[str, Any] | None = None,
    output_adapter: bool = False,
    rank: int | None = None,
    **options: Any,
) -> SoupResult:
    """Make a soup of ``ingredients`` and write it to ``output`` (optionally push it).

    Args:
        ingredients: ``"org/name"``, ``"org/name@revision"``, local directories, or
            ``{"repo", "revision", "weight"}`` mappings.
        output: the folder to write; it must be empty or absent unless ``overwrite=True``.
        method: ``"uniform"`` (this release), ``"greedy"`` or ``"learned"``.
        weights: per-ingredient mixing weights, normalised to sum to 1.
        dtype: output dtype for float tensors; default: the ingredients' own.
        max_shard_size: bytes per output shard (``"5GB"``, ``"500MiB"`` or an int).
        push_to: a Hub repo ID to upload the soup to, in one commit.
        learned: for ``method="learned"``: ``by_layer``, ``path`` (``auto``, ``memory``,
            ``stream``), ``epochs``, ``lr``, ``batch_size``, ``param`` (``softmax``, ``free``).
        merge: for the task-vector methods (``task_arithmetic``, ``ties``, ``dare_linear``,
            ``dare_ties``, ``wise_ft``): the recipe keys ``base`` (an ingredient), ``lambda``,
            ``density``, ``alpha``.
        output_adapter: for LoRA adapter ingredients: write one adapter (of ``rank``; default
            the largest of theirs) instead of the full merged model.
        options: ``overwrite``, ``device``, ``token``, ``allow_pickle``, ``allow_nonfinite``,
            ``resume``, ``accumulate``,
            ``progress``, ``memory_budget``, ``cache`` (see :func:`run`).

    Returns:
        A :class:`SoupResult`.

    Raises:
        HfsoupError: any failure a user can cause; nothing is left half-written.
    """
    entries = [_entry(i) for i in ingredients]
    if merge and merge.get("base") is not None:
        merge = {**merge, "base": _entry(merge["base"])}
    if weights is not None:
        if len(weights) != len(entries):
            raise RecipeError(f"got {len(weights)} weights for {len(entries)} ingredients")
        entries = [{**e, "weight": w} for e, w in zip(entries, weights, strict=True)]
    recipe = build_recipe(
        {
            "name": name,
            "method": method,
            "accept": accept,
            "order": order,
            "seed": seed,
            "ingredients": entries,
            "task": task,
            **({"learned": learned} if learned is not None else {}),
            **(merge or {}),
            "output": {
                "dir": str(output),
                "dtype": dtype,
                "max_shard_size": max_shard_size,
                "push_to": push_to,
                "private": private,
                "adapter": output_adapter,
                "rank": rank,
            },  # fmt: skip
        },
        where="options",
    )
    return run(recipe, **options)


def run(
    recipe: str | Path | Recipe,
    *,
    output: str | Path | None = None,
    push_to: str | None = None,
    private: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    token: str | None = None,
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
    resume: bool = False,
    accumulate: str = "float32",
    progress: bool = True,
    max_in_flight: int | None = None,
    memory_budget: str | int | None = None,
    device_map: str | None = None,
    max_memory: str | list[str] | dict | None = None,
    score_dtype: str = "float32",
    allow_local: bool = False,
    cache: bool | None = None,
) -> SoupResult:
    """Run a recipe (a YAML file, a soup's README.md, or a :class:`Recipe`).

    A recipe from a soup (its ``README.md`` or ``hfsoup_recipe.yaml``) writes only to
    ``output`` (required), pushes only to ``push_to`` given here, reads only from the Hub unless
    ``allow_local``, and is announced (what it reads and writes) on the ``hfsoup`` logger
    before anything is read; see :mod:`hfsoup.untrusted`.

    Args:
        output / push_to: override the recipe's ``output.dir`` / ``output.push_to``.
        private: create the pushed repo as private (else ``output.private`` decides).
        allow_local: let a recipe from a soup name local ingredient folders, local datasets,
            data files, dataset options and metric scripts.
        overwrite: replace a non-empty output folder.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``. Under
            ``accelerate launch``, ``auto`` is each process's own GPU.
        device_map: ``auto``, ``balanced`` or ``sequential``: spread the scored model and its
            running sum over the visible GPUs with accelerate, spilling to the CPU (see
            :mod:`hfsoup.compute.placement`); the uniform soup's accumulators follow the same map.
        max_memory: per-device budgets for ``device_map``, accelerate's syntax
            (``"0=20GiB,cpu=64GiB"``, a list of such items, or ``{0: "20GiB"}``).
        score_dtype: ``float32`` (default), ``bfloat16`` or ``float16`` for the scored model;
            the running sums stay float32.
        token: Hub token; default ``HF_TOKEN`` or the stored login.
        allow_pickle: accept ``pytorch_model.bin`` ingredients (``weights_only=True``).
        allow_nonfinite: average weights holding NaN/Inf instead of refusing them (recorded in
            the recipe, like the recipe key of the same name).
        resume: continue an interrupted greedy run of this recipe; an error if there is none
            (an identical rerun resumes anyway; this makes it explicit).
        accumulate: ``float32`` (default) or ``float64`` running sums.
        progress: show progress bars.
        max_in_flight: bytes of reads allowed ahead of the arithmetic (default 32 MiB); peak
            memory is about one 8 MiB chunk plus this, whatever the model, shard size or k.
        memory_budget: learned soups: plan against this many bytes (``"8GB"``) instead of the
            memory available on the device.
        cache: the HF cache (files already there for the pinned SHA are always read from
            disk): ``None`` (default) writes into it the files read whole anyway (greedy and
            learned soups, configs, tokenizers); ``True`` also the weight files a uniform soup
            streams (written on the way, kept once their digest matched); ``False`` writes no
            file hfsoup downloads into it (whole downloads go to a temporary folder), and reads
            and writes no ingredient outputs in the outputs cache across runs
            (:mod:`hfsoup.tasks.output_cache`).
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(_recipe_file(recipe))
    recipe = _with_output(recipe, output=output, push_to=push_to, private=private,
                          allow_local=allow_local)  # fmt: skip
    if allow_nonfinite:
        recipe = recipe.model_copy(update={"allow_nonfinite": True})
    options = RunOptions(
        overwrite=overwrite, device=device, token=token, allow_pickle=allow_pickle, resume=resume,
        accumulate=accumulate, progress=progress, max_in_flight=max_in_flight,
        memory_budget=memory_budget, device_map=device_map, max_memory=max_memory,
        score_dtype=score_dtype, allow_local=allow_local, cache=cache,
    )  # fmt: skip
    return run_recipe(recipe, options)


def _with_output(
    recipe: Recipe, *, output: str | Path | None, push_to: str | None, private: bool,
    allow_local: bool,
) -> Recipe:  # fmt: skip
    """The recipe with the caller's output, push target and privacy over the recipe's own.

    A recipe from a soup names none of them (:func:`hfsoup.recipe.load_recipe` drops them): its
    output must be given, and it is pushed only when ``push_to`` is; nor may it read local
    things unless ``allow_local`` (:func:`hfsoup.untrusted.check_soup_recipe`).
    """
    if recipe.from_soup is not None and not output:
        raise RecipeError(
            f"the recipe from {recipe.from_soup} does not choose where to write: "
            "give the output folder",
            options=["output.dir"],
        )
    given = {"dir": output and str(output), "push_to": push_to, "private": private}
    out = recipe.output.model_copy(update={k: v for k, v in given.items() if v})
    check_soup_recipe(recipe, allow_local=allow_local)
    return recipe.model_copy(update={"output": out})


def _recipe_file(source: str | Path) -> str | Path:
    """``source``, unless it is a named pipe or socket: reading one waits for a writer that
    may never come (save the recipe to a file instead).

    Raises:
        RecipeError: naming the file.
    """
    try:
        mode = os.stat(source).st_mode
    except (OSError, ValueError):  # missing, a NUL byte: load_recipe says so in one line
        return source
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        kind = "a named pipe" if stat.S_ISFIFO(mode) else "a socket"
        raise RecipeError(
            f"recipe {source} is {kind}, not a file; hfsoup reads recipes from files "
            "(save it to a file first)"
        )
    return source


def evaluate(
    ingredients: Sequence[IngredientLike],
    *,
    task: Any,
    device: str = "auto",
    token: str | None = None,
    allow_pickle: bool = False,
    progress: bool = True,
    device_map: str | None = None,
    max_memory: str | list[str] | dict | None = None,
    score_dtype: str = "float32",
    cache: bool | None = None,
) -> dict[str, Any]:
    """Score each ingredient on a task, with the ensemble and greedy ensemble beside them.

    Under ``accelerate launch`` every process scores its share of each split (see
    :mod:`hfsoup.compute.distributed`) and every process returns the whole report.

    Args:
        ingredients: as for :func:`soup`.
        task: a preset (``"glue/sst2"``), a task mapping (recipe keys) or a ``Task``.
        device, device_map, max_memory, score_dtype: as for :func:`run`.
        cache: False reads and writes no ingredient outputs in the outputs cache across runs
            (:mod:`hfsoup.tasks.output_cache`; on by default, so a later greedy or learned
            run of the same ingredients and task scores none of them again).

    Returns:
        ``{"ingredients": [{repo, revision, sha, scores}], "table": {method: {split: {metric:
        value}}}, "selection": {split, metric}}``.

    Example:
        >>> hfsoup.evaluate(["org/ft-1", "org/ft-2"], task="glue/sst2")  # doctest: +SKIP
    """
    from hfsoup.methods.greedy import SoupSession, best_index, score_ingredients
    from hfsoup.methods.shared import make_scorer
    from hfsoup.tasks.task import resolve_task

    if score_dtype not in SCORE_DTYPES:
        raise RecipeError(
            f"score_dtype must be one of {', '.join(SCORE_DTYPES)}, got {score_dtype!r}"
        )
    task = resolve_task(task)
    procs = processes()
    target_device = resolve_device(device, procs)
    budgets = memory_budgets(max_memory)
    t0 = time.perf_counter()
    indexes = checked(load_ingredients(ingredients, token=token, allow_pickle=allow_pickle))
    placement = plan_placement(
        indexes[0].config, device=target_device, device_map=device_map, max_memory=budgets,
        score_dtype=SCORE_DTYPES[score_dtype], all_gpus=device == "auto" and not procs.distributed,
    )  # fmt: skip
    scorer = make_scorer(task, indexes[0], progress=progress, processes=procs, cache=cache)
    session = SoupSession(indexes, placement=placement)
    labels = [ix.ingredient.label for ix in indexes]
    individual = score_ingredients(session, scorer, labels=labels)
    seconds = time.perf_counter() - t0
    splits, sel = task.splits, scorer.selection_split
    outputs = {s: [scorer.cache[(str(i), s)] for i in range(len(indexes))] for s in splits}
    members = scorer.greedy_ensemble(outputs[sel])
    best = best_index([row[sel][scorer.selection_metric] for row in individual], scorer.direction)
    return {
        "ingredients": [
            {**_describe(ix), "scores": scores}
            for ix, scores in zip(indexes, individual, strict=True)
        ],
        "table": {
            "best_individual": individual[best],
            "ensemble": {s: scorer.scores(scorer.ensemble(outputs[s]), s) for s in splits},
            "greedy_ensemble": {
                s: scorer.scores(scorer.ensemble([outputs[s][i] for i in members]), s)
                for s in splits
            },
        },
        "greedy_ensemble": {"members": [labels[i] for i in members]},
        "selection": {"split": sel, "metric": scorer.selection_metric},
        "hardware": hardware_record(procs, placement),
        "timings": {"evaluate": round(seconds, 4), "cache": scorer.outputs_cache.counts()},
    }


__all__ = [
    "evaluate",
    "Inspection",
    "OutputConfig",
    "SoupResult",
    "inspect",
    "load_ingredients",
    "push",
    "run",
    "soup",
]
