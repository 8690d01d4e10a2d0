"""PEFT LoRA adapters as ingredients: each one read as the full model θ₀ + ΔW it stands for.

An adapter repo (``adapter_config.json`` + ``adapter_model.safetensors``, no full weights)
becomes a *virtual full ingredient*: its :class:`~hfsoup.io.refs.IngredientIndex` lists the
base model's tensors (read from the base's files), and when a tensor named by a LoRA target
module is streamed, the adapter's ΔW = s · B · A is added to it (s = lora_alpha / r, or
lora_alpha / √r with rsLoRA; transposed for GPT-2's Conv1D, ``fan_in_fan_out``, and for
embeddings). Tensors the adapter saves whole (``modules_to_save`` such as a classifier head, or
biases) replace the base's. Every merge method then works unchanged: a uniform soup of adapters
is θ₀ + mean ΔWᵢ, and the task vectors of a task-vector merge are the ΔWᵢ.

ΔW is formed one tensor at a time as the stream reaches it, never for the whole model; the small
A and B matrices of one adapter are read once (on first use) and kept.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hfsoup.errors import (
    CorruptWeightsError,
    IncompatibleIngredientsError,
    UnsupportedLayoutError,
)
from hfsoup.io.hub import Ingredient
from hfsoup.io.refs import IngredientIndex, TensorRef
from hfsoup.io.refs import brief as _brief
from hfsoup.io.refs import few as _few
from hfsoup.io.streaming import plan_ref_fetches, read_fetch
from hfsoup.io.tensors import read_safetensors_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_FULL_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# How PEFT names the wrapped model's modules in the files it saves.
_PREFIX = "base_model.model."
_LORA_PARTS = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}


def is_adapter(ingredient: Ingredient) -> bool:
    """Whether an ingredient is a PEFT adapter repo (its config, and no full model weights)."""
    files = ingredient.files
    return ADAPTER_CONFIG in files and not any(f in files for f in _FULL_WEIGHTS)


@dataclass(frozen=True)
class LoraModule:
    """One target module of an adapter: where its A and B live, and how ΔW is formed."""

    target: str  # the base tensor ΔW is added to
    module: str  # the module's path as PEFT names it
    a: str
    b: str
    scaling: float
    transpose: bool
    embedding: bool = False


@dataclass
class AdapterFile:
    """An adapter repo as read from its config and header (no weight byte)."""

    ingredient: Ingredient
    config: dict
    refs: dict[str, TensorRef]

    @property
    def base_name(self) -> str | None:
        """The base model the adapter names (``base_model_name_or_path[@revision]``), if any."""
        name = self.config.get("base_model_name_or_path")
        if not isinstance(name, str) or not name.strip():
            return None
        revision = self.config.get("revision")
        return f"{name}@{revision}" if isinstance(revision, str) and revision else name


def read_adapter(ingredient: Ingredient) -> AdapterFile:
    """Read and check an adapter's config and weight header.

    Raises:
        UnsupportedLayoutError: not a LoRA adapter (another PEFT type), DoRA, LoRA biases,
            per-module alphas or trainable token indices, or adapter weights in a pickle.
        CorruptWeightsError: a malformed config or header.
    """
    label = ingredient.label
    config = ingredient.source.read_json(ADAPTER_CONFIG)
    kind = config.get("peft_type")
    if kind != "LORA":
        raise UnsupportedLayoutError(
            f"{label} is a PEFT {_brief(kind, 40)} adapter; hfsoup soups LoRA adapters only"
        )
    for key, what in (("use_dora", "a DoRA adapter"), ("lora_bias", "an adapter with LoRA "
                      "biases"), ("alpha_pattern", "an adapter with per-module alphas"),
                      ("trainable_token_indices", "an adapter with trainable tokens")):  # fmt: skip
        if config.get(key):
            raise UnsupportedLayoutError(f"{label} is {what} ({key}); hfsoup soups plain LoRA")
    alpha = config.get("lora_alpha")
    if type(alpha) not in (int, float) or alpha <= 0:
        raise CorruptWeightsError(
            f"{label}: {ADAPTER_CONFIG}: lora_alpha must be a positive number"
        )
    if ADAPTER_WEIGHTS not in ingredient.files:
        raise UnsupportedLayoutError(
            f"{label} has no {ADAPTER_WEIGHTS} (pickled adapter weights are not read)"
        )
    refs = read_safetensors_header(ingredient, ADAPTER_WEIGHTS)
    return AdapterFile(ingredient=ingredient, config=config, refs=refs)


def common_base(adapters: Sequence[AdapterFile], override: str | None) -> str:
    """The base model every adapter is applied to: ``override`` when given, else the one they
    all name.

    Raises:
        IncompatibleIngredientsError: they name different base models (named), or none does.
    """
    if override is not None:
        return override
    names = {a.ingredient.label: a.base_name for a in adapters}
    missing = [label for label, n in names.items() if n is None]
    if missing:
        raise IncompatibleIngredientsError(
            f"{_few(missing, quote=False)} name(s) no base model (base_model_name_or_path); "
            "give the base to apply the adapters to"
        )
    distinct = sorted({n for n in names.values() if n is not None})
    if len(distinct) > 1:
        shown = "; ".join(f"{label}: {n}" for label, n in names.items())
        raise IncompatibleIngredientsError(
            f"the adapters name different base models ({shown}); adapters on different bases "
            "cannot be souped"
        )
    return distinct[0]


@dataclass
class BoundAdapter:
    """An adapter matched to its base's tensors: adds ΔW to the streamed base tensors.

    Attributes:
        file: the adapter as read.
        base: the base model's index.
        modules: the LoRA target modules, by the base tensor each changes.
        replaced: base tensor name -> the adapter tensor saved whole in its place.
    """

    file: AdapterFile
    base: IngredientIndex
    modules: dict[str, LoraModule]
    replaced: dict[str, str]
    _loaded: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def weights(self) -> dict[str, torch.Tensor]:
        """The adapter's own tensors, read once (they are small: r · (in + out) per module)."""
        with self._lock:
            if self._loaded is None:
                index = IngredientIndex(ingredient=self.file.ingredient, tensors=self.file.refs,
                                        config={})  # fmt: skip
                loaded: dict[str, torch.Tensor] = {}
                for fetch in plan_ref_fetches(index, self.file.refs.values(), slot=0):
                    loaded.update({k: t.clone() for k, t in read_fetch(fetch).items()})
                self._loaded = loaded
            return self._loaded

    def delta(self, name: str, rows: slice = slice(None)) -> torch.Tensor | None:
        """ΔW for base tensor ``name`` (its ``rows`` only) in float32; None where the adapter
        does not change it. Only the rows asked for are formed."""
        module = self.modules.get(name)
        if module is None:
            return None
        w = self.weights()
        a, b = w[module.a].float(), w[module.b].float()
        if module.transpose:  # ΔW = (B·A)ᵀ: its rows are columns of A
            return (b @ a[:, rows]).T * module.scaling
        return (b[rows] @ a) * module.scaling

    def apply(
        self, refs: Sequence[TensorRef], tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The base tensors of one read as this adapter's model has them: θ₀ + ΔW (float32),
        or the tensor the adapter saved whole; other tensors unchanged (the same objects).

        ``refs``: the read's refs; one that is some rows of a tensor gets those rows' ΔW.
        """
        out = dict(tensors)
        for ref in refs:
            name = ref.name
            if name not in self.replaced and name not in self.modules:
                continue
            rows = _rows(self.base.tensors[name], ref)
            if name in self.replaced:
                out[name] = self.weights()[self.replaced[name]][rows]
            else:
                out[name] = tensors[name].float() + self.delta(name, rows)
        return out


def _rows(full: TensorRef, part: TensorRef) -> slice:
    """Which rows of tensor ``full`` the ref ``part`` covers (all, for the whole tensor)."""
    if part.shape == full.shape:
        return slice(None)
    row0 = (part.start - full.start) // (full.nbytes // full.shape[0])
    return slice(row0, row0 + part.shape[0])


def bind(adapter: AdapterFile, base: IngredientIndex) -> IngredientIndex:
    """The adapter as a virtual full ingredient on ``base``: its index lists the base's
    tensors, its reads go to the base's files, and each read is patched by the adapter.

    The virtual ingredient keeps the adapter's name, SHA and card; its source is a copy of the
    base's (so each stream of the base file is hashed on its own).

    Raises:
        IncompatibleIngredientsError: a target module or saved tensor the base does not have,
            or A and B whose product is not the base tensor's shape (named).
        CorruptWeightsError: an A without its B, or matrices that are not 2-D.
    """
    modules, replaced = _match(adapter, base)
    ing = adapter.ingredient
    virtual = Ingredient(spec=ing.spec, sha=ing.sha, source=copy.copy(base.ingredient.source),
                         card=ing.card)  # fmt: skip
    bound = BoundAdapter(file=adapter, base=base, modules=modules, replaced=replaced)
    return IngredientIndex(ingredient=virtual, tensors=dict(base.tensors), config=base.config,
                           pickle=base.pickle, layout=base.layout, adapter=bound)  # fmt: skip


def _match(
    adapter: AdapterFile, base: IngredientIndex
) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """Pair each A with its B and each module with a base tensor; check every shape."""
    label = adapter.ingredient.label
    parts: dict[str, dict[str, str]] = {}
    embedding: dict[str, bool] = {}
    replaced: dict[str, str] = {}
    unknown: list[str] = []
    for key in adapter.refs:
        for suffix, (which, emb) in _LORA_PARTS.items():
            if key.endswith(suffix):
                module = _strip(key[: -len(suffix)])
                parts.setdefault(module, {})[which] = key
                embedding[module] = emb
                break
        else:
            target = _base_name(_strip(key).replace(".modules_to_save.default", ""), base)
            (unknown.append(key) if target is None else replaced.__setitem__(target, key))
    modules: dict[str, LoraModule] = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise CorruptWeightsError(f"{label}: module {_brief(module)} has lora_{''.join(ab)} "
                                      "but not its pair")  # fmt: skip
        target = _base_name(f"{module}.weight", base)
        if target is None:
            unknown.append(ab["A"])
            continue
        modules[target] = _module(adapter, target, ab, embedding[module], base.tensors[target])
    if unknown:
        raise IncompatibleIngredientsError(
            f"{label}: the base {base.ingredient.label} has no tensor for {_few(sorted(unknown))}"
        )
    for target, key in replaced.items():
        if adapter.refs[key].shape != base.tensors[target].shape:
            raise IncompatibleIngredientsError(
                f"{label}: tensor {_brief(key)} has shape {list(adapter.refs[key].shape)}, the "
                f"base's {_brief(target)} {list(base.tensors[target].shape)}"
            )
    return modules, replaced


def _module(
    adapter: AdapterFile, target: str, ab: dict[str, str], emb: bool, ref: TensorRef
) -> LoraModule:
    label, cfg = adapter.ingredient.label, adapter.config
    a, b = adapter.refs[ab["A"]].shape, adapter.refs[ab["B"]].shape
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        raise CorruptWeightsError(
            f"{label}: {_brief(ab['A'])} {list(a)} and {_brief(ab['B'])} {list(b)} are not a "
            "LoRA pair (2-D, B's columns = A's rows)"
        )
    rank = a[0]  # the module's own rank (rank_pattern may give it another than r)
    transpose = emb or bool(cfg.get("fan_in_fan_out"))
    if not transpose and tuple(ref.shape) == (a[1], b[0]) != (b[0], a[1]):
        transpose = True  # a Conv1D saved with fan_in_fan_out false: peft transposes it too
    shape = (a[1], b[0]) if transpose else (b[0], a[1])
    if tuple(ref.shape) != shape:
        raise IncompatibleIngredientsError(
            f"{label}: ΔW of {_brief(target)} would have shape {list(shape)}, the base's tensor "
            f"has {list(ref.shape)}"
        )
    alpha = float(cfg["lora_alpha"])
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    return LoraModule(target=target, module=_strip(ab["A"]).rsplit(".lora_", 1)[0], a=ab["A"],
                      b=ab["B"], scaling=scaling, transpose=transpose, embedding=emb)  # fmt: skip


def _strip(key: str) -> str:
    return key[len(_PREFIX) :] if key.startswith(_PREFIX) else key


def _base_name(name: str, base: IngredientIndex) -> str | None:
    """The base tensor a PEFT module path names: itself, or without the model's prefix
    (``transformer.h.0...`` in a checkpoint saved as ``h.0...``)."""
    if name in base.tensors:
        return name
    head, _, rest = name.partition(".")
    return rest if rest and rest in base.tensors else None
