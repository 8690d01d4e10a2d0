"""The Gradio page: layout and event handlers. Rules live in ``logic.py``, jobs in ``worker.py``.

Every job (inspect, soup, push) runs in the worker and shares one queue slot
(``concurrency_id="worker"``, limit 1): one job at a time per Space, and a person who clicks
while another's job runs is told so at once.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
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
    ProgressTracker,
    build_task,
    card_markdown,
    comparison_markdown,
    dtype_value,
    error_text,
    inspection_report,
    inspection_rows,
    inspection_status,
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


def build(pool: WorkerPool, outputs: Outputs, *, learned: bool, login: bool) -> gr.Blocks:
    """The page. ``learned`` adds the method when hfsoup has it; ``login`` adds the Hugging
    Face login button (OAuth works on Spaces only; locally the token field is the way)."""
    methods = ["uniform", "greedy", *(["learned"] if learned else [])]

    def busy_note(request: gr.Request) -> str:
        if pool.busy and not pool.owns(_session(request)):
            return BUSY
        return "▶ starting…"

    def inspect_ingredients(text: str, request: gr.Request) -> tuple[str, pd.DataFrame]:
        empty = _frame(INSPECT_HEADERS, [])
        try:
            names = parse_ingredients(text)
        except Exception as exc:
            return _failed(error_text(exc)), empty
        event, value = _last(pool.run(JobRequest("inspect", tuple(names)), owner=_session(request)))
        if event != "result":
            return _ending(event, value), empty
        status = inspection_status(value) + inspection_report(value)
        return status, _frame(INSPECT_HEADERS, inspection_rows(value))

    def run_soup(
        text: str, method: str, accept: str, by_layer: bool, dtype: str, name: str, kind: str,
        preset: str,
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
        folder = outputs.new()
        job = JobRequest(
            "soup", tuple(names), method=method, task=task, dtype=dtype_value(dtype),
            accept=accept, name=(name or "").strip() or None, output=str(folder / "soup"),
            learned={"by_layer": True} if method == "learned" and by_layer else None,
        )  # fmt: skip
        tracker, kept = ProgressTracker(), False
        try:
            for event, value in pool.run(job, owner=_session(request)):
                if event == "line":
                    tracker.feed(value)
                    progress(tracker.fraction, desc=tracker.status)
                    yield (f"⏳ {tracker.status}", tracker.log, *blank)
                elif event == "result":
                    kept = True
                    outputs.prune()
                    yield _finished(value, tracker)
                else:
                    yield (_ending(event, value), tracker.log, *blank)
        finally:  # also when the page cancels the event and closes this generator
            if not kept:
                outputs.discard(folder)

    def _finished(value: dict[str, Any], tracker: ProgressTracker) -> tuple:
        results = value["results"]
        headers, rows = score_table(results)
        method = METHOD_NAMES.get(f"{results['method']}_soup", results["method"])
        kept = results.get("greedy", {}).get("accepted")
        detail = f": kept {len(kept)} of {len(results['ingredients'])}" if kept else ""
        status = (
            f"✅ **Done**: {method}{detail}. Push it below, or change the recipe and run again."
        )
        return (
            status,
            tracker.log,
            _frame(headers, rows),
            comparison_markdown(results),
            value["plot"],
            card_markdown(value["card"], value["output"]),
            value["output"],
        )

    def cancel_job(request: gr.Request) -> str:
        if pool.cancel(_session(request)):
            return CANCELLED
        return "Nothing of yours is running."

    def push_soup(
        repo: str, private: bool, token_text: str, soup: str | None, request: gr.Request,
        oauth_token: gr.OAuthToken | None = None,
    ) -> str:  # fmt: skip
        token = (token_text or "").strip() or (oauth_token.token if oauth_token else None)
        try:
            repo_id = parse_repo_id(repo)
        except Exception as exc:
            return _failed(error_text(exc))
        if not soup or not Path(soup).is_dir():
            return _failed("no soup to push yet: run one first (finished soups are kept a while)")
        if token is None and login:
            return _failed("sign in with Hugging Face, or paste a token with write access")
        job = JobRequest("push", output=soup, repo_id=repo_id, private=private, token=token)
        event, value = _last(pool.run(job, owner=_session(request)))
        if event != "result":
            return _ending(event, value)
        return f"✅ Pushed to **{value['repo_id']}**: {value['url']}"

    with gr.Blocks(title="hfsoup: model soups") as demo:
        gr.Markdown(INTRO)
        soup_folder = gr.State(None)
        with gr.Row(equal_height=False):
            ingredients = gr.Textbox(
                label="Ingredients: one Hub repo per line, optionally @revision",
                placeholder=PLACEHOLDER, lines=5, elem_id="ingredients", scale=3,
            )  # fmt: skip
            with gr.Column(scale=2):
                inspect_btn = gr.Button("Inspect", elem_id="inspect-btn")
                inspect_status = gr.Markdown(
                    "Inspect resolves each ingredient to a commit SHA and checks, from headers "
                    "and small files alone, that they can be averaged: tokenizers, labels, "
                    "layouts, dtypes, download size, estimated memory and time.",
                    elem_id="inspect-status",
                )  # fmt: skip
        inspect_table = gr.Dataframe(
            headers=INSPECT_HEADERS, label="Ingredients", interactive=False,
            elem_id="inspect-table", max_height=240,
        )  # fmt: skip
        with gr.Group():
            with gr.Row():
                method = gr.Radio(methods, value="uniform", label="Method", elem_id="method")
                accept = gr.Radio(
                    [">=", ">"], value=">=", label="Greedy: keep a candidate if its score is",
                    visible=False,
                )  # fmt: skip
                by_layer = gr.Checkbox(
                    label="Learned: one weight per ingredient and layer", visible=False
                )
                dtype = gr.Dropdown(list(DTYPES), value=DTYPES[0], label="Output dtype")
                name = gr.Textbox(label="Soup name (card title, optional)")
            with gr.Row():
                task_kind = gr.Radio(
                    list(TASK_KINDS), value=NO_TASK, label=f"Score on ({' and '.join(methods[1:])} need a task)",
                    elem_id="task-kind", scale=3,
                )  # fmt: skip
                preset = gr.Dropdown(
                    list(PRESETS), value="glue/sst2", label="GLUE task", visible=False
                )
                limit = gr.Number(
                    label="Limit: examples per split (0 = all)", value=0, precision=0,
                    minimum=0, scale=1,
                )  # fmt: skip
            with gr.Row(visible=False) as custom:
                dataset = gr.Textbox(label="Dataset (Hub ID)", elem_id="dataset", min_width=200)
                config = gr.Textbox(label="Config", min_width=100)
                selection = gr.Textbox(value="validation", label="Selection split (held out)")
                report = gr.Textbox(value="test", label="Report split(s)")
                columns = gr.Textbox(value="text", label="Input column(s)")
                label = gr.Textbox(value="label", label="Label column")
                metrics = gr.Textbox(value="accuracy", label="Metric(s), first selects")
        with gr.Row():
            run_btn = gr.Button("Run", variant="primary", elem_id="run-btn", scale=3)
            cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn", scale=1)
        status = gr.Markdown("Ready.", elem_id="status")
        log = gr.Textbox(
            label="Log", lines=4, max_lines=8, autoscroll=True, elem_id="log", show_label=True
        )
        with gr.Tabs():
            with gr.Tab("Scores", id="scores-tab"):
                scores = gr.Dataframe(
                    label="Per-ingredient scores", interactive=False, elem_id="scores"
                )
                with gr.Row(equal_height=False):
                    comparison = gr.Markdown(elem_id="comparison")
                    plot = gr.Image(
                        label="Greedy trajectory", show_label=False, type="filepath",
                        elem_id="plot",
                    )  # fmt: skip
            with gr.Tab("Model card", id="card-tab", elem_id="card-tab"):
                card = gr.Markdown(elem_id="card")
        gr.Markdown("### Push the soup to the Hub")
        with gr.Row(equal_height=True):
            repo = gr.Textbox(label="Repo (org/name)", elem_id="push-repo", scale=2)
            private = gr.Checkbox(label="Private", value=False, scale=0, min_width=100)
            if login:
                gr.LoginButton(scale=1)
            token = gr.Textbox(
                label="…or a write token (never shown, logged or stored)",
                type="password", elem_id="push-token", scale=2,
            )  # fmt: skip
            push_btn = gr.Button("Push", elem_id="push-btn", scale=1)
        push_status = gr.Markdown(elem_id="push-status")

        hidden = {"api_visibility": "private"}
        method.change(
            lambda m: (gr.update(visible=m == "greedy"), gr.update(visible=m == "learned")),
            method,
            [accept, by_layer],
            **hidden,
        )
        task_kind.change(
            lambda k: (
                gr.update(visible=k == GLUE),
                gr.update(visible=k in (IMAGE, CUSTOM)),
                gr.update(value="image" if k == IMAGE else "text"),
            ),
            task_kind,
            [preset, custom, columns],
            **hidden,
        )
        worker = {"concurrency_id": "worker", "concurrency_limit": 1}
        inspect_btn.click(busy_note, None, inspect_status, queue=False, **hidden).then(
            inspect_ingredients, ingredients, [inspect_status, inspect_table], api_name="inspect",
            **worker,
        )  # fmt: skip
        run_event = run_btn.click(busy_note, None, status, queue=False, api_name="busy").then(
            run_soup,
            [ingredients, method, accept, by_layer, dtype, name, task_kind, preset, dataset,
             config, selection, report, columns, label, metrics, limit],
            [status, log, scores, comparison, plot, card, soup_folder],
            api_name="run", show_progress_on=[status], **worker,
        )  # fmt: skip
        cancel_btn.click(cancel_job, None, status, cancels=[run_event], api_name="cancel")
        push_btn.click(busy_note, None, push_status, queue=False, **hidden).then(
            push_soup, [repo, private, token, soup_folder], push_status, api_name="push",
            **worker,
        )  # fmt: skip
    return demo
