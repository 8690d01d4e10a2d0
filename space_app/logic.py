"""The Space's logic without the Space: form fields in, hfsoup arguments and display text out.

Pure functions (no Gradio, no torch, no network), so every rule the page follows is tested
without a browser: how ingredient lines are read, how the task fields become a task, how
results become tables, how hfsoup's log lines become a progress status, and how an error
becomes one line with no secret in it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hfsoup.errors import HfsoupError, IngredientSpecError, TaskError

NO_TASK, GLUE, IMAGE, CUSTOM = "none", "GLUE preset", "image dataset", "custom dataset"
TASK_KINDS = (NO_TASK, GLUE, IMAGE, CUSTOM)
DEFAULT_DTYPE = "as the ingredients"
DTYPES = (DEFAULT_DTYPE, "float32", "float16", "bfloat16")
INSPECT_HEADERS = ["ingredient", "SHA", "parameters", "size", "dtypes", "model type", "format"]
FILE_ROUTE = "gradio_api/file="


@dataclass(frozen=True)
class MethodChoice:
    """A merge method the page offers: its name, one line about it, whether it needs a task."""

    name: str
    summary: str = ""
    needs_task: bool = False


def method_choices(capabilities: dict[str, Any]) -> list[MethodChoice]:
    """The methods to offer, as the worker found them in hfsoup's method registry.

    ``capabilities`` is the worker's ``ready`` message: ``methods`` lists the registry's
    methods (name, summary, needs_task); a worker that sent none (an older one, or none
    answered) gets uniform and greedy, and learned when ``learned`` is true.

    Example:
        >>> [m.name for m in method_choices({"learned": False})]
        ['uniform', 'greedy']
    """
    listed = capabilities.get("methods")
    if listed:
        return [
            MethodChoice(m["name"], m.get("summary", ""), bool(m.get("needs_task"))) for m in listed
        ]
    names = ["uniform", "greedy", *(["learned"] if capabilities.get("learned") else [])]
    return [MethodChoice(name, needs_task=name != "uniform") for name in names]


def parse_ingredients(text: str) -> list[str]:
    """Ingredients from the text box: one ``org/name[@revision]`` per line.

    Blank lines and ``#`` comments are skipped. Local folders are refused: on a shared Space a
    path would read the server's disk, not the user's.

    Raises:
        IngredientSpecError: a line is not a Hub repo ID, or there is no line at all.
    """
    from hfsoup.io.hub import parse_ingredient

    names = []
    for line in text.splitlines():
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if name.startswith((".", "/", "~")) or "\\" in name:
            raise IngredientSpecError(
                f"ingredient {name!r}: local folders cannot be used here; name a Hub repo "
                "(org/name or org/name@revision)"
            )
        if parse_ingredient(name).path is not None:
            raise IngredientSpecError(f"ingredient {name!r} names a local folder, not a Hub repo")
        names.append(name)
    if not names:
        raise IngredientSpecError("paste at least one ingredient: a Hub repo ID per line")
    return names


def parse_repo_id(text: str) -> str:
    """The repo to push to: ``name`` or ``org/name``, without a revision.

    Raises:
        IngredientSpecError: empty, or not a repo ID.
    """
    from hfsoup.io.hub import parse_ingredient

    name = text.strip()
    if not name:
        raise IngredientSpecError("give the name of the repo to push to (org/name)")
    if "@" in name or name.startswith((".", "/", "~")) or parse_ingredient(name).path is not None:
        raise IngredientSpecError(f"{name!r} is not a repo ID (org/name)")
    return name


def split_list(text: str | None) -> list[str]:
    """``"a, b c"`` -> ``["a", "b", "c"]``: the form's list fields (splits, columns, metrics)."""
    return [part for part in re.split(r"[,\s]+", text or "") if part]


