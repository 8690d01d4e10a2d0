"""Task-vector merges with given coefficients: task arithmetic, TIES, DARE (linear and TIES),
WiSE-FT.

With a base model θ₀ (recipe ``base``) and task vectors τᵢ = θᵢ − θ₀, taken per tensor in
float32, and weights wᵢ (the ingredients' ``weight``, default 1, not normalised):

- ``task_arithmetic``: θ = θ₀ + λ · Σᵢ wᵢ τᵢ.
- ``ties``: each τᵢ trimmed per tensor to its top ``density`` fraction by magnitude (the
  ``int(density · numel)`` largest |τᵢ| entries kept, the others 0); a sign elected per entry,
  sign(Σᵢ wᵢ · trimmed τᵢ) (+ where the sum is 0); the disjoint mean
  Σᵢ wᵢ τᵢ [agrees] / Σᵢ wᵢ [agrees] over the trimmed entries whose sign (of wᵢ τᵢ) agrees
  (0 where none does); θ = θ₀ + λ · that mean. This is mergekit's ``ties`` with
  ``normalize: true``, which divides by the summed weights of the agreeing entries.
- ``dare_linear``: each entry of τᵢ kept with probability ``density`` and rescaled by
  1/density (a mask drawn per ingredient and tensor, seeded from ``seed``, the ingredient's
  position and the tensor's name); θ = θ₀ + λ · Σᵢ wᵢ τ̃ᵢ / Σᵢ wᵢ (a weighted mean, as
  mergekit's ``dare_linear`` with ``normalize: true``).
- ``dare_ties``: the DARE masks, then TIES' sign election and disjoint mean (no magnitude trim).
- ``wise_ft``: θ = (1 − α) θ₀ + α · soup, the soup being the uniform (weighted) soup.

Every method streams: the base is slot 0 of the stream, before the k ingredients, so memory is
a few tensors' worth (θ₀, the running sums, one ingredient's tensor), whatever k. TIES and DARE
get whole tensors (``whole_tensors``): the magnitude threshold and the mask are the whole
tensor's, whatever the chunking.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hfsoup.registry import MergeMethod, register

if TYPE_CHECKING:
    from hfsoup.check.estimates import EstimateInput, Peak
    from hfsoup.methods.context import MethodContext, MethodOutcome


class _Coefficients(BaseModel):
    """What every task-vector merge takes (None in the recipe: these defaults)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class TaskVectorConfig(_Coefficients):
    """The coefficients of a task-vector merge that scales τ by λ (None: these defaults)."""

    lambda_: Annotated[float, Field(allow_inf_nan=False)] | Literal["auto"] = Field(
        1.0, alias="lambda"
    )


class SparseConfig(TaskVectorConfig):
    """TIES and DARE: also the kept fraction ``density`` in (0, 1] (default 0.5, the value of
    mergekit's examples and of the issue's comparison)."""

    density: Annotated[float, Field(gt=0, le=1)] | Literal["auto"] = 0.5


class WiseConfig(_Coefficients):
    """WiSE-FT: the mixing coefficient α (default 0.5, the paper's usual middle point); it
    takes no λ (α is its only scale), so a ``lambda`` given with it is refused."""

    alpha: Annotated[float, Field(allow_inf_nan=False)] | Literal["auto"] = 0.5


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """``tau`` with all but its ``int(density * numel)`` largest-magnitude entries set to 0
    (at least one kept; all of them at density 1)."""
    n = tau.numel()
    k = max(1, int(density * n))
    if k >= n:
        return tau
    keep = torch.zeros(n, dtype=torch.bool, device=tau.device)
    keep[torch.topk(tau.abs().flatten(), k, sorted=False).indices] = True
    return tau * keep.view(tau.shape)


