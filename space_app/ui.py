"""The Gradio page: layout and event handlers. Rules live in ``logic.py``, jobs in ``worker.py``.

Every job (inspect, soup, push) runs in the worker and shares one queue slot
(``concurrency_id="worker"``, limit 1): one job at a time per Space, and a person who clicks
while another's job runs is told so at once.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pandas as pd
from logic import (
    CUSTOM,
    DTYPES,
    GLUE,
    IMAGE,
    INSPECT_HEADERS,
    NO_TASK,
    TASK_KINDS,
    MethodChoice,
    ProgressTracker,
    build_task,
    card_markdown,
    comparison_markdown,
    dtype_value,
    error_text,
    inspection_report,
    inspection_rows,
    inspection_status,
    method_choices,
    parse_ingredients,
    parse_repo_id,
    score_table,
)
from worker import Event, JobRequest, WorkerPool

from hfsoup.report.summary import METHOD_NAMES
from hfsoup.tasks.task import PRESETS

CANCELLED = "⛔ Cancelled: the worker was stopped; nothing was kept."
BUSY = (
    "⏳ **Busy**: another job is running on this Space (one at a time); yours starts when it ends."
)
INTRO = """# 🍲 hfsoup: model soups from the Hub
Average fine-tunes of one pretrained model, named by repo ID, into one model
(Wortsman et al., *Model soups*, ICML 2022). Weights are streamed shard by shard; the soup
gets a model card that pins every ingredient to its commit SHA. **Uniform** averages them all;
**greedy** keeps an ingredient only if the soup scores no lower with it on a held-out split."""
PLACEHOLDER = "org/bert-finetune-lr2e-5\norg/bert-finetune-lr3e-5@main\norg/bert-finetune-wd0.1@v1"


class Outputs:
    """Folders of finished soups, kept for pushing; the oldest beyond ``keep`` are deleted."""

    def __init__(self, root: Path, *, keep: int = 4) -> None:
        self.root, self.keep = root, keep
        root.mkdir(parents=True, exist_ok=True)

    def new(self) -> Path:
        folder = self.root / uuid.uuid4().hex[:12]
        folder.mkdir()
        return folder

    def discard(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    def prune(self) -> None:
        folders = sorted(
            (p for p in self.root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime
        )
        for folder in folders[: -self.keep]:
            self.discard(folder)


def _frame(headers: list[str], rows: list[list[Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=headers)


def _failed(message: str) -> str:
    return f"❌ **Error**: {message}"


def _ending(event: str, value: Any) -> str:
    """The status line of a job that did not produce a result."""
    if event == "busy":
        return BUSY
    return CANCELLED if event == "cancelled" else _failed(value)


def _last(events: Iterator[Event]) -> Event:
    """A short job's outcome: its last event, the log lines skipped."""
    for event in events:
        if event[0] != "line":
            return event
    return ("error", "the worker ended without an answer")


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


class _Jobs:
    """The page's event handlers: each turns a form into a worker job and its outcome into
    what the page shows (status line, tables, card)."""

    def __init__(self, pool: WorkerPool, outputs: Outputs, *, login: bool) -> None:
        self.pool, self.outputs, self.login = pool, outputs, login

    def busy_note(self, request: gr.Request) -> str:
        if self.pool.busy and not self.pool.owns(_session(request)):
            return BUSY
        return "▶ starting…"

    def inspect_ingredients(self, text: str, request: gr.Request) -> tuple[str, pd.DataFrame]:
        empty = _frame(INSPECT_HEADERS, [])
        try:
            names = parse_ingredients(text)
        except Exception as exc:
            return _failed(error_text(exc)), empty
        job = JobRequest("inspect", tuple(names))
        event, value = _last(self.pool.run(job, owner=_session(request)))
        if event != "result":
            return _ending(event, value), empty
        status = inspection_status(value) + inspection_report(value)
        return status, _frame(INSPECT_HEADERS, inspection_rows(value))

    def run_soup(
        self, text: str, method: str, accept: str, by_layer: bool, dtype: str, name: str,
        kind: str, preset: str,
        dataset: str, config: str, selection: str, report: str, columns: str, label: str,
        metrics: str, limit: float | None, request: gr.Request,
        progress=gr.Progress(),  # noqa: B008  (Gradio's way to ask for a progress bar)
    ) -> Iterator[tuple]:  # fmt: skip
        blank = (None, "", None, "", None)  # scores, comparison, plot, card, soup folder
        try:
            names = parse_ingredients(text)
            task = build_task(
                kind, preset=preset, dataset=dataset, config=config, selection_split=selection,
                report_splits=report, input_columns=columns, label_column=label,
                metrics=metrics, limit=limit,
            )  # fmt: skip
        except Exception as exc:
            yield (_failed(error_text(exc)), "", *blank)
            return
        folder = self.outputs.new()
        job = JobRequest(
            "soup", tuple(names), method=method, task=task, dtype=dtype_value(dtype),
            accept=accept, name=(name or "").strip() or None, output=str(folder / "soup"),
            learned={"by_layer": True} if method == "learned" and by_layer else None,
        )  # fmt: skip
        tracker, kept = ProgressTracker(), False
        try:
            for event, value in self.pool.run(job, owner=_session(request)):
                if event == "line":
                    tracker.feed(value)
                    progress(tracker.fraction, desc=tracker.status)
                    yield (f"⏳ {tracker.status}", tracker.log, *blank)
                elif event == "result":
                    kept = True
                    self.outputs.prune()
                    yield _finished(value, tracker)
                else:
                    yield (_ending(event, value), tracker.log, *blank)
        finally:  # also when the page cancels the event and closes this generator
            if not kept:
                self.outputs.discard(folder)

    def cancel_job(self, request: gr.Request) -> str:
        if self.pool.cancel(_session(request)):
            return CANCELLED
        return "Nothing of yours is running."

    def push_soup(
        self, repo: str, private: bool, token_text: str, soup: str | None, request: gr.Request,
        oauth_token: gr.OAuthToken | None = None,
    ) -> str:  # fmt: skip
        token = (token_text or "").strip() or (oauth_token.token if oauth_token else None)
        try:
            repo_id = parse_repo_id(repo)
        except Exception as exc:
            return _failed(error_text(exc))
        if not soup or not Path(soup).is_dir():
            return _failed("no soup to push yet: run one first (finished soups are kept a while)")
        if token is None and self.login:
            return _failed("sign in with Hugging Face, or paste a token with write access")
        job = JobRequest("push", output=soup, repo_id=repo_id, private=private, token=token)
        event, value = _last(self.pool.run(job, owner=_session(request)))
        if event != "result":
            return _ending(event, value)
        return f"✅ Pushed to **{value['repo_id']}**: {value['url']}"