def build_task(
    kind: str,
    *,
    preset: str | None = None,
    dataset: str | None = None,
    config: str | None = None,
    selection_split: str | None = None,
    report_splits: str | None = None,
    input_columns: str | None = None,
    label_column: str | None = None,
    metrics: str | None = None,
    limit: float | int | None = None,
) -> dict[str, Any] | None:
    """The task the form describes, checked by hfsoup, as a recipe's ``task:`` mapping.

    Args:
        kind: one of :data:`TASK_KINDS`; ``"none"`` means no scoring (uniform soups only).
        preset: a GLUE preset (``glue/sst2``) when ``kind`` is GLUE.
        limit: score only the first ``limit`` examples of each split; 0 or empty for all.
        others: the custom/image task fields; list fields are comma or space separated.

    Raises:
        TaskError: an unknown kind, a missing dataset, or whatever :func:`resolve_task` refuses.
    """
    from hfsoup.tasks.task import resolve_task

    if kind == NO_TASK:
        return None
    overrides: dict[str, Any] = {}
    if limit:
        if int(limit) != limit or limit < 1:
            raise TaskError(f"limit must be a whole number of examples, got {limit}")
        overrides["limit"] = int(limit)
    if kind == GLUE:
        if not preset:
            raise TaskError("choose a GLUE task")
        task = resolve_task(preset, **overrides)
    elif kind in (IMAGE, CUSTOM):
        if not (dataset or "").strip():
            raise TaskError("give the dataset's Hub ID (org/name)")
        default_columns = "image" if kind == IMAGE else "text"
        fields = {
            "dataset": dataset.strip(),
            "config": (config or "").strip() or None,
            "selection_split": (selection_split or "").strip() or "validation",
            "report_splits": split_list(report_splits) or ["test"],
            "input_columns": split_list(input_columns) or [default_columns],
            "label_column": (label_column or "").strip() or "label",
            "metrics": split_list(metrics) or ["accuracy"],
        }
        task = resolve_task(fields | overrides)
        if kind == IMAGE and len(task.input_columns) != 1:
            raise TaskError("an image task takes one image column")
    else:
        raise TaskError(f"unknown task kind {kind!r}; choose one of {', '.join(TASK_KINDS)}")
    return task.model_dump(mode="json", by_alias=True, exclude_none=True)


def dtype_value(choice: str | None) -> str | None:
    """The dtype dropdown's value as hfsoup takes it (``None``: keep the ingredients')."""
    return None if not choice or choice == DEFAULT_DTYPE else choice


def one_line(message: object, *, secrets: Sequence[str | None] = ()) -> str:
    """A message as one readable line, with every secret masked."""
    text = " ".join(str(message).split())
    return redact(text, secrets) or "unknown error"


def redact(text: str, secrets: Sequence[str | None]) -> str:
    """``text`` with each non-empty secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def error_text(exc: BaseException, *, secrets: Sequence[str | None] = ()) -> str:
    """What the page shows for a failed job: hfsoup's own message, or the exception's type."""
    if isinstance(exc, HfsoupError):
        return one_line(exc, secrets=secrets)
    return one_line(f"unexpected {type(exc).__name__}: {exc}", secrets=secrets)


def human_count(n: int | None) -> str:
    """``22713216`` -> ``"22.7M"``."""
    if n is None:
        return ""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def human_bytes(n: int | None) -> str:
    """``17600000`` -> ``"16.8 MiB"`` (:func:`hfsoup.units.human_bytes` in binary units);
    ``None`` -> ``""``."""
    from hfsoup.units import human_bytes as format_bytes

    return "" if n is None else format_bytes(n, binary=True)


def inspection_rows(report: dict[str, Any]) -> list[list[Any]]:
    """One row per ingredient of :meth:`hfsoup.Inspection.to_dict`, in :data:`INSPECT_HEADERS`."""
    return [
        [
            row["ingredient"],
            row["sha"] or "(local)",
            human_count(row["parameters"]),
            human_bytes(row["bytes"]),
            ", ".join(row["dtypes"]),
            row["model_type"] or "",
            row["format"],
        ]
        for row in report["ingredients"]
    ]


def inspection_status(report: dict[str, Any]) -> str:
    """One line: compatible or not, and why not."""
    n = len(report["ingredients"])
    if report["compatible"]:
        return f"✅ {n} ingredient{'s' * (n != 1)} resolved: compatible, they can be souped."
    return f"❌ not compatible: {one_line(report['problem'])}"


def inspection_report(report: dict[str, Any]) -> str:
    """The doctor's full report (what ``hfsoup inspect`` prints), as a Markdown code block;
    empty for a report without one."""
    if "findings" not in report:
        return ""
    from hfsoup.check.doctor import render

    return f"\n\n```text\n{render(report)}\n```"


def score_table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Per-ingredient scores: headers and rows (name, SHA, weight, one column per split/metric).

    The selection split (used to choose, not to report) is marked in its column names.
    """
    rows = results.get("ingredients", [])
    selection = results.get("selection", {}).get("split")
    columns = [(s, m) for s, metrics in _first_scores(rows).items() for m in metrics]
    headers = ["ingredient", "SHA", "weight"] + [
        f"{s}{' (selection)' if s == selection else ''} {m}" for s, m in columns
    ]
    table = []
    for row in rows:
        name = f"{row['repo']}@{row['revision']}" if row.get("revision") else row["repo"]
        scores = row.get("scores") or {}
        cells = [_score(scores.get(s, {}).get(m)) for s, m in columns]
        table.append([name, (row.get("sha") or "")[:12], round(row["weight"], 4), *cells])
    return headers, table