def dare_seed(seed: int, slot: int, name: str) -> int:
    """The seed of ingredient ``slot``'s DARE mask on tensor ``name`` (stable across runs,
    processes and chunkings)."""
    digest = hashlib.blake2b(f"{seed}:{slot}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def dare(tau: torch.Tensor, density: float, seed: int, slot: int, name: str) -> torch.Tensor:
    """``tau`` with each entry kept with probability ``density`` and rescaled by 1/density; the
    mask is drawn on the CPU from :func:`dare_seed` (the same on any device)."""
    if density >= 1:
        return tau
    gen = torch.Generator().manual_seed(dare_seed(seed, slot, name))
    keep = torch.rand(tau.shape, generator=gen) < density
    return tau * keep.to(tau.device) / density


class _TaskVectors:
    """Slot 0 is θ₀, slots 1..k the ingredients; ``vector`` is τᵢ as the method uses it."""

    passes = 1
    whole_tensors = False

    def __init__(self, weights: Sequence[float], cfg: Any) -> None:
        self.weights, self.cfg = weights, cfg

    def start(self, name: str, like: torch.Tensor, device: torch.device | str) -> None:
        self.name, self.device = name, device

    def add(self, pass_index: int, slot: int, tensor: torch.Tensor) -> None:
        t = tensor.to(device=self.device, dtype=torch.float32)
        if slot == 0:
            if pass_index == 0:
                self.base = t
                self.begin()
            else:
                self.middle()
            return
        self.take(pass_index, slot - 1, self.vector(t - self.base, slot - 1))

    def vector(self, tau: torch.Tensor, i: int) -> torch.Tensor:
        return tau

    def begin(self) -> None:
        self.sum = torch.zeros_like(self.base)

    def middle(self) -> None:
        pass

    def take(self, pass_index: int, i: int, tau: torch.Tensor) -> None:
        self.sum.add_(tau, alpha=self.weights[i])

    scale_key = "lambda_"

    def merged(self) -> torch.Tensor:
        """The merged task vector τ (what the coefficient scales)."""
        return self.sum

    @staticmethod
    def apply(base: torch.Tensor, merged: torch.Tensor, scale: float) -> torch.Tensor:
        """θ from θ₀, τ and the coefficient (the search shows candidates with this too)."""
        return base + scale * merged

    def result(self) -> torch.Tensor:
        return self.apply(self.base, self.merged(), getattr(self.cfg, self.scale_key))


class TaskArithmetic(_TaskVectors):
    """θ₀ + λ Σᵢ wᵢ τᵢ."""


class DareLinear(_TaskVectors):
    """θ₀ + λ Σᵢ wᵢ DARE(τᵢ) / Σᵢ wᵢ."""

    whole_tensors = True

    def vector(self, tau: torch.Tensor, i: int) -> torch.Tensor:
        return dare(tau, self.cfg.density, self.cfg.seed, i, self.name)

    def merged(self) -> torch.Tensor:
        return self.sum / sum(self.weights)


class Ties(_TaskVectors):
    """Pass 0 elects the signs from Σᵢ wᵢ trimmed τᵢ; pass 1 takes the agreeing entries'
    weighted mean."""

    passes = 2
    whole_tensors = True

    def vector(self, tau: torch.Tensor, i: int) -> torch.Tensor:
        return trim(tau, self.cfg.density)

    def middle(self) -> None:
        self.sign = torch.where(self.sum >= 0, 1.0, -1.0)
        self.sum.zero_()
        self.count = torch.zeros_like(self.base)

    def take(self, pass_index: int, i: int, tau: torch.Tensor) -> None:
        w = self.weights[i]
        if pass_index == 0:
            self.sum.add_(tau, alpha=w)
            return
        agree = torch.sign(tau * w) == self.sign
        self.sum.add_(torch.where(agree, tau * w, 0.0))
        self.count.add_(agree.to(torch.float32), alpha=w)

    def merged(self) -> torch.Tensor:
        return self.sum / torch.where(self.count == 0, 1.0, self.count)


class DareTies(Ties):
    """TIES' election and disjoint mean over the DARE-masked task vectors."""

    def vector(self, tau: torch.Tensor, i: int) -> torch.Tensor:
        return dare(tau, self.cfg.density, self.cfg.seed, i, self.name)


class WiseFT(_TaskVectors):
    """(1 − α) θ₀ + α Σᵢ ŵᵢ θᵢ (ŵ: the weights normalised, uniform by default)."""

    def add(self, pass_index: int, slot: int, tensor: torch.Tensor) -> None:
        t = tensor.to(device=self.device, dtype=torch.float32)
        if slot == 0:
            self.base, self.sum = t, torch.zeros_like(t)
        else:
            self.sum.add_(t, alpha=self.weights[slot - 1])

    scale_key = "alpha"

    @staticmethod
    def apply(base: torch.Tensor, merged: torch.Tensor, scale: float) -> torch.Tensor:
        return (1 - scale) * base + scale * merged


_FORMULAS = {
    "task_arithmetic": "θ = θ₀ + λ · Σᵢ wᵢ τᵢ",
    "ties": "θ = θ₀ + λ · disjoint mean of the top-density |τᵢ| entries agreeing with the "
    "elected sign sign(Σᵢ wᵢ trimmed τᵢ)",
    "dare_linear": "θ = θ₀ + λ · Σᵢ wᵢ DARE(τᵢ) / Σᵢ wᵢ, DARE keeping each entry with "
    "probability density and rescaling it by 1/density",
    "dare_ties": "θ = θ₀ + λ · disjoint mean of the DARE(τᵢ) entries agreeing with the elected "
    "sign sign(Σᵢ wᵢ DARE(τᵢ))",
    "wise_ft": "θ = (1 − α) · θ₀ + α · Σᵢ ŵᵢ θᵢ (the uniform soup)",
}
_ACCUMULATORS = {"task_arithmetic": TaskArithmetic, "ties": Ties, "dare_linear": DareLinear,
                 "dare_ties": DareTies, "wise_ft": WiseFT}  # fmt: skip


def user_weights(ctx: MethodContext) -> list[float]:
    """The ingredients' weights as given (default 1 each), not normalised."""
    given = [e.weight for e in ctx.recipe.ingredients]
    return [1.0 if w is None else float(w) for w in given]


def run(ctx: MethodContext) -> MethodOutcome:
    """Stream the task-vector merge ``ctx.recipe.method`` into ``ctx.folder``."""
    from hfsoup.compute.distributed import Processes
    from hfsoup.methods.context import MethodOutcome
    from hfsoup.report.outputs import hardware_record

    name, cfg = ctx.recipe.method, ctx.config
    weights = ctx.weights if name == "wise_ft" else user_weights(ctx)
    if name == "dare_linear" and sum(weights) == 0:
        from hfsoup.errors import RecipeError

        raise RecipeError("dare_linear takes a weighted mean: the weights must not sum to 0")
    search, scores = None, None
    if ctx.recipe.task is not None:
        from hfsoup.methods.tv_search import SEARCH_PNG, scored_run

        cfg, search, scores = scored_run(ctx, _ACCUMULATORS[name], weights, cfg)
    ctx.stream_soup(lambda: _ACCUMULATORS[name](weights, cfg), base=True)
    shown = {k: v for k, v in cfg.model_dump(by_alias=True).items()
             if k != "seed" or name.startswith("dare")}  # fmt: skip
    # The pinned recipe embeds the coefficients used, so a rebuild from the card is the same.
    used = cfg.model_dump()
    ctx.recipe = ctx.recipe.model_copy(
        update={**{k: used[k] for k in ("lambda_", "density", "alpha") if k in used}, "grid": None}
    )
    hardware = hardware_record(Processes(), ctx.placement)
    results = ctx.results(weights, hardware, scores=scores)
    sections = [_section(ctx, name, shown)]
    if scores is not None:
        sections.append(_scores_section(ctx, scores, search, name))
        if search is not None and len(search) > 1:
            from hfsoup.report.summary import plot_search

            results.extra = {"search": search}
            plot_search(ctx.folder / SEARCH_PNG, search, metric=scores.selection[1])
            sections[-1] += f"\n\n![coefficient search]({SEARCH_PNG})"
    return MethodOutcome(results, sections=sections)


def _scores_section(ctx: MethodContext, scores: Any, search: Any, name: str) -> str:
    from hfsoup.report.summary import markdown_table

    sel, metric = scores.selection
    lines = ["## Scores", "", f"Chosen on split `{sel}` by `{metric}`; the other splits are the "
             "report.", "", markdown_table(scores.table, selection_split=sel)]  # fmt: skip
    if search is not None and len(search) > 1:
        scored = sum(r["examples_scored"] for r in search)
        lines += ["", f"Coefficients searched over {len(search)} grid points (density-major; "
                  "a candidate replaced the best only when strictly better, so ties keep the "
                  f"earlier point); exact early rejection scored {scored} examples."]  # fmt: skip
    return "\n".join(lines)


def prepare(ctx: MethodContext) -> Any:
    """With a task: load it before the output is staged (the scorer is ``ctx.state``)."""
    if ctx.recipe.task is None:
        return None
    from hfsoup.errors import RecipeError
    from hfsoup.methods.shared import make_scorer

    if ctx.processes.distributed:
        raise RecipeError("task-vector merges scored on a task run in one process: drop "
                          "accelerate launch, or the task", options=["task"])  # fmt: skip
    return make_scorer(ctx.recipe.task, ctx.indexes[0], progress=ctx.progress,
                       processes=ctx.processes)  # fmt: skip


def _section(ctx: MethodContext, name: str, shown: dict[str, Any]) -> str:
    base = ctx.base.ingredient if ctx.base is not None else None
    label = base.label if base is not None else "(none)"
    where = f"`{label}` at commit `{base.sha}`" if base is not None and base.sha else f"`{label}`"
    coefficients = ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}"
                             for k, v in shown.items())  # fmt: skip
    weights = ", ".join(f"{w:g}" for w in user_weights(ctx))
    return (
        f"## Task-vector merge: {name}\n\n{_FORMULAS[name]}, with τᵢ = θᵢ − θ₀ per tensor in "
        f"float32.\n\n- base θ₀: {where}\n- coefficients: {coefficients}\n"
        f"- weights wᵢ: {weights}\n"
    )


