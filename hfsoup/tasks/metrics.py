"""``evaluate`` metrics: from the Hub when it answers, else from the copies hfsoup ships.

``evaluate.load("accuracy")`` runs ``./accuracy/accuracy.py`` whenever the working directory
holds one, so a stray folder could silently change every score. :func:`load_metric` therefore
never passes a bare name to ``evaluate.load``: Hub metrics are fetched by their Space ID
(``evaluate-metric/accuracy``) through evaluate's Hub and cache loaders, and bundled metrics by
their absolute path.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import evaluate
import numpy as np
import torch

from hfsoup.errors import TaskError

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "metrics"
"""Where hfsoup's own ``evaluate`` modules live: ``BUNDLED_DIR/<name>/<name>.py``."""

CANONICAL_ORG = "evaluate-metric"
log = logging.getLogger("hfsoup")

MEAN_OVER_EXAMPLES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "accuracy": lambda predictions, references: predictions == references,
}
"""Metrics whose (unweighted) value is ``count / n`` of a per-example boolean, by name.

Exact early rejection needs this: the value of such a metric is one correctly rounded float
division of an integer count, so whether it can still reach a threshold is decided on counts.
"""


def is_mean_over_examples(name: str) -> bool:
    """Whether metric ``name`` is a mean of a per-example 0/1 outcome (e.g. accuracy)."""
    return _short_name(name) in MEAN_OVER_EXAMPLES