def _finished(value: dict[str, Any], tracker: ProgressTracker) -> tuple:
    """What the page shows for a finished soup."""
    results = value["results"]
    headers, rows = score_table(results)
    method = METHOD_NAMES.get(f"{results['method']}_soup", results["method"])
    kept = results.get("greedy", {}).get("accepted")
    detail = f": kept {len(kept)} of {len(results['ingredients'])}" if kept else ""
    status = f"✅ **Done**: {method}{detail}. Push it below, or change the recipe and run again."
    return (
        status,
        tracker.log,
        _frame(headers, rows),
        comparison_markdown(results),
        value["plot"],
        card_markdown(value["card"], value["output"]),
        value["output"],
    )


def build(
    pool: WorkerPool, outputs: Outputs, *, login: bool, learned: bool = False,
    methods: Sequence[MethodChoice] | None = None,
) -> gr.Blocks:  # fmt: skip
    """The page. ``methods``: the merge methods to offer, as the worker's registry lists them
    (:func:`logic.method_choices`; ``None``: uniform and greedy, and ``learned`` when hfsoup has
    it). ``login`` adds the Hugging Face login button (OAuth works on Spaces only; locally the
    token field is the way)."""
    if methods is None:
        methods = method_choices({"learned": learned})
    jobs = _Jobs(pool, outputs, login=login)
    with gr.Blocks(title="hfsoup: model soups") as demo:
        gr.Markdown(INTRO)
        c = SimpleNamespace(soup_folder=gr.State(None))
        _ingredients_section(c)
        with gr.Group():
            _method_row(c, methods)
            _task_rows(c, methods)
        _results_section(c)
        _push_section(c, login)
        _wire(c, jobs)
    return demo


def _ingredients_section(c: SimpleNamespace) -> None:
    with gr.Row(equal_height=False):
        c.ingredients = gr.Textbox(
            label="Ingredients: one Hub repo per line, optionally @revision",
            placeholder=PLACEHOLDER, lines=5, elem_id="ingredients", scale=3,
        )  # fmt: skip
        with gr.Column(scale=2):
            c.inspect_btn = gr.Button("Inspect", elem_id="inspect-btn")
            c.inspect_status = gr.Markdown(
                "Inspect resolves each ingredient to a commit SHA and checks, from headers "
                "and small files alone, that they can be averaged: tokenizers, labels, "
                "layouts, dtypes, download size, estimated memory and time.",
                elem_id="inspect-status",
            )  # fmt: skip
    c.inspect_table = gr.Dataframe(
        headers=INSPECT_HEADERS, label="Ingredients", interactive=False,
        elem_id="inspect-table", max_height=240,
    )  # fmt: skip


def _method_row(c: SimpleNamespace, methods: Sequence[MethodChoice]) -> None:
    names = [m.name for m in methods]
    with gr.Row():
        default = "uniform" if "uniform" in names else names[0]
        c.method = gr.Radio(names, value=default, label="Method", elem_id="method")
        c.accept = gr.Radio(
            [">=", ">"], value=">=", label="Greedy: keep a candidate if its score is",
            visible=False,
        )  # fmt: skip
        c.by_layer = gr.Checkbox(
            label="Learned: one weight per ingredient and layer", visible=False
        )
        c.dtype = gr.Dropdown(list(DTYPES), value=DTYPES[0], label="Output dtype")
        c.name = gr.Textbox(label="Soup name (card title, optional)")


