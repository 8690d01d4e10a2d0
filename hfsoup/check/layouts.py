"""Whether the ingredients' sentence-transformers layouts agree (see :mod:`hfsoup.io.layouts`).

The same modules in the same order, the same settings (pooling modes compared whichever way a
release spells them) and module weights that can be averaged; nothing here reads a weight byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hfsoup.check.compat import check_compatible
from hfsoup.errors import IncompatibleIngredientsError
from hfsoup.io.layouts import MODULES_FILE
from hfsoup.io.refs import IngredientIndex, Layout
from hfsoup.io.refs import brief as _brief

# Settings that differ between releases, not between models.
_IGNORED_FIELDS = {"__version__"}
# Pooling configs name their modes as one field (sentence-transformers 5+) or as one boolean
# per mode (older releases, all-MiniLM-L6-v2): compared as the set of modes either way.
_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def check_layouts(indexes: Sequence[IngredientIndex]) -> None:
    """Check every ingredient's layout against the first's: the same modules in the same order,
    the same settings, and module weights that can be averaged (names, shapes, dtypes).

    Raises:
        IncompatibleIngredientsError: naming the ingredient, the file and the first differing
            field (or module tensor).
    """
    first = indexes[0]
    a = first.layout
    for other in indexes[1:]:
        who = f"{other.ingredient.label} differs from {first.ingredient.label}"
        b = other.layout
        if a is None and b is None:
            continue
        if a is None or b is None:
            st, plain = (first, other) if b is None else (other, first)
            raise IncompatibleIngredientsError(
                f"{who}: {st.ingredient.label} is a sentence-transformers model ({MODULES_FILE}) "
                f"and {plain.ingredient.label} is not; a soup would pool like one of them only"
            )
        if a.modules != b.modules:
            raise IncompatibleIngredientsError(
                f"{who}: {MODULES_FILE} lists modules {_modules(b)}, expected {_modules(a)}"
            )
        for name in sorted(a.settings.keys() | b.settings.keys()):
            if name not in b.settings or name not in a.settings:
                lacking = other if name not in b.settings else first
                raise IncompatibleIngredientsError(
                    f"{who}: {lacking.ingredient.label} has no {name}"
                )
            _compare_settings(who, name, a.settings[name], b.settings[name])
        for folder in sorted(a.weights.keys() | b.weights.keys()):
            if folder not in a.weights or folder not in b.weights:
                lacking = other if folder not in b.weights else first
                raise IncompatibleIngredientsError(
                    f"{who}: {lacking.ingredient.label} has no weights in module {folder}"
                )
            try:
                check_compatible([a.weights[folder], b.weights[folder]])
            except IncompatibleIngredientsError as exc:
                raise IncompatibleIngredientsError(f"module {folder}: {exc}") from exc


def _modules(layout: Layout) -> str:
    return _brief([f"{m.path or '.'} ({m.kind})" for m in layout.modules], 200)


def _compare_settings(who: str, name: str, a: dict[str, Any], b: dict[str, Any]) -> None:
    """Fields both files name must be equal (a field only one of them names takes the
    release's default, which differs between releases, not between models)."""
    a, b = normalised_settings(a), normalised_settings(b)
    for key in sorted(a.keys() & b.keys()):
        if key not in _IGNORED_FIELDS and a[key] != b[key]:
            hint = "; the soup would embed unlike one of them" if "pooling" in key else ""
            raise IncompatibleIngredientsError(
                f"{who} in {name}: {key} {_brief(b[key])} != {_brief(a[key])}{hint}"
            )


def normalised_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Module settings as they are compared: pooling modes as one sorted list, whichever of
    sentence-transformers' spellings wrote them."""
    if not any(k in settings for k in (*_LEGACY_POOLING, "pooling_mode")):
        return settings
    out = {k: v for k, v in settings.items() if k not in _LEGACY_POOLING}
    modes = {mode for key, mode in _LEGACY_POOLING.items() if settings.get(key) is True}
    given = settings.get("pooling_mode")
    given = [given] if isinstance(given, str) else given if isinstance(given, list) else []
    modes.update(m for m in given if isinstance(m, str))
    out["pooling_mode"] = sorted(modes)
    if "word_embedding_dimension" in out:
        out["embedding_dimension"] = out.pop("word_embedding_dimension")
    return out