def _first_scores(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    return next((row["scores"] for row in rows if row.get("scores")), {})


def _score(value: float | None) -> float | str:
    return "" if value is None else round(value, 4)


def comparison_markdown(results: dict[str, Any]) -> str:
    """The methods side by side (best individual, soups, ensembles) as a markdown table."""
    from hfsoup.report.summary import markdown_table

    table = results.get("table")
    if not table:
        return "*No task chosen: the soup was written but not scored.*"
    selection = results["selection"]["split"]
    note = (
        f"Chosen on `{selection}` by `{results['selection']['metric']}`; report the other splits."
    )
    return markdown_table(table, selection_split=selection) + "\n\n" + note


def card_markdown(card: str, folder: str) -> str:
    """The model card for display: body first, its YAML metadata after it as a code block.

    Relative images (the greedy trajectory, ...) point into the soup ``folder``, served by the
    page's file route, so the card shows what it will show on the Hub.
    """
    meta, body = "", card
    match = re.match(r"^---\n(.*?)\n---\n?", card, flags=re.S)
    if match:
        meta, body = match.group(1), card[match.end() :]
    body = re.sub(
        r"!\[([^\]]*)\]\((?![a-zA-Z][\w+.-]*:|/)([^)\s]+)\)",  # relative links only
        lambda m: f"![{m.group(1)}]({FILE_ROUTE}{folder.rstrip('/')}/{m.group(2)})",
        body,
    )
    if meta:
        body += f"\n\n#### Card metadata\n\n```yaml\n{meta}\n```\n"
    return body.strip() + "\n"


_BAR = re.compile(r"^(?P<desc>[^|]*?):\s*(?P<pct>\d{1,3})%\|")
_STEP = re.compile(r"\b(\d+)/(\d+)\b")
_PREFIX = "hfsoup: "


@dataclass
class ProgressTracker:
    """Turns a job's captured stderr lines into a status, a progress fraction and a log.

    hfsoup writes steps as ``hfsoup: scoring ingredient 2/5: org/ft-2`` and progress bars as
    tqdm lines (``Fetching + averaging:  45%|...``); a bar's updates replace each other in the
    log instead of piling up.
    """

    keep: int = 60
    stage: str = "starting"
    bar: tuple[str, int] | None = None
    lines: list[str] = field(default_factory=list)

    def feed(self, line: str) -> None:
        """Take one line (a tqdm update or a log line)."""
        line = line.strip()
        if not line:
            return
        match = _BAR.match(line)
        if match:
            desc, pct = match.group("desc").strip(), min(int(match.group("pct")), 100)
            last = _BAR.match(self.lines[-1]) if self.lines else None
            if last and last.group("desc").strip() == desc:
                self.lines.pop()  # the same bar, updated: replace it
            self.bar = (desc, pct)
        elif line.startswith(_PREFIX):
            self.stage = line[len(_PREFIX) :]
            self.bar = None
        self.lines.append(line)
        del self.lines[: -self.keep]

    @property
    def status(self) -> str:
        """What is happening now: the step, and the running bar if any."""
        if self.bar is None:
            return self.stage
        return f"{self.stage} · {self.bar[0]} {self.bar[1]}%"

    @property
    def fraction(self) -> float | None:
        """Progress of the running bar, else of an ``i/k`` step, else unknown."""
        if self.bar is not None:
            return self.bar[1] / 100
        step = _STEP.search(self.stage)
        if step and int(step.group(2)) > 0:
            return (int(step.group(1)) - 1) / int(step.group(2))
        return None

    @property
    def log(self) -> str:
        """The last lines, newest last."""
        return "\n".join(self.lines)
