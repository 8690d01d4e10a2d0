"""Whether ingredients can be averaged, decided on what matters.

What matters is what averaging needs: the same tensor names, shapes and kind (float or integer)
per tensor, the same label set and ``model_type``, and the few config fields that change what the
same weights compute (:data:`FUNCTIONAL_FIELDS`). Any other config difference (``architectures``
not set, ``_name_or_path``, ``transformers_version``, the dtype, dropout, ...) is a warning naming
the fields: the soup is written with the first ingredient's config.json.

Nothing here reads a weight byte or changes an index: :func:`check_compatible` reports, and
:func:`align_ingredients` returns new indexes with label alignment set.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from hfsoup.check.labels import label_permutation
from hfsoup.dtypes import FLOAT_CODES as FLOAT_DTYPES
from hfsoup.errors import IncompatibleIngredientsError
from hfsoup.io.refs import IngredientIndex
from hfsoup.io.refs import brief as _brief
from hfsoup.io.refs import few as _few

log = logging.getLogger("hfsoup")

# How serious a difference is; an error message leads with the most serious (lowest).
NAMES, SHAPES, KINDS, LABELS, CONFIG = range(5)

#: Config fields (at any nesting depth) that change what the same weights compute: the soup runs
#: with the first ingredient's value, so an ingredient trained with another is refused.
FUNCTIONAL_FIELDS = frozenset(
    {
        "activation_function",
        "add_cross_attention",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "head_dim",
        "hidden_act",
        "hidden_activation",
        "is_decoder",
        "is_encoder_decoder",
        "layer_norm_eps",
        "layer_norm_epsilon",
        "layer_types",
        "model_type",
        "norm_eps",
        "num_attention_heads",
        "num_key_value_heads",
        "partial_rotary_factor",
        "position_embedding_type",
        "rms_norm_eps",
        "rope_parameters",
        "rope_scaling",
        "rope_theta",
        "scale_attn_weights",
        "sliding_window",
        "tie_word_embeddings",
    }
)
# Compared on their own (model_type, the labels) or derived from what is (num_labels).
_OWN_CHECKS = frozenset({"model_type", "id2label", "label2id", "num_labels"})
_HEAD_PARTS = ("classifier", "score", "head")
_UNSET = object()
_SHOWN = 4


@dataclass(frozen=True)
class LabelAlignment:
    """An ingredient naming the reference's labels in another order: its head rows are read as
    ``rows[row_perm]`` for the tensors in ``head_tensors``."""

    row_perm: list[int]
    head_tensors: frozenset[str]


@dataclass(frozen=True)
class Compatibility:
    """What :func:`check_compatible` found in ingredients it accepts.

    ``config_fields``: per ingredient label, the config fields that differ from the first
    ingredient's without deciding compatibility (the warning's list). ``alignments``: per
    position in the ingredient list, the label alignment its head needs.
    """

    config_fields: dict[str, list[str]] = field(default_factory=dict)
    alignments: dict[int, LabelAlignment] = field(default_factory=dict)


def check_compatible(indexes: Sequence[IngredientIndex]) -> Compatibility:
    """Check every ingredient against the first, from headers and config.json alone.

    Refused: different tensor names, shapes, float-or-integer kind (integer tensors: dtype),
    label sets, ``model_type`` or :data:`FUNCTIONAL_FIELDS`. The message names the ingredient
    and leads with the most serious difference, in that order, then lists the others. Other
    config differences are logged as one warning per ingredient (``hfsoup`` logger) when the
    ingredients are compatible. The indexes are not changed.

    Returns:
        A :class:`Compatibility` report.

    Raises:
        IncompatibleIngredientsError: one line, as above.

    Example:
        >>> check_compatible(indexes).config_fields  # doctest: +SKIP
        {'org/ft-2': ['architectures (unset in org/ft-2)', 'transformers_version']}
    """
    first = indexes[0]
    problems: dict[int, list[tuple[int, str]]] = {}
    report = Compatibility()
    for pos, other in enumerate(indexes[1:], start=1):
        found: list[tuple[int, str]] = []
        found += _tensor_problems(first, other)
        if first.config.get("model_type") != other.config.get("model_type"):
            found.append((LABELS, _differs("model_type", first.config, other.config)))
        alignment = _label_alignment(first, other, found)
        errors, cosmetic = _config_differences(first, other)
        found += [(CONFIG, text) for text in errors]
        if found:
            problems[pos] = sorted(found, key=lambda p: p[0])
            continue
        if alignment is not None:
            report.alignments[pos] = alignment
        if cosmetic:
            report.config_fields[other.ingredient.label] = cosmetic
    if problems:
        raise IncompatibleIngredientsError(_message(indexes, problems))
    for label, fields in report.config_fields.items():
        log.warning(
            "%s differs from %s in config fields that do not decide compatibility: %s; the "
            "soup's config.json is %s's",
            label, first.ingredient.label, _few(fields, 8, quote=False), first.ingredient.label,
        )  # fmt: skip
    return report


def align_ingredients(indexes: Sequence[IngredientIndex]) -> list[IngredientIndex]:
    """:func:`check_compatible`, then the indexes to stream: copies with label alignment set
    where an ingredient names the first one's labels in another order.

    Raises:
        IncompatibleIngredientsError: see :func:`check_compatible`.
    """
    alignments = check_compatible(indexes).alignments
    return [
        replace(ix, row_perm=a.row_perm, head_tensors=a.head_tensors)
        if (a := alignments.get(i)) is not None
        else ix
        for i, ix in enumerate(indexes)
    ]


def check_base(base: IngredientIndex, indexes: Sequence[IngredientIndex]) -> None:
    """Refuse a base model θ₀ whose tensors are not the ingredients' (names, shapes, kinds): a
    task vector θᵢ − θ₀ is taken tensor by tensor.

    Raises:
        IncompatibleIngredientsError: naming the first tensor that differs.
    """
    problems = sorted(_tensor_problems(indexes[0], base))
    if problems:
        text = problems[0][1]
        head = problems[0][0] == SHAPES and any(p in text for p in _HEAD_PARTS)
        hint = " (its head is not the ingredients': give a base with their head shape)" * head
        raise IncompatibleIngredientsError(
            f"base {base.ingredient.label} does not fit {indexes[0].ingredient.label}: {text}{hint}"
        )
    _check_base_labels(base, indexes[0])


def _check_base_labels(base: IngredientIndex, first: IngredientIndex) -> None:
    """Refuse a base whose head names the ingredients' labels in another order: θᵢ − θ₀ would
    subtract another label's head row, silently. A base with other label names (a pretrained
    model's ``LABEL_0``, ``LABEL_1`` beside a fresh head) is taken as it is."""
    a, b = _labels(first.config), _labels(base.config)
    if a is None or b is None or a == b or set(a.values()) != set(b.values()):
        return
    if label_permutation(a, b) is not None:
        raise IncompatibleIngredientsError(
            f"base {base.ingredient.label} orders its labels differently from "
            f"{first.ingredient.label} (id2label {_brief(b, 200)} != {_brief(a, 200)}): its head "
            "rows would be subtracted from other labels' rows; give a base with the ingredients' "
            "label order"
        )


