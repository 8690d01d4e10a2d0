"""The pre-download doctor behind ``hfsoup inspect``: what a soup of these ingredients will meet.

From the listings, configs, safetensors headers and small files alone (no weight byte): each
ingredient's tokenizer, labels, layout files, dtypes and download size, what differs across
them (errors, warnings, notes), and an estimate of the chosen method's peak memory and time on
this machine. :func:`examine` builds the report; :func:`render` writes it as the text the CLI
prints and the Space shows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hfsoup.check.estimates import EstimateInput, Peak, estimate_run, uniform_peak
from hfsoup.check.layouts import normalised_settings
from hfsoup.errors import CorruptWeightsError
from hfsoup.io.hub import HubSource, Ingredient
from hfsoup.io.tensors import FLOAT_DTYPES, IngredientIndex
from hfsoup.io.tokenizer_files import compare, read_tokenizers
from hfsoup.units import human_bytes

# Layout files: read to be compared when small JSON files, else only their presence.
_LAYOUT_NAMES = (
    "modules.json",
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
    "adapter_config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor_config.json",
)
_MODULE_DIR = re.compile(r"^\d+_[^/]+/[^/]+\.json$")  # 1_Pooling/config.json, 2_Dense/...
_LAYOUT_JSON_LIMIT = 1 << 20


@dataclass
class Finding:
    """One thing the doctor found: ``level`` is ``error`` (a soup is refused), ``warning``
    (it runs, but check this) or ``note``."""

    level: str
    topic: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"level": self.level, "topic": self.topic, "message": self.message}


@dataclass
class Examination:
    """The doctor's report: per-ingredient facts, findings, and the estimate."""

    details: list[dict[str, Any]]
    findings: list[Finding]
    estimate: dict[str, Any]
    tokenizer_problem: str | None = None


def examine(
    indexes: Sequence[IngredientIndex],
    *,
    method: str = "uniform",
    estimate: Callable[[EstimateInput], Peak] = uniform_peak,
    bandwidth: float | None = None,
    max_shard_size: int = 5 * 10**9,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    base: IngredientIndex | None = None,
    scored: bool = False,
    combine: str | None = None,
) -> Examination:
    """Examine indexed ingredients before any weight byte is read.

    Args:
        indexes: the ingredients, indexed (:func:`hfsoup.api.load_ingredients`).
        method / estimate: the soup method to estimate for, and its ``MergeMethod.estimate``.
        bandwidth: bytes per second from the Hub; default :data:`DEFAULT_BANDWIDTH`.
        max_shard_size / dtype: the output options (a uniform soup holds one output shard).
        device: where the soup would run; default CUDA when available, else the CPU.
        base / scored / combine: a base model θ₀ the run reads too (task-vector merges, greedy
            ``combine``), whether it is scored on a task, and greedy's ``combine``.

    Returns:
        An :class:`Examination`.

    Raises:
        CorruptWeightsError: a tokenizer file cannot be read as JSON or text.
    """
    ingredients = [ix.ingredient for ix in indexes]
    tokenizers = read_tokenizers(ingredients)
    layouts = [_layout(i) for i in ingredients]
    details = [
        {
            "tokenizer": tok.to_dict(),
            "labels": ix.config.get("id2label"),
            "layout": {k: v for k, v in lay.items() if k != "json"},
            "dtype_bytes": _dtype_bytes(ix),
            **_sizes(ix),
        }
        for ix, tok, lay in zip(indexes, tokenizers, layouts, strict=True)
    ]
    findings: list[Finding] = []
    problem = None
    first = indexes[0].ingredient.label
    for ix, tok, lay in zip(indexes[1:], tokenizers[1:], layouts[1:], strict=True):
        who = f"{ix.ingredient.label} differs from {first}"
        diff = compare(tokenizers[0], tok)
        error = diff.id_problem(who)
        if error:
            problem = problem or error
            findings.append(Finding("error", "tokenizer", error))
        findings += [Finding("warning", "tokenizer", f"{who}: {m}") for m in diff.warnings]
        findings += [Finding("note", "tokenizer", f"{who}: {m}") for m in diff.notes]
        findings += _label_findings(indexes[0], ix, who)
        findings += _layout_findings(layouts[0], lay, who)
        findings += _dtype_findings(indexes[0], ix, who)
    for ix, lay in zip(indexes, layouts, strict=True):
        if lay["kind"] == "peft-adapter":
            findings.append(
                Finding(
                    "warning",
                    "layout",
                    f"{ix.ingredient.label} is a PEFT "
                    "adapter repo (adapter_config.json): hfsoup soups full "
                    "models, not adapters",
                )
            )
    read = details + ([_sizes(base)] if base is not None else [])  # the base is read too
    estimate = estimate_run(indexes, read, method=method, estimate=estimate, bandwidth=bandwidth,
                            max_shard_size=max_shard_size, dtype=dtype, device=device, base=base,
                            scored=scored, combine=combine)  # fmt: skip
    if not estimate["fits"]:
        needs = human_bytes(estimate["peak_memory_bytes"])
        have = f"{human_bytes(estimate['available_memory_bytes'])} {estimate['available_from']}"
        message = f"a {method} soup needs ~{needs}, more than the {have}"
        findings.append(Finding("warning", "memory", message))
    return Examination(details, findings, estimate, problem)


