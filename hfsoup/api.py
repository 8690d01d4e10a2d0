"""The public Python API; the CLI is a thin shell over these functions.

>>> import hfsoup
>>> hfsoup.soup(["org/ft-1", "org/ft-2@v1"], output="out/soup")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hfsoup.check.compat import align_ingredients
from hfsoup.compute.combine import fetch_plan_bytes, normalise_weights, stream_average
from hfsoup.compute.distributed import Processes, processes
from hfsoup.compute.placement import SCORE_DTYPES, parse_max_memory, plan_placement
from hfsoup.errors import (
    IncompatibleIngredientsError,
    NothingToResumeError,
    PushError,
    RecipeError,
)
from hfsoup.io.hub import IngredientSpec, parse_ingredient, push_folder, resolve
from hfsoup.io.layouts import check_layouts, read_layout
from hfsoup.io.tensors import (
    IngredientIndex,
    index_ingredient,
    parse_size,
    plan_shards,
)
from hfsoup.io.tokenizer_files import check_tokenizers
from hfsoup.io.writer import (
    ShardWriter,
    check_output_target,
    copy_aux_files,
    staged_output,
    write_config,
)
from hfsoup.recipe import IngredientEntry, OutputConfig, Recipe, build_recipe, load_recipe
from hfsoup.report.outputs import hardware_record, pin_recipe, results_base, write_soup_files
from hfsoup.report.pushplan import check_repo_id, plan_push
from hfsoup.untrusted import check_resolved, check_soup_recipe, plan_lines

if TYPE_CHECKING:
    from hfsoup.check.doctor import Examination, Finding

log = logging.getLogger("hfsoup")

IngredientLike = str | Path | IngredientSpec | IngredientEntry | dict
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


@dataclass
class SoupResult:
    """What a soup run produced."""

    output: Path
    method: str
    weights: list[float]
    results: dict[str, Any]
    url: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


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


def _spec(item: IngredientLike) -> IngredientSpec:
    if isinstance(item, IngredientSpec):
        return item
    if isinstance(item, dict):
        item = IngredientEntry.model_validate(item)
    if isinstance(item, IngredientEntry):
        return parse_ingredient(item.text, weight=item.weight)
    return parse_ingredient(str(item))  # a string, or a local folder as a Path


def load_ingredients(
    ingredients: Sequence[IngredientLike], *, token: str | None = None, allow_pickle: bool = False
) -> list[IngredientIndex]:
    """Resolve every ingredient to a SHA and read its config and headers (no weights).

    Ingredients are resolved concurrently: on a real Hub each is a few round trips.
    """
    specs = [_spec(i) for i in ingredients]
    if not specs:
        raise RecipeError("no ingredients given")

    def one(spec: IngredientSpec) -> IngredientIndex:
        ingredient = resolve(spec, token=token)
        layout = read_layout(ingredient, allow_pickle=allow_pickle)  # an adapter is refused first
        index = index_ingredient(ingredient, allow_pickle=allow_pickle)
        index.layout = layout
        return index

    with ThreadPoolExecutor(max_workers=min(8, len(specs))) as pool:
        return list(pool.map(one, specs))


def inspect(
    ingredients: Sequence[IngredientLike], *, token: str | None = None, allow_pickle: bool = False,
    method: str = "uniform", bandwidth: str | int | None = None, dtype: str | None = None,
    max_shard_size: str | int = "5GB",
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

    Example:
        >>> hfsoup.inspect(["org/ft-1", "org/ft-2"]).compatible  # doctest: +SKIP
        True
    """
    from hfsoup.check.doctor import examine
    from hfsoup.check.estimates import METHODS

    if method not in METHODS:
        raise RecipeError(f"unknown method {method!r} (use {', '.join(METHODS)})")
    if dtype is not None and dtype not in _DTYPES:
        raise RecipeError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if isinstance(bandwidth, str):
        bandwidth = bandwidth.strip().removesuffix("/s")  # "100MB/s" reads as "100MB"
    sizes = {"max_shard_size": max_shard_size, "bandwidth": bandwidth}
    for key, value in sizes.items():
        try:
            sizes[key] = None if value is None else parse_size(value)
        except ValueError as exc:
            raise RecipeError(f"{key}: {exc}") from exc
    indexes = load_ingredients(ingredients, token=token, allow_pickle=allow_pickle)
    problem = None
    try:
        # Aligned copies (label rows permuted), so the report sees labels in another order.
        indexes = align_ingredients(indexes)
        check_layouts(indexes)
    except IncompatibleIngredientsError as exc:
        problem = str(exc)
    examination = examine(indexes, method=method, bandwidth=sizes["bandwidth"],
                          max_shard_size=sizes["max_shard_size"],
                          dtype=_DTYPES[dtype] if dtype else None)  # fmt: skip
    problem = problem or examination.tokenizer_problem
    return Inspection(indexes, compatible=problem is None, problem=problem,
                      examination=examination)  # fmt: skip


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
        options: ``overwrite``, ``device``, ``token``, ``allow_pickle``, ``allow_nonfinite``,
            ``resume``, ``accumulate``,
            ``progress``, ``memory_budget`` (see :func:`run`).

    Returns:
        A :class:`SoupResult`.

    Raises:
        HfsoupError: any failure a user can cause; nothing is left half-written.
    """
    entries = [_entry(i) for i in ingredients]
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
            "output": {
                "dir": str(output),
                "dtype": dtype,
                "max_shard_size": max_shard_size,
                "push_to": push_to,
                "private": private,
            },  # fmt: skip
        },
        where="options",
    )
    return run(recipe, **options)


def _local_paths(spec: IngredientSpec) -> list[Path]:
    """The local folders an ingredient may read (its path, or the folder named like its repo)."""
    return [p for p in (spec.path, spec.local_fallback) if p is not None]


def _entry(item: IngredientLike) -> dict[str, Any]:
    spec = _spec(item)
    repo = spec.repo if spec.path is None else str(spec.path)
    return {"repo": repo, "revision": spec.revision, "weight": spec.weight}


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
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(_recipe_file(recipe))
    recipe = _with_output(recipe, output=output, push_to=push_to, private=private,
                          allow_local=allow_local)  # fmt: skip
    out = recipe.output
    if allow_nonfinite:
        recipe = recipe.model_copy(update={"allow_nonfinite": True})
    procs = processes()
    _check_run(recipe, resume=resume, accumulate=accumulate, score_dtype=score_dtype,
               device_map=device_map, procs=procs)  # fmt: skip
    _check_options(recipe, max_in_flight=max_in_flight, memory_budget=memory_budget)
    budgets = _max_memory(max_memory)
    # Weights are checked before any network call (their count is the ingredients').
    given = [e.weight for e in recipe.ingredients]
    if any(w is not None for w in given) and any(w is None for w in given):
        raise RecipeError("give a weight for every ingredient, or for none")
    weights = normalise_weights(len(given), None if given[0] is None else given)
    try:
        shard_bytes = parse_size(out.max_shard_size)
    except ValueError as exc:
        raise RecipeError(f"output.max_shard_size: {exc}") from exc
    target_device = resolve_device(device, procs)
    timings: dict[str, float] = {}
    target = Path(out.dir)
    if procs.distributed and recipe.method == "uniform" and not procs.is_main:
        # Nothing to score: the main process streams and writes the soup alone.
        return SoupResult(target, recipe.method, [], {}, timings=timings)

    if recipe.from_soup is not None and procs.is_main:
        for line in plan_lines(recipe, output=target, push_to=out.push_to, private=out.private):
            log.warning("%s", line)
    local = [p for e in recipe.ingredients for p in _local_paths(_spec(e))]
    check_output_target(target, overwrite=overwrite, inputs=local)  # before anything is read
    t0 = time.perf_counter()
    indexes = load_ingredients(recipe.ingredients, token=token, allow_pickle=allow_pickle)
    check_resolved(recipe, [(ix.ingredient.spec.label, ix.ingredient.spec.path is not None)
                            for ix in indexes], allow_local=allow_local)  # fmt: skip
    indexes = align_ingredients(indexes)
    check_layouts(indexes)
    # A soup averages embedding rows by id: tokenizers must agree (before any weight byte).
    for line in check_tokenizers([ix.ingredient for ix in indexes]):
        log.warning("%s", line)
    timings["resolve"] = time.perf_counter() - t0
    placement = plan_placement(
        indexes[0].config, device=target_device, device_map=device_map, max_memory=budgets,
        score_dtype=SCORE_DTYPES[score_dtype], accumulate=_DTYPES[accumulate],
        all_gpus=device == "auto" and not procs.distributed,
    )  # fmt: skip
    dtype = _DTYPES[out.dtype] if out.dtype else None
    shards = plan_shards(indexes[0], max_shard_size=shard_bytes, dtype=dtype)

    if recipe.method == "greedy":
        from hfsoup.methods.greedy_run import run_greedy_soup

        results = run_greedy_soup(
            recipe, indexes, shards, target=target, overwrite=overwrite, dtype=dtype,
            placement=placement, accumulate=_DTYPES[accumulate], progress=progress,
            timings=timings, resume=resume, processes=procs,
        )  # fmt: skip
        if not procs.is_main:
            return SoupResult(target, recipe.method, weights_of(results), results, timings=timings)
        return _finish(recipe, target, weights_of(results), results, timings, token)
    if recipe.method == "learned":
        from hfsoup.methods.learned_run import run_learned_soup

        results = run_learned_soup(
            recipe, indexes, shards, target=target, overwrite=overwrite, dtype=dtype,
            device=target_device, progress=progress, timings=timings, memory_budget=memory_budget,
        )  # fmt: skip
        return _finish(recipe, target, weights_of(results), results, timings, token)
    with staged_output(target, overwrite=overwrite) as tmp:
        t0 = time.perf_counter()
        writer = ShardWriter(tmp, len(shards), allow_nonfinite=recipe.allow_nonfinite)
        with _bar(fetch_plan_bytes(indexes, shards), "Fetching + averaging", progress) as bar:
            stream_average(
                indexes, weights, shards, on_shard=writer.write, dtype=dtype,
                placement=placement, accumulate=_DTYPES[accumulate], on_bytes=bar.update,
                max_in_flight=max_in_flight, allow_nonfinite=recipe.allow_nonfinite,
            )  # fmt: skip
        writer.finish()
        timings["stream"] = time.perf_counter() - t0
        write_config(tmp, indexes[0].config, dtype)
        copy_aux_files(tmp, indexes[0].ingredient)
        pinned = pin_recipe(recipe, indexes)
        hardware = hardware_record(Processes(), placement)
        results = results_base(pinned, indexes, weights, timings, shards, hardware)
        write_soup_files(tmp, pinned, indexes, weights, results)
    return _finish(recipe, target, weights, results, timings, token)


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
            "give the output folder (--output DIR)"
        )
    given = {"dir": output and str(output), "push_to": push_to, "private": private}
    out = recipe.output.model_copy(update={k: v for k, v in given.items() if v})
    check_soup_recipe(recipe, allow_local=allow_local)
    return recipe.model_copy(update={"output": out})


def _check_run(
    recipe: Recipe, *, resume: bool, accumulate: str, score_dtype: str, device_map: str | None,
    procs: Processes,
) -> None:  # fmt: skip
    """Refuse, with one clear line, what cannot run before anything is read or written."""
    if recipe.output.push_to is not None:
        _check_push_to(recipe.output.push_to)
    if resume and recipe.method != "greedy":
        raise NothingToResumeError(f"only greedy runs can be resumed, not {recipe.method!r} ones")
    if not recipe.output.dir:
        raise RecipeError("no output folder: set output.dir in the recipe or pass --output")
    if recipe.method in ("greedy", "learned") and recipe.task is None:
        raise RecipeError(
            f"a {recipe.method} soup needs a task to score on (--task glue/sst2, or a task: block)"
        )
    if recipe.learned is not None and recipe.method != "learned":
        raise RecipeError(f"learned options apply to method 'learned', not {recipe.method!r}")
    if recipe.method in ("learned", "greedy") and any(
        e.weight is not None for e in recipe.ingredients
    ):
        verb = "learns the weights" if recipe.method == "learned" else "chooses its ingredients"
        raise RecipeError(f"method {recipe.method!r} {verb}; give no weights")
    if accumulate not in ("float32", "float64"):
        raise RecipeError(f"accumulate must be float32 or float64, got {accumulate!r}")
    if score_dtype not in SCORE_DTYPES:
        raise RecipeError(
            f"score_dtype must be one of {', '.join(SCORE_DTYPES)}, got {score_dtype!r}"
        )
    if recipe.method == "learned" and (
        procs.distributed or device_map or score_dtype != "float32" or accumulate != "float32"
    ):
        raise RecipeError(
            "learned soups run in one process on one device in float32: drop accelerate launch, "
            "--device-map, --score-dtype and --accumulate"
        )


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


def _check_options(
    recipe: Recipe, *, max_in_flight: Any, memory_budget: str | int | None
) -> None:  # fmt: skip
    """Refuse an option value that could not work, or would do nothing, before any read."""
    if max_in_flight is not None and (
        isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1
    ):
        raise RecipeError(
            f"max_in_flight must be a positive number of bytes, got {max_in_flight!r}"
        )
    if memory_budget is not None:
        if recipe.method != "learned":
            raise RecipeError(
                f"--memory-budget (memory_budget) applies to method 'learned', not {recipe.method!r}"
            )
        try:
            parse_size(memory_budget)
        except ValueError as exc:
            raise RecipeError(f"memory_budget: {exc}") from exc


def _max_memory(max_memory: str | list[str] | dict | None) -> dict[int | str, int]:
    """:func:`parse_max_memory`, with a size too large to be a number one line too."""
    try:
        return parse_max_memory(max_memory)
    except (OverflowError, ValueError, TypeError) as exc:
        raise RecipeError(f"--max-memory: cannot read {max_memory!r} as sizes ({exc})") from exc


def _check_push_to(repo_id: str) -> None:
    """Refuse a push target that is not a repo ID before any ingredient is read."""
    try:
        check_repo_id(repo_id)
    except ValueError as exc:
        raise RecipeError(f"output.push_to: {exc}") from exc


def weights_of(results: dict[str, Any]) -> list[float]:
    return [row["weight"] for row in results["ingredients"]]


def _finish(recipe, target, weights, results, timings, token) -> SoupResult:
    target = target.expanduser().resolve()
    url = None
    if recipe.output.push_to:
        t0 = time.perf_counter()
        url = push(target, recipe.output.push_to, private=recipe.output.private, token=token)
        timings["push"] = time.perf_counter() - t0
    return SoupResult(target, recipe.method, weights, results, url=url, timings=timings)


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
) -> dict[str, Any]:
    """Score each ingredient on a task, with the ensemble and greedy ensemble beside them.

    Under ``accelerate launch`` every process scores its share of each split (see
    :mod:`hfsoup.compute.distributed`) and every process returns the whole report.

    Args:
        ingredients: as for :func:`soup`.
        task: a preset (``"glue/sst2"``), a task mapping (recipe keys) or a ``Task``.
        device, device_map, max_memory, score_dtype: as for :func:`run`.

    Returns:
        ``{"ingredients": [{repo, revision, sha, scores}], "table": {method: {split: {metric:
        value}}}, "selection": {split, metric}}``.

    Example:
        >>> hfsoup.evaluate(["org/ft-1", "org/ft-2"], task="glue/sst2")  # doctest: +SKIP
    """
    from hfsoup.methods.greedy import SoupSession, best_index, score_ingredients
    from hfsoup.methods.greedy_run import make_scorer
    from hfsoup.tasks.task import resolve_task

    if score_dtype not in SCORE_DTYPES:
        raise RecipeError(
            f"score_dtype must be one of {', '.join(SCORE_DTYPES)}, got {score_dtype!r}"
        )
    task = resolve_task(task)
    procs = processes()
    target_device = resolve_device(device, procs)
    budgets = _max_memory(max_memory)
    t0 = time.perf_counter()
    indexes = align_ingredients(
        load_ingredients(ingredients, token=token, allow_pickle=allow_pickle)
    )
    check_layouts(indexes)
    placement = plan_placement(
        indexes[0].config, device=target_device, device_map=device_map, max_memory=budgets,
        score_dtype=SCORE_DTYPES[score_dtype], all_gpus=device == "auto" and not procs.distributed,
    )  # fmt: skip
    scorer = make_scorer(task, indexes[0], progress=progress, processes=procs)
    session = SoupSession(indexes, placement=placement)
    labels = [ix.ingredient.label for ix in indexes]
    individual = score_ingredients(session, scorer, labels=labels)
    seconds = time.perf_counter() - t0
    splits, sel = task.splits, scorer.selection_split
    outputs = {s: [scorer.cache[(str(i), s)] for i in range(len(indexes))] for s in splits}
    members = scorer.greedy_ensemble(outputs[sel])
    best = best_index([row[sel][scorer.selection_metric] for row in individual])  # NaN lowest
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
        "timings": {"evaluate": round(seconds, 4)},
    }


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


def _bar(total: int, desc: str, enabled: bool):
    from huggingface_hub.utils import tqdm

    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled
    )


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