def per_example(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-example 0/1 outcome of a mean-over-examples metric (``predictions == references``
    for accuracy).

    Raises:
        TaskError: ``name`` is not a mean over examples.
    """
    try:
        return MEAN_OVER_EXAMPLES[_short_name(name)]
    except KeyError:
        raise TaskError(f"metric {name!r} is not a mean over examples") from None


def bundled_metrics() -> list[str]:
    """Names of the metrics hfsoup ships as fallbacks."""
    return sorted(p.parent.name for p in BUNDLED_DIR.glob("*/*.py") if p.stem == p.parent.name)


def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load an ``evaluate`` metric: the Hub's, a cached copy of it, or hfsoup's bundled copy.

    Args:
        name: A canonical metric (``"accuracy"``, i.e. the Space ``evaluate-metric/accuracy``),
            a community Space ID (``"org/metric"``), or an explicit local path (absolute, or
            starting with ``./`` or ``../``) to a module directory or script.

    Returns:
        The metric, computing in memory (no cache files).

    Raises:
        TaskError: The metric is neither on the Hub (nor cached) nor shipped by hfsoup.

    When the Hub copy cannot be loaded, for any reason, and hfsoup ships the metric, its bundled
    copy is used and one notice (the ``hfsoup`` logger) says why the Hub's could not be: a
    package its script imports is not installed (the Hub's f1, matthews_correlation, pearsonr
    and spearmanr import scikit-learn or scipy, which hfsoup does not need), the Hub cannot be
    reached, the Hub has no such module, or the script failed otherwise. The working directory
    is never searched for a bare name.

    Example:
        ```py
        >>> accuracy = load_metric("accuracy")
        >>> compute(accuracy, [0, 1, 1], [0, 1, 0])
        {'accuracy': 0.6666666666666666}
        ```
    """
    if _is_explicit_path(name):
        return _load_local(Path(name).resolve())
    space = name if "/" in name else f"{CANONICAL_ORG}/{name}"
    try:
        return _load_from_hub(space)
    except Exception as err:  # evaluate raises anything from ConnectionError to HTTPError
        reason = why_not_loaded(err)
    short = _short_name(name)
    script = BUNDLED_DIR / short / f"{short}.py"
    if space != f"{CANONICAL_ORG}/{short}" or not script.is_file():
        raise TaskError(
            f"metric {name!r} could not be loaded from the Hub ({reason}) and hfsoup ships no "
            f"copy of it (bundled: {', '.join(bundled_metrics())})"
        )
    log.warning("metric %r: %s; using hfsoup's bundled copy", short, reason)
    return _load_local(script)


# How evaluate names the packages a script needs: "... dependencies['scikit-learn', ...]".
_NEEDED_RE = re.compile(r"dependencies\s*\[([^\]]*)\]")
# Import names whose pip package is called otherwise.
_PIP_NAMES = {"sklearn": "scikit-learn"}


def why_not_loaded(err: BaseException) -> str:
    """Why a Hub metric failed to load, in words: a missing package (named), the Hub out of
    reach, no such module on the Hub, or the error itself.

    Example:
        ```py
        >>> why_not_loaded(ModuleNotFoundError("No module named 'sklearn'", name="sklearn"))
        "the Hub's script needs scikit-learn, which is not installed"
        ```
    """
    if isinstance(err, ImportError):
        # evaluate checks a script's imports before running it and lists what is missing; a
        # script cached earlier fails on its import statement instead.
        listed = _NEEDED_RE.search(str(err))
        names = re.findall(r"'([^']+)'", listed.group(1)) if listed else []
        if not names and err.name:
            names = [err.name.partition(".")[0]]
        names = sorted({_PIP_NAMES.get(n, n) for n in names})
        if names:
            verb = "is" if len(names) == 1 else "are"
            return f"the Hub's script needs {' and '.join(names)}, which {verb} not installed"
        return f"the Hub's script could not be imported ({_first_line(err)})"
    if _is_unreachable(err):
        if "HF_HUB_OFFLINE" in str(err):
            return str(err)
        return f"not reachable on the Hub ({type(err).__name__})"
    if isinstance(err, FileNotFoundError):
        return "not found on the Hub"
    return f"the Hub's copy could not be loaded ({type(err).__name__}: {_first_line(err)})"


def _is_unreachable(err: BaseException) -> bool:
    """A network failure, as requests, httpx or the standard library report one."""
    if isinstance(err, ConnectionError | TimeoutError):
        return True
    kinds = {cls.__name__ for cls in type(err).__mro__}
    return bool(kinds & {"ConnectionError", "Timeout", "TimeoutException", "TransportError"})


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def compute(
    metric: evaluate.EvaluationModule,
    predictions: torch.Tensor | np.ndarray | list,
    references: torch.Tensor | np.ndarray | list,
    **kwargs: Any,
) -> dict[str, float]:
    """Compute ``metric`` and return its scalar results as plain floats.

    Args:
        metric: A loaded metric (see :func:`load_metric`).
        predictions: Predicted labels (or values, for regression metrics).
        references: True labels (or values).
        **kwargs: Passed to ``metric.compute`` (e.g. ``average="macro"`` for f1).

    Returns:
        ``{result name: value}``; non-scalar results (p-values arrays, ...) are left out.
    """
    result = metric.compute(
        predictions=_to_numpy(predictions), references=_to_numpy(references), **kwargs
    )
    return {key: float(value) for key, value in result.items() if np.ndim(value) == 0}


def metric_value(name: str, result: dict[str, float]) -> float:
    """The headline number of ``result`` for metric ``name`` (``accuracy`` -> ``accuracy``)."""
    short = _short_name(name)
    if short in result:
        return result[short]
    if len(result) == 1:
        return next(iter(result.values()))
    raise TaskError(
        f"metric {name!r} returned several values ({', '.join(result)}); none named {short!r}"
    )


def metric_kwargs(name: str, num_classes: int) -> dict[str, Any]:
    """Arguments that make ``name`` well defined for ``num_classes`` classes.

    F1 defaults to the binary F1 of class 1 (GLUE's MRPC/QQP convention); with more than two
    classes it is macro-averaged instead.
    """
    if _short_name(name) == "f1" and num_classes > 2:
        return {"average": "macro"}
    return {}


def _load_from_hub(space: str) -> evaluate.EvaluationModule:
    # evaluate's own Hub and cache factories, as evaluate.load uses them, minus its look into
    # the working directory (the hijack this module exists to prevent).
    from evaluate.loading import (
        CachedEvaluationModuleFactory,
        HubEvaluationModuleFactory,
        import_main_class,
    )

    from hfsoup.io.hfcache import offline

    try:
        if offline():  # evaluate heeds only HF_EVALUATE_OFFLINE: never ask the Hub offline
            raise ConnectionError("HF_HUB_OFFLINE=1 is set and no copy is cached")
        module = HubEvaluationModuleFactory(space).get_module()
    except Exception as hub_error:
        try:
            module = CachedEvaluationModuleFactory(space.replace("/", "--")).get_module()
        except Exception:
            raise hub_error from None
    metric_class = import_main_class(module.module_path)
    metric = metric_class(hash=module.hash, keep_in_memory=True)
    metric.download_and_prepare()
    return metric


def _load_local(path: Path) -> evaluate.EvaluationModule:
    if not path.exists():
        raise TaskError(f"metric script not found: {path}")
    return evaluate.load(str(path), keep_in_memory=True)


def _is_explicit_path(name: str) -> bool:
    return Path(name).is_absolute() or name.startswith(("./", "../", ".\\", "..\\"))


def _short_name(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1].removesuffix(".py")


def _to_numpy(values: torch.Tensor | np.ndarray | list) -> np.ndarray | list:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return values
