"""The ``hfsoup`` command: a thin shell over :mod:`hfsoup.api`.

Errors a user can cause end with one line on stderr and exit code 2; ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from hfsoup.errors import HfsoupError

EXIT_USER_ERROR = 2


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    return common


def _soup_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pytorch_model.bin weights (loaded with weights_only=True)")  # fmt: skip
    p.add_argument("--accumulate", choices=["float32", "float64"], default="float32",
                   help="dtype of the running sums (default float32)")  # fmt: skip
    p.add_argument("--private", action="store_true", help="create the pushed repo as private")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="hfsoup",
        description="Model soups from the Hugging Face Hub: average fine-tunes of one model.",
    )
    from hfsoup import __version__

    parser.add_argument("--version", action="version", version=f"hfsoup {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "inspect", parents=[common], help="resolve ingredients and check compatibility"
    )
    p.add_argument(
        "ingredients", nargs="+", metavar="INGREDIENT", help="org/name[@revision] or a directory"
    )
    p.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin weights")

    p = sub.add_parser("soup", parents=[common], help="average ingredients into one model")
    p.add_argument(
        "ingredients", nargs="+", metavar="INGREDIENT", help="org/name[@revision] or a directory"
    )
    p.add_argument(
        "--output", "-o", required=True, metavar="DIR", help="folder to write the soup to"
    )
    p.add_argument("--method", choices=["uniform", "greedy", "learned"], default="uniform")
    p.add_argument(
        "--weights",
        nargs="+",
        type=float,
        metavar="W",
        help="one weight per ingredient (normalised)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="output dtype (default: the ingredients')",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="bytes per output shard, e.g. 5GB, 500MiB (default 5GB)",
    )
    p.add_argument("--task", help="evaluation task for greedy/learned soups, e.g. glue/sst2")
    p.add_argument("--accept", choices=[">=", ">"], default=">=", help="greedy acceptance rule")
    p.add_argument("--name", help="a name for the soup (card title)")
    p.add_argument("--push-to", metavar="REPO_ID", help="upload the soup to this Hub repo")
    _soup_options(p)

    p = sub.add_parser("run", parents=[common], help="run a recipe YAML (or a soup's README.md)")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("--output", "-o", metavar="DIR", help="override output.dir")
    p.add_argument("--push-to", metavar="REPO_ID", help="override output.push_to")
    _soup_options(p)

    p = sub.add_parser(
        "push", parents=[common], help="upload a soup folder to the Hub in one commit"
    )
    p.add_argument("folder", metavar="DIR")
    p.add_argument("repo_id", metavar="REPO_ID")
    p.add_argument("--private", action="store_true")

    p = sub.add_parser(
        "hub", parents=[common], help="a local Hub-protocol server for offline teams and tests"
    )
    hub_sub = p.add_subparsers(dest="hub_command", required=True, metavar="ACTION")
    serve = hub_sub.add_parser(
        "serve", parents=[common], help="serve a folder as a Hub on 127.0.0.1"
    )
    serve.add_argument("--data", required=True, metavar="DIR")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    return parser


def _print_inspection(report: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    for row in report.to_dict()["ingredients"]:
        sha = row["sha"] or "(local)"
        print(f"{row['ingredient']}\n  sha: {sha}\n  parameters: {row['parameters']:,}  "
              f"bytes: {row['bytes']:,}  dtypes: {', '.join(row['dtypes'])}  "
              f"model_type: {row['model_type']}  format: {row['format']}")  # fmt: skip
    print("compatible: yes" if report.compatible else "compatible: NO")


def _print_soup(result: Any, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {"output": str(result.output), "url": result.url, **result.results}, indent=2
            )
        )
        return
    print(f"soup written to {result.output}")
    if result.url:
        print(f"pushed: {result.url}")


def _dispatch(args: argparse.Namespace) -> int:
    from hfsoup import api

    progress = not args.quiet
    if args.command == "inspect":
        report = api.inspect(args.ingredients, allow_pickle=args.allow_pickle)
        _print_inspection(report, args.json)
        if not report.compatible:
            raise HfsoupError(report.problem)
        return 0
    run_options = {}
    if args.command in ("soup", "run"):
        run_options = dict(overwrite=args.overwrite, device=args.device, allow_pickle=args.allow_pickle,
                           accumulate=args.accumulate, progress=progress)  # fmt: skip
    if args.command == "soup":
        result = api.soup(
            args.ingredients, output=args.output, method=args.method, weights=args.weights,
            dtype=args.dtype, max_shard_size=args.max_shard_size, task=args.task,
            accept=args.accept, name=args.name, push_to=args.push_to, private=args.private,
            **run_options,
        )  # fmt: skip
        _print_soup(result, args.json)
    elif args.command == "run":
        result = api.run(args.recipe, output=args.output, push_to=args.push_to, **run_options)
        _print_soup(result, args.json)
    elif args.command == "push":
        url = api.push(args.folder, args.repo_id, private=args.private)
        print(json.dumps({"url": url}) if args.json else f"pushed: {url}")
    elif args.command == "hub":
        from hfsoup.hubserver import serve

        serve(args.data, host=args.host, port=args.port)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hfsoup`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except HfsoupError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"hfsoup: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("hfsoup: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