def _tensor_problems(first: IngredientIndex, other: IngredientIndex) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    missing = sorted(first.tensors.keys() - other.tensors.keys())
    extra = sorted(other.tensors.keys() - first.tensors.keys())
    if missing or extra:
        parts = [
            f"missing {_few(missing)}" if missing else "",
            f"extra {_few(extra)}" if extra else "",
        ]
        found.append((NAMES, f"tensor names: {'; '.join(p for p in parts if p)}"))
    shapes, kinds = [], []
    for name, ref in first.tensors.items():
        o = other.tensors.get(name)
        if o is None:
            continue
        if o.shape != ref.shape:
            shapes.append(
                f"tensor {_brief(name)} has shape {list(o.shape)}, expected {list(ref.shape)}"
            )
        if (o.dtype in FLOAT_DTYPES) != (ref.dtype in FLOAT_DTYPES) or (
            ref.dtype not in FLOAT_DTYPES and o.dtype != ref.dtype
        ):
            kinds.append(f"tensor {_brief(name)} has dtype {o.dtype}, expected {ref.dtype}")
    for rank, texts, what in ((SHAPES, shapes, "shapes"), (KINDS, kinds, "dtypes")):
        if texts:
            more = f" (and {len(texts) - 1} more tensors of other {what})" if len(texts) > 1 else ""
            found.append((rank, texts[0] + more))
    return found