def _task_rows(c: SimpleNamespace, methods: Sequence[MethodChoice]) -> None:
    scored = " and ".join(m.name for m in methods if m.needs_task) or "no method"
    with gr.Row():
        c.task_kind = gr.Radio(
            list(TASK_KINDS), value=NO_TASK, label=f"Score on ({scored} need a task)",
            elem_id="task-kind", scale=3,
        )  # fmt: skip
        c.preset = gr.Dropdown(list(PRESETS), value="glue/sst2", label="GLUE task", visible=False)
        c.limit = gr.Number(
            label="Limit: examples per split (0 = all)", value=0, precision=0,
            minimum=0, scale=1,
        )  # fmt: skip
    with gr.Row(visible=False) as c.custom:
        c.dataset = gr.Textbox(label="Dataset (Hub ID)", elem_id="dataset", min_width=200)
        c.config = gr.Textbox(label="Config", min_width=100)
        c.selection = gr.Textbox(value="validation", label="Selection split (held out)")
        c.report = gr.Textbox(value="test", label="Report split(s)")
        c.columns = gr.Textbox(value="text", label="Input column(s)")
        c.label = gr.Textbox(value="label", label="Label column")
        c.metrics = gr.Textbox(value="accuracy", label="Metric(s), first selects")


def _results_section(c: SimpleNamespace) -> None:
    with gr.Row():
        c.run_btn = gr.Button("Run", variant="primary", elem_id="run-btn", scale=3)
        c.cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn", scale=1)
    c.status = gr.Markdown("Ready.", elem_id="status")
    c.log = gr.Textbox(
        label="Log", lines=4, max_lines=8, autoscroll=True, elem_id="log", show_label=True
    )
    with gr.Tabs():
        with gr.Tab("Scores", id="scores-tab"):
            c.scores = gr.Dataframe(
                label="Per-ingredient scores", interactive=False, elem_id="scores"
            )
            with gr.Row(equal_height=False):
                c.comparison = gr.Markdown(elem_id="comparison")
                c.plot = gr.Image(
                    label="Greedy trajectory", show_label=False, type="filepath",
                    elem_id="plot",
                )  # fmt: skip
        with gr.Tab("Model card", id="card-tab", elem_id="card-tab"):
            c.card = gr.Markdown(elem_id="card")


def _push_section(c: SimpleNamespace, login: bool) -> None:
    gr.Markdown("### Push the soup to the Hub")
    with gr.Row(equal_height=True):
        c.repo = gr.Textbox(label="Repo (org/name)", elem_id="push-repo", scale=2)
        c.private = gr.Checkbox(label="Private", value=False, scale=0, min_width=100)
        if login:
            gr.LoginButton(scale=1)
        c.token = gr.Textbox(
            label="…or a write token (never shown, logged or stored)",
            type="password", elem_id="push-token", scale=2,
        )  # fmt: skip
        c.push_btn = gr.Button("Push", elem_id="push-btn", scale=1)
    c.push_status = gr.Markdown(elem_id="push-status")


def _wire(c: SimpleNamespace, jobs: _Jobs) -> None:
    """The events: which handler each button and choice runs, with what inputs and outputs."""
    hidden = {"api_visibility": "private"}
    c.method.change(
        lambda m: (gr.update(visible=m == "greedy"), gr.update(visible=m == "learned")),
        c.method, [c.accept, c.by_layer], **hidden,
    )  # fmt: skip
    c.task_kind.change(
        lambda k: (
            gr.update(visible=k == GLUE),
            gr.update(visible=k in (IMAGE, CUSTOM)),
            gr.update(value="image" if k == IMAGE else "text"),
        ),
        c.task_kind, [c.preset, c.custom, c.columns], **hidden,
    )  # fmt: skip
    worker = {"concurrency_id": "worker", "concurrency_limit": 1}
    c.inspect_btn.click(jobs.busy_note, None, c.inspect_status, queue=False, **hidden).then(
        jobs.inspect_ingredients, c.ingredients, [c.inspect_status, c.inspect_table],
        api_name="inspect", **worker,
    )  # fmt: skip
    run_event = c.run_btn.click(jobs.busy_note, None, c.status, queue=False, api_name="busy").then(
        jobs.run_soup,
        [c.ingredients, c.method, c.accept, c.by_layer, c.dtype, c.name, c.task_kind, c.preset,
         c.dataset, c.config, c.selection, c.report, c.columns, c.label, c.metrics, c.limit],
        [c.status, c.log, c.scores, c.comparison, c.plot, c.card, c.soup_folder],
        api_name="run", show_progress_on=[c.status], **worker,
    )  # fmt: skip
    c.cancel_btn.click(jobs.cancel_job, None, c.status, cancels=[run_event], api_name="cancel")
    c.push_btn.click(jobs.busy_note, None, c.push_status, queue=False, **hidden).then(
        jobs.push_soup, [c.repo, c.private, c.token, c.soup_folder], c.push_status,
        api_name="push", **worker,
    )  # fmt: skip
