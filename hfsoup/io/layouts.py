"""What a repo holds beside its transformers weights: sentence-transformers modules, adapters.

A sentence-transformers repo (the layout of all-MiniLM-L6-v2) is a transformers model at the top
(config.json, the weights, the tokenizer) plus ``modules.json``, which lists the modules an
embedding passes through, each in a folder of its own (``1_Pooling/config.json``; a ``2_Dense``
head with its own ``config.json`` and ``model.safetensors``), and two top-level settings files
(``config_sentence_transformers.json``, ``sentence_bert_config.json``). A soup keeps them all:
module weights are indexed here like any weights (headers only) and averaged like them, and the
modules' settings must agree across ingredients (a soup pooling unlike its ingredients embeds
wrongly without any error).

A PEFT adapter repo (``adapter_config.json`` and adapter weights, no full weights) is refused
with a line saying so: averaging adapters is not averaging models.

Nothing here reads a weight byte; :mod:`hfsoup.check.layouts` checks that the ingredients' layouts
agree, and :mod:`hfsoup.compute.layout_writer` writes the modules of a soup.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from hfsoup.errors import (
    CorruptWeightsError,
    UnsafeWeightsError,
    UnsupportedLayoutError,
)
from hfsoup.io.hub import Ingredient
from hfsoup.io.refs import IngredientIndex, Layout, Module
from hfsoup.io.refs import brief as _brief
from hfsoup.io.tensors import _read_header

MODULES_FILE = "modules.json"
# The top-level files of a sentence-transformers model besides modules.json: its settings and
# the Transformer module's own (``sentence_bert_config.json``; older releases named it after the
# architecture). Copied into a soup with the tokenizer files (hfsoup.io.writer.AUX_FILES).
SETTINGS_FILES = (
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
    "sentence_roberta_config.json",
    "sentence_distilbert_config.json",
    "sentence_camembert_config.json",
    "sentence_albert_config.json",
    "sentence_xlm-roberta_config.json",
    "sentence_xlnet_config.json",
)
ADAPTER_CONFIG = "adapter_config.json"
MODULE_WEIGHTS = "model.safetensors"
_MODULE_PICKLE = "pytorch_model.bin"
# sentence-transformers names a module's folder ``{idx}_{ClassName}``; one path segment.
_MODULE_DIR = re.compile(r"^\d+_[A-Za-z][\w.-]*$")
_SEGMENT = re.compile(r"^[A-Za-z0-9][\w.-]*$")
_MAX_MODULES = 64
_MAX_MODULES_BYTES = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".npy")


def is_module_file(path: str, folders: Sequence[str] | None = None) -> bool:
    """Whether a repo path is one hfsoup writes into a module folder of a soup
    (``1_Pooling/config.json``, ``2_Dense/model.safetensors``): in one of ``folders`` (those
    the soup's modules.json names), or by default in a folder named as sentence-transformers
    names them (``{idx}_{ClassName}``)."""
    folder, _, name = path.partition("/")
    known = folder in folders if folders is not None else bool(_MODULE_DIR.match(folder))
    return (
        known
        and "/" not in name
        and (name == MODULE_WEIGHTS or (name.endswith(".json") and bool(_SEGMENT.match(name))))
    )


def module_folders(modules_json: object) -> list[str]:
    """The module folders a parsed modules.json names (for a push: which folders are the
    soup's own); entries that are not a module folder are not among them."""
    if not isinstance(modules_json, list):
        return []
    paths = [m.get("path") for m in modules_json if isinstance(m, dict)]
    return [p for p in paths if isinstance(p, str) and _SEGMENT.match(p)]


def read_layout(ingredient: Ingredient, *, allow_pickle: bool = False) -> Layout | None:
    """Recognise an ingredient's layout from its file list (and its small settings files).

    Returns:
        ``None`` for a plain transformers repo; a :class:`Layout` for a sentence-transformers
        one.

    Raises:
        UnsupportedLayoutError: a PEFT adapter repo; a sentence-transformers repo whose
            transformers model lives in a subfolder (an older layout) or whose module folders
            hold files hfsoup cannot soup.
        UnsafeWeightsError: a module holds only pickle weights and ``allow_pickle`` is False.
        CorruptWeightsError: a malformed modules.json, settings file or module header.
    """
    _refuse_adapter(ingredient)
    if MODULES_FILE not in ingredient.files:
        return None
    modules = _read_modules(ingredient)
    layout = Layout(modules=modules)
    for name in SETTINGS_FILES:
        if name in ingredient.files:
            layout.settings[name] = ingredient.source.read_json(name)
    for module in modules:
        if module.path:
            _read_module(ingredient, module, layout, allow_pickle=allow_pickle)
    return layout


def _refuse_adapter(ingredient: Ingredient) -> None:
    files = ingredient.files
    full = any(
        f in files
        for f in (MODULE_WEIGHTS, "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json")
    )  # fmt: skip
    if ADAPTER_CONFIG not in files or full:
        return
    config = ingredient.source.read_json(ADAPTER_CONFIG)
    kind = config.get("peft_type")
    kind = kind if isinstance(kind, str) and _SEGMENT.match(kind) else "PEFT"
    base = config.get("base_model_name_or_path")
    onto = f" into its base ({_brief(base, 80)})" if isinstance(base, str) and base else ""
    raise UnsupportedLayoutError(
        f"{ingredient.label} is a PEFT {kind} adapter ({ADAPTER_CONFIG}), not a full model; "
        f"adapters are not supported yet: merge it{onto or ' into its base'} with peft first "
        "(PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(folder))"
    )


def _read_modules(ingredient: Ingredient) -> list[Module]:
    """modules.json, checked: a list of modules, each in the top folder or in a folder of one
    path segment of its own (a path is written into the soup, so ``../x`` is refused)."""
    where = ingredient.source.where(MODULES_FILE)
    raw = _read_small(ingredient, MODULES_FILE)
    try:
        entries = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CorruptWeightsError(f"{where}: not valid JSON") from exc
    if not isinstance(entries, list) or not entries or len(entries) > _MAX_MODULES:
        raise CorruptWeightsError(
            f"{where}: must be a list of 1 to {_MAX_MODULES} modules, got {_brief(entries)}"
        )
    modules: list[Module] = []
    for entry in entries:
        path = entry.get("path") if isinstance(entry, dict) else None
        kind = entry.get("type") if isinstance(entry, dict) else None
        if not (isinstance(path, str) and isinstance(kind, str) and kind):
            raise CorruptWeightsError(
                f"{where}: each module must have a string path and type, got {_brief(entry)}"
            )
        if path and not _SEGMENT.match(path):
            raise CorruptWeightsError(
                f"{where}: module path {_brief(path)} is not a folder name of the repo"
            )
        if path in {m.path for m in modules}:
            raise CorruptWeightsError(f"{where}: names the module folder {_brief(path)} twice")
        modules.append(Module(path, kind.rsplit(".", 1)[-1]))
    if not any(m.path == "" for m in modules):
        inner = next((m.path for m in modules if m.kind == "Transformer"), modules[0].path)
        raise UnsupportedLayoutError(
            f"{ingredient.label} is a sentence-transformers model whose first module lives in "
            f"{_brief(inner)}/ (an older layout); hfsoup soups the layout with the transformers "
            "model at the top of the repo: save it again with sentence-transformers first"
        )
    return modules


def _read_small(ingredient: Ingredient, name: str) -> bytes:
    where = ingredient.source.where(name)
    size = ingredient.files.get(name)
    if size is not None and size > _MAX_MODULES_BYTES:
        raise CorruptWeightsError(f"{where}: {size} bytes, more than hfsoup reads for it (1 MiB)")
    try:
        with open(ingredient.source.local_file(name), "rb") as f:
            raw = f.read(_MAX_MODULES_BYTES + 1)
    except OSError as exc:
        raise CorruptWeightsError(f"{where}: cannot be read ({exc.strerror})") from exc
    if len(raw) > _MAX_MODULES_BYTES:
        raise CorruptWeightsError(f"{where}: more than hfsoup reads for it (1 MiB)")
    return raw


def _read_module(
    ingredient: Ingredient, module: Module, layout: Layout, *, allow_pickle: bool
) -> None:
    """A module folder's settings (``*.json``) and weights (one ``model.safetensors``)."""
    prefix = module.path + "/"
    names = sorted(f[len(prefix) :] for f in ingredient.files if f.startswith(prefix))
    odd = [n for n in names if "/" in n or not (n.endswith(".json") or n in _WEIGHT_NAMES)]
    if odd:
        raise UnsupportedLayoutError(
            f"{ingredient.label}: module folder {module.path}/ holds {prefix}{_brief(odd[0], 80)}, "
            f"which hfsoup cannot soup (a module folder may hold JSON settings and one "
            f"{MODULE_WEIGHTS})"
        )
    for name in names:
        if name.endswith(".json"):
            layout.settings[prefix + name] = ingredient.source.read_json(prefix + name)
            layout.files.append(prefix + name)
    if MODULE_WEIGHTS in names:
        refs = _read_header(ingredient, prefix + MODULE_WEIGHTS)
        pickle = False
    elif _MODULE_PICKLE in names:
        if not allow_pickle:
            raise UnsafeWeightsError(
                f"{ingredient.label}: module {module.path} has only pickle weights "
                f"({prefix}{_MODULE_PICKLE}); pickle can run code when loaded. Set "
                "allow_pickle to load it with torch.load(weights_only=True)",
                options=["allow_pickle"],
            )
        from hfsoup.io.pickled import pickle_refs

        refs, pickle = pickle_refs(ingredient, prefix + _MODULE_PICKLE), True
    else:
        return
    if not refs:
        raise CorruptWeightsError(f"{ingredient.label}: module {module.path} holds no tensors")
    config = layout.settings.get(prefix + "config.json", {})
    layout.weights[module.path] = IngredientIndex(
        ingredient=ingredient, tensors=refs, config=config, pickle=pickle
    )


_WEIGHT_NAMES = (MODULE_WEIGHTS, _MODULE_PICKLE)


__all__ = [
    "Layout",
    "MODULES_FILE",
    "Module",
    "SETTINGS_FILES",
    "is_module_file",
    "module_folders",
    "read_layout",
]