def _label_alignment(
    first: IngredientIndex, other: IngredientIndex, found: list[tuple[int, str]]
) -> LabelAlignment | None:
    """Same label names in another order: the head rows to permute; a problem is appended to
    ``found`` when the label sets differ or no head can be aligned."""
    a, b = _labels(first.config), _labels(other.config)
    if a == b:
        return None
    shown = f"id2label {_brief(b, 200)} != {_brief(a, 200)}"
    if a is None or b is None:
        found.append((LABELS, shown))
        return None
    try:
        perm = label_permutation(a, b)
    except IncompatibleIngredientsError as exc:
        found.append((LABELS, f"{shown} ({exc})"))
        return None
    if perm is None:  # the same names for the same ids, written differently ("0" and 0)
        return None
    heads = frozenset(
        name
        for name, ref in other.tensors.items()
        if ref.shape and ref.shape[0] == len(a) and any(p in name.split(".") for p in _HEAD_PARTS)
    )
    if not heads:
        found.append(
            (LABELS, "labels are ordered differently and no classification head was found to align")
        )
        return None
    return LabelAlignment(perm, heads)


def _labels(config: dict) -> dict[str, str] | None:
    labels = config.get("id2label")
    return {str(k): v for k, v in labels.items()} if isinstance(labels, dict) else None


def _config_differences(
    first: IngredientIndex, other: IngredientIndex
) -> tuple[list[str], list[str]]:
    """(functional fields that differ, as error texts; other differing fields, as names)."""
    a, b = _flatten(first.config), _flatten(other.config)
    errors, cosmetic = [], []
    for key in sorted(a.keys() | b.keys()):
        va, vb = a.get(key, _UNSET), b.get(key, _UNSET)
        if key in _OWN_CHECKS or va == vb:
            continue
        if key.rsplit(".", 1)[-1] in FUNCTIONAL_FIELDS:
            # A field left out means transformers' default for the model type.
            default = _default(first.config.get("model_type"), key)
            va, vb = (default if v is _UNSET else v for v in (va, vb))
            if va == vb:
                continue
            if _UNSET not in (va, vb):
                errors.append(f"{key} {_brief(vb)} != {_brief(va)}")
                continue
        unset = first if va is _UNSET else other if vb is _UNSET else None
        cosmetic.append(f"{key} (unset in {unset.ingredient.label})" if unset else key)
    return errors, cosmetic


def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """Nested configs (``text_config``, ...) as dotted keys, so each field is compared alone."""
    out: dict[str, object] = {}
    for key, value in config.items():
        # A functional field is compared whole (rope_scaling's "factor" means nothing alone).
        if isinstance(value, dict) and value and key not in _OWN_CHECKS | FUNCTIONAL_FIELDS:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@functools.lru_cache(maxsize=32)
def _defaults(model_type: object) -> dict[str, object]:
    try:
        from transformers import CONFIG_MAPPING

        return CONFIG_MAPPING[model_type]().to_dict()
    except Exception:  # an unknown or custom model type: no defaults to go by
        return {}


def _default(model_type: object, key: str) -> object:
    if not isinstance(model_type, str) or "." in key:
        return _UNSET
    return _defaults(model_type).get(key, _UNSET)


def _differs(key: str, a: dict, b: dict) -> str:
    return f"{key} {_brief(b.get(key))} != {_brief(a.get(key))}"


def _message(indexes: Sequence[IngredientIndex], problems: dict[int, list[tuple[int, str]]]) -> str:
    """One line: the ingredient with the most serious difference, its differences in order of
    seriousness, then the other incompatible ingredients."""
    lead = min(problems, key=lambda pos: (problems[pos][0][0], pos))
    texts = [text for _, text in problems[lead]]
    line = f"{indexes[lead].ingredient.label} differs from {indexes[0].ingredient.label}: "
    line += "; also ".join(texts[:_SHOWN])
    if len(texts) > _SHOWN:
        line += f" (and {len(texts) - _SHOWN} more differences)"
    others = [indexes[pos].ingredient.label for pos in sorted(problems) if pos != lead]
    if others:
        line += f"; also incompatible: {_few(others, quote=False)}"
    return line


__all__ = ["Compatibility", "FUNCTIONAL_FIELDS", "LabelAlignment", "align_ingredients",
           "check_compatible"]  # fmt: skip