def _sizes(ix: IngredientIndex) -> dict[str, Any]:
    """Bytes of the weight files; for a Hub ingredient, how many a soup downloads and how many
    are in the HF cache already (greedy and learned soups read cached files from disk)."""
    ing = ix.ingredient
    files = sorted({ref.file for ref in ix.tensors.values()})
    sizes = {f: ing.files.get(f) for f in files}
    if any(s is None for s in sizes.values()):  # not listed: what the tensors need
        for ref in ix.tensors.values():
            sizes[ref.file] = max(sizes[ref.file] or 0, ref.end)
    total = sum(s or 0 for s in sizes.values())
    local = not isinstance(ing.source, HubSource)
    cached = 0 if local else sum(s or 0 for f, s in sizes.items() if _in_cache(ing, f))
    return {"weight_files": files, "weight_bytes": total, "local": local, "cached_bytes": cached}


def _in_cache(ingredient: Ingredient, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    spec = ingredient.spec
    found = try_to_load_from_cache(spec.repo, filename, revision=ingredient.sha)
    return isinstance(found, str)


def _dtype_bytes(ix: IngredientIndex) -> dict[str, int]:
    out: dict[str, int] = {}
    for ref in ix.tensors.values():
        out[ref.dtype] = out.get(ref.dtype, 0) + ref.nbytes
    return dict(sorted(out.items()))


def _layout(ingredient: Ingredient) -> dict[str, Any]:
    """Which layout the repo has (transformers, sentence-transformers, a PEFT adapter), its
    layout files, the pooling a sentence-transformers model uses, and the small JSON ones."""
    files = sorted(f for f in ingredient.files if f in _LAYOUT_NAMES or _MODULE_DIR.match(f))
    kind = "transformers"
    if "adapter_config.json" in files:
        kind = "peft-adapter"
    elif "modules.json" in files:
        kind = "sentence-transformers"
    read: dict[str, Any] = {}
    for f in files:
        size = ingredient.files.get(f)
        if size is None or size <= _LAYOUT_JSON_LIMIT:
            try:
                read[f] = ingredient.source.read_json(f)
            except CorruptWeightsError as exc:
                read[f] = {"(unreadable)": str(exc)}
    pooling = None
    for f, data in read.items():
        if f.endswith("Pooling/config.json") and isinstance(data, dict):
            # The modes as the layout check compares them (old boolean keys or pooling_mode,
            # a string or a list).
            pooling = "+".join(normalised_settings(data).get("pooling_mode", [])) or None
    return {"kind": kind, "files": files, "pooling": pooling, "json": read}


def _label_findings(first: IngredientIndex, other: IngredientIndex, who: str) -> list[Finding]:
    a, b = first.config.get("id2label"), other.config.get("id2label")
    if a == b:
        return []
    if other.row_perm is not None:
        return [
            Finding(
                "note",
                "labels",
                f"{who}: the same labels in another order; its "
                "classification head rows are aligned to the first's",
            )
        ]
    return [Finding("warning", "labels", f"{who}: id2label {b} vs {a}")]


def _layout_findings(first: dict, other: dict, who: str) -> list[Finding]:
    out = []
    for f in sorted(set(first["files"]) ^ set(other["files"])):
        where = "only this one" if f in other["files"] else "only the first"
        out.append(
            Finding(
                "warning",
                "layout",
                f"{who}: {f} is in {where}; the soup keeps the first's layout files",
            )
        )
    for f in sorted(first["json"].keys() & other["json"].keys()):
        a, b = first["json"][f], other["json"][f]
        if f == "generation_config.json" or a == b:
            continue
        keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        shown = ", ".join(f"{k} {b.get(k)!r} vs {a.get(k)!r}"[:80] for k in keys[:4])
        out.append(
            Finding(
                "warning",
                "layout",
                f"{who}: {f} differs ({shown}"
                f"{' ...' if len(keys) > 4 else ''}); the soup keeps the first's",
            )
        )
    if first["pooling"] != other["pooling"] and first["pooling"] and other["pooling"]:
        out.append(
            Finding(
                "warning",
                "layout",
                f"{who}: pooling {other['pooling']} vs "
                f"{first['pooling']}: the soup embeds with the first's",
            )
        )
    return out


def _dtype_findings(first: IngredientIndex, other: IngredientIndex, who: str) -> list[Finding]:
    a = {r.dtype for r in first.tensors.values() if r.dtype in FLOAT_DTYPES}
    b = {r.dtype for r in other.tensors.values() if r.dtype in FLOAT_DTYPES}
    if a == b:
        return []
    return [
        Finding(
            "note",
            "dtypes",
            f"{who}: float dtypes {', '.join(sorted(b))} vs "
            f"{', '.join(sorted(a))}; the soup is written in the first's unless an "
            "output dtype is given",
        )
    ]


def render(report: dict[str, Any]) -> str:
    """The report of :meth:`hfsoup.Inspection.to_dict` as text (the CLI's and the Space's)."""
    lines = []
    for row in report["ingredients"]:
        sha = row["sha"] or "(local)"
        lines.append(
            f"{row['ingredient']}\n  sha: {sha}\n  parameters: {row['parameters']:,}  "
            f"bytes: {row['bytes']:,}  dtypes: {', '.join(row['dtypes'])}  "
            f"model_type: {row['model_type']}  format: {row['format']}"
        )
        if "tokenizer" not in row:
            continue
        tok = row["tokenizer"]
        if tok["files"]:
            special = ", ".join(
                f"{k.removesuffix('_token')}={v}"
                for k, v in tok["special_tokens"].items()
                if isinstance(v, str)
            )
            lines.append(
                f"  tokenizer: vocab {tok['vocab_size'] or '?'} "
                f"({tok['vocab_from'] or 'not readable as data'}), "
                f"{len(tok['added_tokens'])} added tokens, special: {special or 'none'}"
                f"{', chat template' if tok['chat_template'] else ''}"
            )
        else:
            lines.append("  tokenizer: no tokenizer files")
        labels = row["labels"]
        layout = row["layout"]
        lines.append(
            f"  labels: {', '.join(labels.values()) if labels else 'none'}  "
            f"layout: {layout['kind']}"
            f"{', pooling ' + layout['pooling'] if layout['pooling'] else ''}"
            f"{' (' + ', '.join(layout['files']) + ')' if layout['files'] else ''}"
        )
        where = (
            "local folder"
            if row["local"]
            else f"{human_bytes(row['cached_bytes'])} in the HF cache"
        )
        lines.append(
            f"  weight files: {len(row['weight_files'])}, "
            f"{human_bytes(row['weight_bytes'])} ({where})"
        )
    for f in report.get("findings", []):
        lines.append(f"{f['level']}: {f['message']}")
    est = report.get("estimate")
    if est:
        memory = human_bytes(est["peak_memory_bytes"])
        have = f"{human_bytes(est['available_memory_bytes'])} {est['available_from']}"
        lines.append(
            f"estimate for a {est['method']} soup on this machine ({est['device']}): download "
            f"{human_bytes(est['download_bytes'])}, ~{est['seconds']:g} s; peak memory ~{memory} "
            f"of {have}{'' if est['fits'] else ' (does not fit)'}"
        )
        lines.append(f"  an estimate, assuming {'; '.join(est['assumes'])}")
    lines.append("compatible: yes" if report["compatible"] else "compatible: NO")
    return "\n".join(lines)


__all__ = ["Examination", "Finding", "examine", "render"]
