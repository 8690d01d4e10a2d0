"""One soup, start to end: resolve -> index -> check -> place -> plan -> stage -> method ->
write -> results -> card -> push.

:func:`run_recipe` reads as that list. What differs between methods is the method's value in
the registry (:mod:`hfsoup.registry`): what it needs and refuses, how it runs
(:class:`hfsoup.methods.context.MethodContext`), and the results it returns.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hfsoup.check.compat import align_ingredients
from hfsoup.check.layouts import check_layouts
from hfsoup.compute.combine import normalise_weights
from hfsoup.compute.distributed import Processes, processes
from hfsoup.compute.placement import parse_max_memory, plan_placement
from hfsoup.dtypes import ACCUMULATE_DTYPES, SCORE_DTYPES
from hfsoup.dtypes import OUTPUT_DTYPES as DTYPES
from hfsoup.errors import (
    IncompatibleIngredientsError,
    NothingToResumeError,
    PushError,
    RecipeError,
)
from hfsoup.ingredients import IngredientLike
from hfsoup.ingredients import to_spec as ingredient_spec
from hfsoup.io.adapters import AdapterFile, bind, common_base, is_adapter, read_adapter
from hfsoup.io.hub import IngredientSpec, refuse_push_offline, resolve
from hfsoup.io.layouts import read_layout
from hfsoup.io.tensors import IngredientIndex, index_ingredient, plan_shards
from hfsoup.io.tokenizer_files import check_tokenizers
from hfsoup.io.writer import check_output_target, staged_output
from hfsoup.methods.context import MethodContext, MethodOutcome
from hfsoup.recipe import Recipe
from hfsoup.registry import MergeMethod, get_method, methods
from hfsoup.report.lora import check_adapter_output, finish_lora
from hfsoup.report.outputs import write_soup_files
from hfsoup.report.pushplan import check_repo_id, plan_push, push_folder
from hfsoup.units import parse_size
from hfsoup.untrusted import check_resolved, plan_lines

log = logging.getLogger("hfsoup")


@dataclass
class SoupResult:
    """What a soup run produced."""

    output: Path
    method: str
    weights: list[float]
    results: dict[str, Any]
    url: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class RunOptions:
    """How to run a recipe (the keyword options of :func:`hfsoup.run`, which documents them)."""

    overwrite: bool = False
    device: str = "auto"
    token: str | None = None
    allow_pickle: bool = False
    resume: bool = False
    accumulate: str = "float32"
    progress: bool = True
    max_in_flight: int | None = None
    memory_budget: str | int | None = None
    device_map: str | None = None
    max_memory: str | list[str] | dict | None = None
    score_dtype: str = "float32"
    allow_local: bool = False
    cache: bool | None = None


def run_recipe(recipe: Recipe, opts: RunOptions) -> SoupResult:
    """Make the soup ``recipe`` describes (its output already chosen), as ``opts`` say."""
    method, procs = get_method(recipe.method), processes()
    weights, shard_bytes, budgets = check_run(recipe, method, opts, procs)  # before any read
    device, target, timings = resolve_device(opts.device, procs), Path(recipe.output.dir), {}
    if procs.distributed and not method.needs_task and not procs.is_main:
        # Nothing to score: the main process streams and writes the soup alone.
        return SoupResult(target, recipe.method, [], {}, timings=timings)
    indexes = _index(recipe, opts, target, procs, timings)  # resolve -> index -> check
    base = _base(recipe, opts, indexes, method)
    check_adapter_output(indexes, adapter=recipe.output.adapter, rank=recipe.output.rank)
    placement = plan_placement(
        indexes[0].config, device=device, device_map=opts.device_map, max_memory=budgets,
        score_dtype=SCORE_DTYPES[opts.score_dtype], accumulate=ACCUMULATE_DTYPES[opts.accumulate],
        all_gpus=opts.device == "auto" and not procs.distributed,
    )  # fmt: skip
    dtype = DTYPES[recipe.output.dtype] if recipe.output.dtype else None
    ctx = MethodContext(
        recipe=recipe, indexes=indexes, target=target, weights=weights, dtype=dtype,
        shards=plan_shards(indexes[0], max_shard_size=shard_bytes, dtype=dtype),
        config=method.read_config(recipe), placement=placement, device=device,
        accumulate=ACCUMULATE_DTYPES[opts.accumulate], processes=procs, progress=opts.progress,
        overwrite=opts.overwrite, resume=opts.resume, max_in_flight=opts.max_in_flight,
        memory_budget=opts.memory_budget, timings=timings, base=base, cache=opts.cache,
    )  # fmt: skip
    ctx.state = method.prepare(ctx) if method.prepare else None  # fails before any output
    with _stage(ctx, method) as folder:
        ctx.folder = folder
        outcome = method.run(ctx)
        if folder is None:  # a process beside the main one: it scored its share, it writes nothing
            return SoupResult(target, recipe.method, outcome.weights, outcome.results.to_dict(),
                              timings=timings)  # fmt: skip
        t0 = time.perf_counter()
        outcome.results.lora, section = finish_lora(folder, indexes, adapter=recipe.output.adapter,
                                                    rank=recipe.output.rank)  # fmt: skip
        if recipe.output.adapter:
            timings["adapter_output"] = time.perf_counter() - t0
        outcome.sections += [section] if section else []
        results = _write(folder, outcome)  # results.json, card, recipe
    return _push(recipe, target, outcome.weights, results, timings, opts.token)


def _stage(ctx: MethodContext, method: MergeMethod):
    """The staged output folder (the main process's; None for the others). A resumable method's
    is kept on failure: its state is what a rerun resumes from."""
    if not ctx.processes.is_main:
        return nullcontext()
    keep = "resume" in method.run_options
    return staged_output(ctx.target, overwrite=ctx.overwrite, keep_partial=keep)


def _write(folder: Path, outcome: MethodOutcome) -> dict[str, Any]:
    """Write results.json, the card and the pinned recipe, then drop the method's scratch
    (only now: a failed write keeps a resumable run resumable)."""
    results = write_soup_files(folder, outcome.results, sections=outcome.sections,
                               model_index=outcome.model_index)  # fmt: skip
    for name in outcome.scratch:
        path = folder / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return results


def _push(
    recipe: Recipe, target: Path, weights: list[float], results: dict[str, Any],
    timings: dict[str, float], token: str | None,
) -> SoupResult:  # fmt: skip
    """Push the soup when the recipe says where; the run's :class:`SoupResult`."""
    target = target.expanduser().resolve()
    url = None
    if recipe.output.push_to:
        t0 = time.perf_counter()
        url = push(target, recipe.output.push_to, private=recipe.output.private, token=token)
        timings["push"] = time.perf_counter() - t0
    return SoupResult(target, recipe.method, weights, results, url=url, timings=timings)


def _index(
    recipe: Recipe, opts: RunOptions, target: Path, procs: Processes, timings: dict[str, float]
) -> list[IngredientIndex]:
    """Announce an untrusted recipe, check the output, then resolve, index and check the
    ingredients (from headers and small files: no weight byte); timed as ``resolve``."""
    out = recipe.output
    if recipe.from_soup is not None and procs.is_main:
        for line in plan_lines(recipe, output=target, push_to=out.push_to, private=out.private):
            log.warning("%s", line)
    entries = [*recipe.ingredients, *([recipe.base] if recipe.base else [])]
    local = [p for e in entries for p in _local_paths(ingredient_spec(e))]
    check_output_target(target, overwrite=opts.overwrite, inputs=local)  # before anything is read
    t0 = time.perf_counter()
    indexes = load_ingredients(recipe.ingredients, token=opts.token, base=recipe.base,
                               allow_pickle=opts.allow_pickle, cache=opts.cache)  # fmt: skip
    read = [ix.ingredient.spec for ix in indexes]
    read += [indexes[0].adapter.base.ingredient.spec] if indexes[0].adapter is not None else []
    check_resolved(recipe, [(spec.label, spec.path is not None) for spec in read],
                   allow_local=opts.allow_local)  # fmt: skip
    indexes = checked(indexes)
    # A soup averages embedding rows by id: tokenizers must agree (before any weight byte).
    for line in check_tokenizers([ix.ingredient for ix in indexes]):
        log.warning("%s", line)
    timings["resolve"] = time.perf_counter() - t0
    return indexes


def _base(
    recipe: Recipe, opts: RunOptions, indexes: list[IngredientIndex], method: MergeMethod
) -> IngredientIndex | None:
    """The base model θ₀ of a method that needs one, resolved and indexed like an ingredient,
    checked to hold the ingredients' tensors (names, shapes); for LoRA adapters, the base they
    were applied to (their task vectors are their ΔW)."""
    from hfsoup.check.compat import check_base

    adapter = indexes[0].adapter
    method.check_coefficients(recipe, adapters=adapter is not None)
    if adapter is not None:
        return adapter.base if method.needs_base else None
    if recipe.base is None:
        return None
    (base,) = load_ingredients([recipe.base], token=opts.token, allow_pickle=opts.allow_pickle,
                               cache=opts.cache)  # fmt: skip
    check_resolved(recipe, [(base.ingredient.spec.label, base.ingredient.spec.path is not None)],
                   allow_local=opts.allow_local)  # fmt: skip
    check_base(base, indexes)
    return base


def _local_paths(spec: IngredientSpec) -> list[Path]:
    """The local folders an ingredient may read (its path, or the folder named like its repo)."""
    return [p for p in (spec.path, spec.local_fallback) if p is not None]


def load_ingredients(
    ingredients: Sequence[IngredientLike], *, token: str | None = None, allow_pickle: bool = False,
    cache: bool | None = None, base: IngredientLike | None = None,
) -> list[IngredientIndex]:  # fmt: skip
    """Resolve every ingredient to a SHA and read its config and headers (no weights).

    ``cache``: as for :func:`hfsoup.run`. PEFT LoRA adapters come back as the full models they
    stand for (:func:`hfsoup.io.adapters.bind`) on ``base``, or on the base they all name.

    Ingredients are resolved concurrently: on a real Hub each is a few round trips.
    """
    specs = [ingredient_spec(i) for i in ingredients]
    if not specs:
        raise RecipeError("no ingredients given")

    def one(spec: IngredientSpec) -> IngredientIndex | AdapterFile:
        ingredient = resolve(spec, token=token, cache=cache)
        if is_adapter(ingredient):
            return read_adapter(ingredient)
        layout = read_layout(ingredient, allow_pickle=allow_pickle)
        index = index_ingredient(ingredient, allow_pickle=allow_pickle)
        index.layout = layout
        return index

    with ThreadPoolExecutor(max_workers=min(8, len(specs))) as pool:
        found = list(pool.map(one, specs))
    adapters = [f for f in found if isinstance(f, AdapterFile)]
    if not adapters:
        return found
    if len(adapters) != len(found):
        full = next(f.ingredient.label for f in found if not isinstance(f, AdapterFile))
        raise IncompatibleIngredientsError(
            f"{adapters[0].ingredient.label} is a LoRA adapter and {full} a full model: soup "
            "adapters together (on their base), or full models together"
        )
    name = common_base(adapters, None if base is None else ingredient_spec(base).label)
    spec = ingredient_spec(base) if base is not None else ingredient_spec(name)
    (theta0,) = load_ingredients([spec], token=token, allow_pickle=allow_pickle, cache=cache)
    if theta0.adapter is not None:
        raise IncompatibleIngredientsError(
            f"the adapters' base {theta0.ingredient.label} is itself an adapter: give its full "
            "model (merged) as the base"
        )
    return [bind(a, theta0) for a in adapters]


def checked(indexes: Sequence[IngredientIndex]) -> list[IngredientIndex]:
    """The ingredients with label rows aligned to the first's, their layouts checked alike.

    Raises:
        IncompatibleIngredientsError: they cannot be souped together.
    """
    aligned = align_ingredients(indexes)
    check_layouts(aligned)
    return aligned


def check_run(
    recipe: Recipe, method: MergeMethod, opts: RunOptions, procs: Processes
) -> tuple[list[float], int, dict[int | str, int]]:
    """Refuse, with one clear line, what cannot run before anything is read or written.

    Returns:
        The normalised mixing weights, the output shard size in bytes and the per-device
        memory budgets.
    """
    if method.run is None:
        raise RecipeError(f"method {method.name!r} is registered but cannot run yet")
    if recipe.output.push_to is not None:
        _check_push_to(recipe.output.push_to)
    if opts.resume and "resume" not in method.run_options:
        kinds = " or ".join(m.name for m in methods() if "resume" in m.run_options)
        raise NothingToResumeError(f"only {kinds} runs can be resumed, not {recipe.method!r} ones")
    if not recipe.output.dir:
        raise RecipeError("no output folder: set output.dir", options=["output.dir"])
    if method.needs_task and recipe.task is None:
        raise RecipeError(
            f"a {recipe.method} soup needs a task to score on (a preset such as glue/sst2, "
            "or a task block)",
            options=["task"],
        )
    _check_method_options(recipe, method)
    method.check_coefficients(recipe, adapters=None)  # the base: once they are resolved
    if opts.accumulate not in ACCUMULATE_DTYPES:
        raise RecipeError(f"accumulate must be float32 or float64, got {opts.accumulate!r}")
    if opts.score_dtype not in SCORE_DTYPES:
        raise RecipeError(
            f"score_dtype must be one of {', '.join(SCORE_DTYPES)}, got {opts.score_dtype!r}"
        )
    if method.one_device and (procs.distributed or opts.device_map
                              or opts.score_dtype != "float32" or opts.accumulate != "float32"):  # fmt: skip
        raise RecipeError(
            f"{method.name} soups run in one process on one device in float32: drop accelerate "
            "launch, device_map, score_dtype and accumulate",
            options=["device_map", "score_dtype", "accumulate"],
        )
    _check_options(recipe, method, opts)
    budgets = memory_budgets(opts.max_memory)
    weights = _weights(recipe)
    return weights, _size("output.max_shard_size", recipe.output.max_shard_size), budgets


def _check_method_options(recipe: Recipe, method: MergeMethod) -> None:
    """Refuse another method's options block, and weights given to a method that sets its own."""
    for other in methods():
        key = other.options_key
        if key and other is not method and getattr(recipe, key, None) is not None:
            raise RecipeError(
                f"{key} options apply to method {other.name!r}, not {recipe.method!r}"
            )
    if method.chooses_weights and any(e.weight is not None for e in recipe.ingredients):
        raise RecipeError(f"method {recipe.method!r} {method.chooses_weights}; give no weights")


def _check_options(recipe: Recipe, method: MergeMethod, opts: RunOptions) -> None:
    """Refuse an option value that could not work, or would do nothing, before any read."""
    cap = opts.max_in_flight
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise RecipeError(f"max_in_flight must be a positive number of bytes, got {cap!r}")
    if opts.memory_budget is not None:
        if "memory_budget" not in method.run_options:
            users = ", ".join(repr(m.name) for m in methods() if "memory_budget" in m.run_options)
            raise RecipeError(
                f"memory_budget applies to method {users}, not {recipe.method!r}",
                options=["memory_budget"],
            )
        _size("memory_budget", opts.memory_budget)


def _weights(recipe: Recipe) -> list[float]:
    """The recipe's mixing weights, normalised (checked before any network call: their count
    is the ingredients')."""
    given = [e.weight for e in recipe.ingredients]
    if any(w is not None for w in given) and any(w is None for w in given):
        raise RecipeError("give a weight for every ingredient, or for none")
    return normalise_weights(len(given), None if given[0] is None else given)


def _size(key: str, value: str | int) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise RecipeError(f"{key}: {exc}") from exc


def memory_budgets(max_memory: str | list[str] | dict | None) -> dict[int | str, int]:
    """:func:`parse_max_memory`, with a size too large to be a number one line too."""
    try:
        return parse_max_memory(max_memory)
    except (OverflowError, ValueError, TypeError) as exc:
        raise RecipeError(
            f"max_memory: cannot read {max_memory!r} as sizes ({exc})", options=["max_memory"]
        ) from exc


def _check_push_to(repo_id: str) -> None:
    """Refuse a push target that is not a repo ID before any ingredient is read."""
    try:
        check_repo_id(repo_id)
    except ValueError as exc:
        raise RecipeError(f"output.push_to: {exc}") from exc
    refuse_push_offline(repo_id)  # HF_HUB_OFFLINE: refused before anything is read or written


def resolve_device(device: str, procs: Processes | None = None) -> torch.device:
    """``auto`` -> this process's GPU when there is one, else the CPU; check explicit choices.

    Under ``accelerate launch`` each process's ``auto`` (and plain ``cuda``) is its own
    node-local GPU.
    """
    procs = procs or Processes()
    if device == "auto":
        return procs.device()
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise RecipeError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from exc
    if dev.type not in ("cpu", "cuda"):
        raise RecipeError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RecipeError(f"device {device!r} asked for, but no CUDA GPU is visible")
        if dev.index is None:
            return procs.device() if procs.device().type == "cuda" else torch.device("cuda", 0)
        if dev.index >= torch.cuda.device_count():
            raise RecipeError(
                f"device {device!r} asked for, but {torch.cuda.device_count()} GPU(s) are visible"
            )
    return dev


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    include: Sequence[str] | None = None,
) -> str:
    """Upload a soup folder to ``repo_id`` in one commit (creating the repo if needed).

    What is uploaded: the regular files hfsoup writes into a soup (config.json, the weights:
    ``model.safetensors`` or the index and the shards it names, README.md, hfsoup_recipe.yaml,
    results.json, the card's figures, the tokenizer / processor / generation files), plus the
    files ``include`` patterns (globs relative to ``folder``) name. Other files are left out, and
    a line on stderr names them. A symlink anywhere in ``folder`` is refused, never followed.
    The same commit deletes the remote files of an earlier soup that this one does not have
    (old weight files, a stale index, figures, tokenizer files); other remote files are kept.

    Example:
        >>> hfsoup.push("out/soup", "me/my-soup", include=["eval/*.json"])  # doctest: +SKIP

    Returns:
        The commit URL.

    Raises:
        PushError: ``repo_id`` is not a repo ID, the folder is not a soup or holds a symlink,
            or the upload failed; the folder is intact and the message says how to retry.
    """
    try:
        check_repo_id(repo_id)
    except ValueError as exc:
        raise PushError(f"cannot push: {exc}") from exc
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise PushError(f"{folder} is not a soup folder (no such folder)")
    plan = plan_push(folder, include or ())
    notice = plan.left_out_line()
    if notice:
        log.warning("%s", notice)  # the CLI prints it as one scrubbed "hfsoup: ..." line
    return push_folder(
        folder, repo_id, private=private, token=token, files=plan.files,
        include=list(include or ()), message="Upload model soup made with hfsoup",
    )  # fmt: skip


__all__ = [
    "RunOptions",
    "SoupResult",
    "checked",
    "load_ingredients",
    "push",
    "resolve_device",
    "run_recipe",
]