def _estimate(name: str) -> Callable[[EstimateInput], Peak]:
    """``name``'s peak memory for ``hfsoup inspect`` (:func:`task_vector_peak`)."""

    def estimate(given: EstimateInput) -> Peak:
        from hfsoup.check.estimates import task_vector_peak

        whole = _ACCUMULATORS[name].whole_tensors
        return task_vector_peak(given, method=name, whole_tensors=whole)

    return estimate


def _method(name: str, summary: str, config: type[BaseModel]) -> MergeMethod:
    return register(
        MergeMethod(
            name,
            summary,
            run=run,
            prepare=prepare,
            card=f"{name}: {_FORMULAS[name]}",
            needs_base=True,
            config=config,
            estimate=_estimate(name),
        )  # fmt: skip
    )


TASK_ARITHMETIC = _method("task_arithmetic", "θ₀ + λ · the weighted sum of task vectors",
                          TaskVectorConfig)  # fmt: skip
TIES = _method("ties", "TIES: trim, elect signs, disjoint mean of task vectors", SparseConfig)
DARE_LINEAR = _method("dare_linear", "DARE drop-and-rescale, then the weighted mean of task "
                      "vectors", SparseConfig)  # fmt: skip
DARE_TIES = _method("dare_ties", "DARE drop-and-rescale, then TIES' sign election", SparseConfig)
WISE_FT = _method("wise_ft", "WiSE-FT: (1 − α) · base + α · the uniform soup", WiseConfig)
