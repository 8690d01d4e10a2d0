"""hfsoup's Gradio Space: soup Hub models by repo name in the browser, see the scores, push.

Run locally: ``python space_app/app.py [--port 7860]`` (binds 127.0.0.1; ``GRADIO_SERVER_PORT``
and ``GRADIO_SERVER_NAME`` are honoured). On a Space, this file is the ``app_file``.

This module stays import-light on purpose: jobs run in processes started with ``spawn``, and
a spawned child imports the main module again. Gradio is imported only when the page is built.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def on_space() -> bool:
    """Whether this runs as a Hugging Face Space (the runtime sets ``SPACE_ID``)."""
    return bool(os.environ.get("SPACE_ID"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    space = on_space()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0" if space else "127.0.0.1"),
        help="interface to bind (default 127.0.0.1; 0.0.0.0 on a Space)",
    )
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("HFSOUP_SPACE_WORKDIR", Path(tempfile.gettempdir(), "hfsoup-space"))),
        help="where finished soups are kept for pushing",
    )  # fmt: skip
    parser.add_argument("--keep", type=int, default=4, help="finished soups to keep (default 4)")
    parser.add_argument(
        "--login-button",
        action=argparse.BooleanOptionalAction,
        default=space,
        help="show 'Sign in with Hugging Face' (OAuth; on by default on a Space only)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if on_space():
        # Jobs act for the visitor: never with the Space owner's own token.
        os.environ.pop("HF_TOKEN", None)
        os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
    # A terminated server exits normally, so its worker processes are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    from worker import WorkerPool

    pool = WorkerPool()
    pool.warm()  # imports torch + hfsoup in the worker while gradio imports here
    try:
        import ui
        from logic import method_choices

        methods = method_choices(pool.wait_capabilities(timeout=300))
        outputs = ui.Outputs(args.workdir, keep=args.keep)
        demo = ui.build(pool, outputs, methods=methods, login=args.login_button)
        demo.queue(default_concurrency_limit=1).launch(
            server_name=args.host,
            server_port=args.port,
            allowed_paths=[str(args.workdir)],
            footer_links=["api"],
            ssr_mode=False,
        )
    finally:
        pool.close()


if __name__ == "__main__":
    main()
