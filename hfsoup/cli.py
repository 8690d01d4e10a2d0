"""The ``hfsoup`` command: a thin shell over :mod:`hfsoup.api`.

Errors a user can cause end with one line on stderr and exit code 2; ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from hfsoup.errors import HfsoupError, IncompatibleIngredientsError, RecipeError, scrub

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line like every other user error (exit 2)."""

    def error(self, message: str) -> NoReturn:
        text = scrub(" ".join(message.split()))
        self.exit(EXIT_USER_ERROR, f"hfsoup: error: {text} (see {self.prog} --help)\n")


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    return common


def _device_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices (accelerate)")
    g.add_argument("--device", default="auto",
                   help="auto (default: this process's GPU, else the CPU), cpu, cuda or cuda:N")  # fmt: skip
    g.add_argument("--device-map", choices=["auto", "balanced", "sequential"],
                   help="spread the model and its float32 running sum over the visible GPUs, "
                        "spilling to the CPU (accelerate device map)")  # fmt: skip
    g.add_argument("--max-memory", nargs="+", metavar="DEV=SIZE",
                   help="budgets for --device-map, accelerate's syntax: 0=20GiB 1=20GiB cpu=64GiB")  # fmt: skip
    g.add_argument("--score-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the model while scoring (the running sum stays float32)")  # fmt: skip


def _device_args(args: argparse.Namespace) -> dict[str, Any]:
    return dict(device=args.device, device_map=args.device_map, max_memory=args.max_memory,
                score_dtype=args.score_dtype)  # fmt: skip


def _soup_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    _device_options(p)
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pytorch_model.bin weights (loaded with weights_only=True)")  # fmt: skip
    p.add_argument("--accumulate", choices=["float32", "float64"], default="float32",
                   help="dtype of the running sums (default float32)")  # fmt: skip
    p.add_argument("--private", action="store_true", help="create the pushed repo as private")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="average weights holding NaN/Inf instead of refusing them")  # fmt: skip
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted greedy or learned run (an error if there is none)")  # fmt: skip
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="learned soups: plan against SIZE bytes (e.g. 8GB), not the free memory")  # fmt: skip
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="write the weights a uniform soup streams into the HF cache too; "
                        "--no-cache: write nothing there (default: only files read whole), and "
                        "neither read nor write ingredient outputs (HF_HOME/hfsoup/outputs)")  # fmt: skip
    p.add_argument("--max-in-flight", metavar="SIZE",
                   help="bytes of reads ahead of the averaging, e.g. 128MB (default 32MiB; "
                        "raise it for a link with a long round trip)")  # fmt: skip


def _learned_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("learned soups (--method learned)")
    g.add_argument("--by-layer", action="store_true", help="one α per ingredient and layer")
    g.add_argument("--learned-path", choices=["auto", "memory", "stream"],
                   help="all ingredients resident, or streamed (memory flat in k); default auto")  # fmt: skip
    g.add_argument("--learned-epochs", type=int, help="epochs over the selection split (default 3)")
    g.add_argument("--learned-lr", type=float, help="Adam learning rate for α and β (default 0.05)")
    g.add_argument("--learned-batch-size", type=int, help="examples per step (default 32)")
    g.add_argument("--alpha-param", choices=["softmax", "free"],
                   help="α as a softmax over ingredients (default) or free weights")  # fmt: skip


def _task_vector_options(p: argparse.ArgumentParser) -> None:
    from hfsoup.methods.greedy_soup import COMBINE_OPERATORS

    g = p.add_argument_group("task-vector merges (task_arithmetic, ties, dare_*, wise_ft)")
    g.add_argument("--base", metavar="INGREDIENT",
                   help="the base model θ₀ the task vectors θᵢ − θ₀ are taken from")  # fmt: skip
    g.add_argument("--lambda", type=_float_or_auto, metavar="L", help="scaling of the merged "
                   "task vector (default 1); auto: chosen on --task from --grid")  # fmt: skip
    g.add_argument("--density", type=_density_or_auto, metavar="D",
                   help="ties/dare: fraction of each task vector kept, in (0, 1] (default 0.5); auto")  # fmt: skip
    g.add_argument("--alpha", type=_float_or_auto, metavar="A", help="wise_ft: (1 − α)·base + "
                   "α·soup (default 0.5); auto")  # fmt: skip
    g.add_argument("--grid", nargs="+", metavar="NAME=V1,V2", type=_grid_item,
                   help="the values auto coefficients are chosen from, e.g. lambda=0.2,0.5,1 "
                   "density=0.3,0.5 (default λ 0.1..1.5 by 0.1, density 0.1,0.3,..,0.9, "
                   "α 0..1 by 0.1)")  # fmt: skip
    g.add_argument("--combine", choices=COMBINE_OPERATORS,
                   help="greedy: merge the accepted set with this operator (needs --base; "
                   "default average, the paper's soup)")  # fmt: skip


def _float_or_auto(text: str) -> float | str:
    return "auto" if text == "auto" else float(text)


def _density_or_auto(text: str) -> float | str:
    value = _float_or_auto(text)
    if value != "auto" and not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: the kept fraction must be in (0, 1]")
    return value


_GRID_KEYS = ("lambda", "density", "alpha")


def _grid_item(text: str) -> tuple[str, list[float]]:
    name, _, values = text.partition("=")
    if name not in _GRID_KEYS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: unknown coefficient {name!r} (use {', '.join(_GRID_KEYS)})"
        )
    try:
        return name, [float(v) for v in values.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=V1,V2,...") from None


def task_vector_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe's task-vector keys (base, lambda, density, alpha) the flags give."""
    given = {key: getattr(args, key) for key in ("base", "lambda", "density", "alpha", "combine")}
    if getattr(args, "grid", None):
        names = [name for name, _ in args.grid]
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice is not None:
            raise RecipeError(f"grid: {twice} given twice (one NAME=V1,V2,... per coefficient)",
                              options=["grid"])  # fmt: skip
        given["grid"] = dict(args.grid)
    return {key: value for key, value in given.items() if value is not None}


_LEARNED_FLAGS = {"by_layer": "by_layer", "learned_path": "path", "learned_epochs": "epochs",
                  "learned_lr": "lr", "learned_batch_size": "batch_size", "alpha_param": "param"}  # fmt: skip


def learned_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``learned:`` options the flags give, or None when none is given."""
    given = {key: getattr(args, flag) for flag, key in _LEARNED_FLAGS.items()}
    given = {key: value for key, value in given.items() if value is not None and value is not False}
    return given or None


def _task_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task (for greedy/learned soups and evaluate)")
    g.add_argument("--task", help="a preset such as glue/sst2, or a task YAML file")
    g.add_argument("--dataset", help="dataset Hub ID (or a local data folder)")
    g.add_argument("--dataset-config", help="dataset configuration name")
    g.add_argument("--selection-split", help="held-out split that ranks and accepts")
    g.add_argument("--report-split", action="append", help="split to report (repeatable)")
    g.add_argument("--input-column", action="append", help="input column (repeatable: 2 for pairs)")
    g.add_argument("--label-column", help="label column (default: label)")
    g.add_argument("--metric", action="append", help="evaluate metric (repeatable; first selects)")
    g.add_argument("--limit", type=int, help="score only the first N examples of each split")
    g.add_argument("--batch-size", type=int, help="examples per forward pass (default 64)")
    g.add_argument("--max-length", type=int, help="tokens per example (default 128)")
    g.add_argument("--holdout-fraction", type=float, help="carve the selection split out of train")
    g.add_argument("--holdout-from", default="train", help="split to carve the holdout from")
    g.add_argument("--holdout-seed", type=int, default=0)
    g.add_argument("--allow-overlap", action="store_true",
                   help="allow a report split to be the selection split")  # fmt: skip
    g.add_argument("--task-kind", help="task kind: classification (default) or causal-lm")
    g.add_argument("--stride", type=int, help="causal-lm perplexity: window stride in tokens")
    g.add_argument("--choices-column", help="causal-lm choice-accuracy: the list of choices")
    g.add_argument(
        "--normalize",
        action="store_const",
        const=True,
        help="causal-lm choice-accuracy: log-likelihood per character (acc_norm)",
    )
    g.add_argument("--chat-template", action=argparse.BooleanOptionalAction,
                   help="causal-lm: apply the tokenizer's chat template (default: when the "
                   "data is conversational and the tokenizer has one)")  # fmt: skip


_TASK_FLAGS = {
    "dataset_config": "config", "selection_split": "selection_split",
    "report_split": "report_splits", "input_column": "input_columns",
    "label_column": "label_column", "metric": "metrics", "limit": "limit",
    "batch_size": "batch_size", "max_length": "max_length", "task_kind": "kind",
    "stride": "stride", "choices_column": "choices_column", "normalize": "normalize",
    "chat_template": "chat_template",
}  # fmt: skip


def task_from_args(args: argparse.Namespace) -> Any:
    """The task the flags describe: a preset/file, a custom mapping, or None."""
    # "is not None", not truthiness: --limit 0 or --holdout-fraction 0 is a value to check (and
    # refuse), not an absent flag that silently scores every row or drops the holdout.
    overrides = {
        key: getattr(args, flag)
        for flag, key in _TASK_FLAGS.items()
        if getattr(args, flag) is not None
    }
    if args.holdout_fraction is not None:
        overrides["holdout"] = {"from": args.holdout_from, "fraction": args.holdout_fraction,
                                "seed": args.holdout_seed}  # fmt: skip
    if args.allow_overlap:
        overrides["allow_overlap"] = True
    if args.task and args.dataset:
        raise RecipeError("give --task or --dataset, not both")
    if args.task:
        if args.task.endswith((".yaml", ".yml")):
            data = _read_yaml(args.task, "task file")
            if not isinstance(data, dict):
                raise RecipeError(f"task file {args.task}: a mapping of task keys was expected")
            return {**data, **overrides}
        if not overrides:
            return args.task
        from hfsoup.tasks.task import resolve_task

        return {**resolve_task(args.task).model_dump(by_alias=True, exclude_none=True), **overrides}
    if args.dataset:
        return {"dataset": args.dataset, **overrides}
    if overrides:
        raise RecipeError("task options given without --task or --dataset")
    return None


def _read_yaml(path: str | None, what: str, *, text: str | None = None) -> Any:
    """YAML (or JSON) from ``path``, or ``text``, read with a recipe's bounds.

    At most 1 MiB of UTF-8 from a regular file (a pipe, socket or folder is refused), no anchors
    or aliases, bounded nesting and values, string keys given once (hfsoup.recipe's loader): a
    task or search-space file is as untrusted as a recipe. Any of these, a missing file or bad
    YAML is a RecipeError.
    """
    from hfsoup.recipe import load_bounded_yaml

    where = f"{what} {path}" if path is not None else what
    if text is None:
        try:
            text = _read_small_text(path, what)
        except OSError as exc:
            raise RecipeError(f"cannot read {where}: {exc.strerror or exc}") from exc
    elif len(text.encode("utf-8")) > _MAX_OPTION_FILE:
        raise RecipeError(f"{where} is larger than 1 MiB, the most hfsoup reads")
    return load_bounded_yaml(text, where=where)[0]


_MAX_OPTION_FILE = 1 << 20  # bytes of a task or search-space file, like a recipe's cap


def _read_small_text(path: str, what: str) -> str:
    """The UTF-8 text of a file named by an option, read with bounded effort: a named pipe (which
    waits for a writer), a file over 1 MiB (or /dev/zero) or bytes that are not UTF-8 are refused.
    """
    import stat

    mode = os.stat(path).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISDIR(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a named pipe or socket"
        raise RecipeError(f"cannot read {what} {path}: it is {kind}, not a file")
    with open(path, "rb") as f:
        raw = f.read(_MAX_OPTION_FILE + 1)
    if len(raw) > _MAX_OPTION_FILE:
        raise RecipeError(f"{what} {path} is larger than 1 MiB, the most hfsoup reads")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from exc


_INGREDIENT_HELP = "org/name[@revision] or a directory"
_DTYPES = ["float32", "float16", "bfloat16"]


def build_parser() -> argparse.ArgumentParser:
    """The ``hfsoup`` parser, built afresh on each call.

    The ``--method`` choices are read from the method registry here, so a method registered at
    run time (:func:`hfsoup.registry.register`) is a valid choice of the next parser.
    """
    from hfsoup._version import __version__
    from hfsoup.registry import method_names

    parser = _Parser(
        prog="hfsoup",
        description="Model soups from the Hugging Face Hub: average fine-tunes of one model.",
    )
    parser.add_argument("--version", action="version", version=f"hfsoup {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common, methods = _common(), method_names()
    _add_inspect(sub, common, methods)
    _add_soup(sub, common, methods)
    _add_evaluate(sub, common)
    _add_run(sub, common)
    _add_push(sub, common)
    _add_sweep(sub, common)
    _add_demo(sub, common)
    _add_reproduce(sub, common)
    _add_hub(sub, common)
    return parser


def _method_help(methods: list[str]) -> str:
    from hfsoup.registry import get_method

    return "; ".join(f"{name}: {get_method(name).summary}" for name in methods)


def _add_inspect(sub: Any, common: argparse.ArgumentParser, methods: list[str]) -> None:
    from hfsoup.methods.greedy_soup import COMBINE_OPERATORS

    p = sub.add_parser(
        "inspect", parents=[common], help="resolve ingredients and check compatibility"
    )
    p.add_argument("ingredients", nargs="+", metavar="INGREDIENT", help=_INGREDIENT_HELP)
    p.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin weights")
    p.add_argument("--method", choices=methods, default="uniform",
                   help="the soup to estimate peak memory and time for")  # fmt: skip
    p.add_argument("--bandwidth", metavar="SIZE",
                   help="bytes per second from the Hub for the time estimate, e.g. 100MB "
                        "(default: an assumed 50MB)")  # fmt: skip
    p.add_argument("--dtype", choices=_DTYPES,
                   help="output dtype to estimate for (default: the ingredients')")  # fmt: skip
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="output shard size to estimate for (default 5GB)")  # fmt: skip
    p.add_argument("--base", metavar="INGREDIENT",
                   help="task-vector merges and greedy --combine: the base model θ₀ (its "
                   "download and float32 copy are counted)")  # fmt: skip
    p.add_argument("--combine", choices=COMBINE_OPERATORS,
                   help="greedy: estimate for the accepted set merged with this operator")  # fmt: skip
    p.add_argument("--scored", action="store_true",
                   help="task-vector merges: estimate for a run scored on a --task (the "
                   "coefficient search holds θ₀ and the merged task vector in float32)")  # fmt: skip


def _add_soup(sub: Any, common: argparse.ArgumentParser, methods: list[str]) -> None:
    p = sub.add_parser("soup", parents=[common], help="average ingredients into one model")
    p.add_argument("ingredients", nargs="+", metavar="INGREDIENT", help=_INGREDIENT_HELP)
    p.add_argument("--output", "-o", required=True, metavar="DIR",
                   help="folder to write the soup to")  # fmt: skip
    p.add_argument("--method", choices=methods, default="uniform", help=_method_help(methods))
    p.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="one weight per ingredient (normalised)")  # fmt: skip
    p.add_argument("--dtype", choices=_DTYPES, help="output dtype (default: the ingredients')")
    p.add_argument("--max-shard-size", default="5GB",
                   help="bytes per output shard, e.g. 5GB, 500MiB (default 5GB)")  # fmt: skip
    p.add_argument("--accept", choices=[">=", ">"], default=">=", help="greedy acceptance rule")
    p.add_argument("--order", choices=["score", "random"], default="score",
                   help="greedy order: best first (default) or seeded random")  # fmt: skip
    p.add_argument("--seed", type=int, default=0,
                   help="seed for --order random and the DARE masks")  # fmt: skip
    p.add_argument("--output-adapter", action="store_true",
                   help="LoRA adapter ingredients: write one adapter (SVD of the averaged ΔW), "
                        "not the full merged model")  # fmt: skip
    p.add_argument("--rank", type=int, metavar="R",
                   help="rank of --output-adapter (default: the largest of the adapters')")  # fmt: skip
    _task_options(p)
    _learned_options(p)
    _task_vector_options(p)
    p.add_argument("--name", help="a name for the soup (card title)")
    p.add_argument("--push-to", metavar="REPO_ID", help="upload the soup to this Hub repo")
    _soup_options(p)


def _add_evaluate(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "evaluate", parents=[common], help="score ingredients (and their ensembles) on a task"
    )
    p.add_argument("ingredients", nargs="+", metavar="INGREDIENT")
    _device_options(p)
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="--no-cache: neither read nor write ingredient outputs in the outputs "
                        "cache across runs (HF_HOME/hfsoup/outputs)")  # fmt: skip
    _task_options(p)


def _add_run(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("run", parents=[common], help="run a recipe YAML (or a soup's README.md)")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("--output", "-o", metavar="DIR",
                   help="override output.dir (required for a soup's README.md or "
                        "hfsoup_recipe.yaml: a soup's recipe chooses no output)")  # fmt: skip
    p.add_argument("--push-to", metavar="REPO_ID",
                   help="override output.push_to (a soup's recipe is pushed only with it)")  # fmt: skip
    p.add_argument("--allow-local", action="store_true",
                   help="let a soup's recipe read local folders, data files, dataset options "
                        "and metric scripts (it reads only from the Hub otherwise)")  # fmt: skip
    _soup_options(p)


def _add_push(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "push", parents=[common], help="upload a soup folder to the Hub in one commit"
    )
    p.add_argument("folder", metavar="DIR")
    p.add_argument("repo_id", metavar="REPO_ID")
    p.add_argument("--private", action="store_true")
    p.add_argument("--include", action="append", default=[], metavar="PATTERN",
                   help="also push the files this glob (relative to DIR) matches; by default only "
                        "the files hfsoup writes are pushed (repeatable)")  # fmt: skip


def _add_sweep(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "sweep", parents=[common], help="fine-tune K ingredients from one base model"
    )
    p.add_argument("base", nargs="?", metavar="BASE", help="base model repo ID or folder")
    p.add_argument("--recipe", metavar="YAML", help="a sweep recipe instead of the options")
    p.add_argument("--n", type=int, help="how many ingredients")
    p.add_argument("--space", metavar="SPEC", help="search space as YAML/JSON text or a file")
    p.add_argument("--push-prefix", metavar="ORG/NAME", help="push ingredient i to ORG/NAME-i")
    p.add_argument(
        "--output-dir", default="sweep", help="where ingredients are saved (default sweep)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-split", default="train")
    p.add_argument("--train-limit", type=int, help="fine-tune on the first N training examples")
    _task_options(p)


def _add_demo(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo", parents=[common], help="the whole loop offline: sweep, greedy soup, push"
    )
    p.add_argument("--workdir", default="hfsoup-demo")
    p.add_argument("--hub-endpoint", help="use this Hub instead of starting a local one")
    p.add_argument("--namespace", default="demo-org", help="org for the demo's repos")
    p.add_argument("--k", type=int, default=4, help="ingredients to fine-tune (default 4)")
    p.add_argument("--junk", type=int, default=1, metavar="N",
                   help="add N deliberately bad ingredients (rotated labels, absurd learning "
                        "rate) to show the uniform soup's collapse (default 1)")  # fmt: skip
    p.add_argument("--train", type=int, default=400, help="training examples (default 400)")
    p.add_argument(
        "--eval", type=int, default=200, help="examples per evaluation split (default 200)"
    )
    p.add_argument("--max-length", type=int, default=40, help="tokens per tweet (default 40)")
    p.add_argument("--seed", type=int, default=0, help="data shuffle and hyperparameter draws")


def _add_reproduce(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "reproduce", parents=[common],
        help="the model-soups paper's Table 2 and Figure B.1 at small scale (resumable)",
    )  # fmt: skip
    p.add_argument("--workdir", default="hfsoup-reproduce")
    p.add_argument("--k", type=int, default=12, help="ingredients to fine-tune (default 12)")
    p.add_argument("--train", type=int, default=400, help="training examples (default 400)")
    p.add_argument(
        "--eval",
        "--evaluation",
        dest="eval",
        type=int,
        default=800,
        help="examples per evaluation split (default 800)",
    )
    p.add_argument("--max-length", type=int, default=40, help="tokens per tweet (default 40)")
    p.add_argument("--seed", type=int, default=0, help="data shuffle and sweep seed")
    p.add_argument("--figure", help="where to write Figure B.1 (default WORKDIR/figure_b1.png)")


def _add_hub(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "hub", parents=[common], help="a local Hub-protocol server for offline teams and tests"
    )
    hub_sub = p.add_subparsers(dest="hub_command", required=True, metavar="ACTION")
    serve = hub_sub.add_parser(
        "serve", parents=[common], help="serve a folder as a Hub on 127.0.0.1"
    )
    from hfsoup.serve.hubserver import add_serve_options  # stdlib only: cheap to import

    add_serve_options(serve)


# API / recipe option names whose flag is not the option with "_" as "-" (the flags' dests).
_OPTION_DESTS = {
    "output.dir": "output", "output.push_to": "push_to", "output.private": "private",
    "output.dtype": "dtype", "output.max_shard_size": "max_shard_size",
    "output.adapter": "output_adapter", "output.rank": "rank",
    "holdout.fraction": "holdout_fraction", "holdout.from": "holdout_from",
    "holdout.seed": "holdout_seed",
    **{f"learned.{key}": dest for dest, key in _LEARNED_FLAGS.items()},
    **{f"task.{key}": dest for dest, key in _TASK_FLAGS.items()},
    **{key: dest for dest, key in _TASK_FLAGS.items() if key != dest},
}  # fmt: skip


def _command_flags(parser: argparse.ArgumentParser, command: Sequence[str]) -> dict[str, str]:
    """``dest -> --flag`` for the options of ``command`` (e.g. ``["hub", "serve"]``)."""
    for name in command:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or name not in subs[0].choices:
            break
        parser = subs[0].choices[name]
    flags: dict[str, str] = {}
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and action.dest not in ("help", "version"):
            flags.setdefault(action.dest, longs[0])
    return flags


def flag_hint(
    exc: HfsoupError, parser: argparse.ArgumentParser, command: Sequence[str] = ()
) -> str:
    """``exc``'s message with the command-line flags of its options, for the CLI's error line.

    The library names options as the API and recipes spell them (``exc.options``); the flags
    are read from ``parser``'s own options for ``command``, so they cannot drift from it. An
    option the command has no flag for adds nothing.

    Example:
        >>> err = RecipeError("reads only from the Hub unless allow_local is set",
        ...                   options=["allow_local"])
        >>> flag_hint(err, build_parser(), ["run"])
        'reads only from the Hub unless allow_local is set (--allow-local)'
    """
    text = str(exc)
    flags = _command_flags(parser, command)
    named = []
    for option in getattr(exc, "options", ()):
        flag = flags.get(_OPTION_DESTS.get(option, option.replace("-", "_")))
        if flag is not None and flag not in named:
            named.append(flag)
    return f"{text} ({', '.join(named)})" if named else text


def _print_inspection(report: Any, as_json: bool) -> None:
    from hfsoup.check.doctor import render

    print(json.dumps(report.to_dict(), indent=2) if as_json else render(report.to_dict()))


def _print_soup(result: Any, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {"output": str(result.output), "url": result.url, **result.results}, indent=2
            )
        )
        return
    if "table" in result.results:
        from hfsoup.report.summary import text_table

        print(
            text_table(
                result.results["table"], selection_split=result.results["selection"]["split"]
            )
        )
    print(f"soup written to {result.output}")
    if result.url:
        print(f"pushed: {result.url}")


def _print_evaluation(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    from hfsoup.report.summary import text_table

    sel = report["selection"]["split"]
    table = {row["ingredient"]: row["scores"] for row in report["ingredients"]}
    print(text_table({**table, **report["table"]}, selection_split=sel))


def _in_flight(value: str | None) -> int | None:
    """``--max-in-flight SIZE`` in bytes (None: the default)."""
    if value is None:
        return None
    from hfsoup.units import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise RecipeError(f"--max-in-flight: {exc}") from exc


def _dispatch(args: argparse.Namespace) -> int:
    from hfsoup import api

    progress = not args.quiet
    if args.command == "inspect":
        _check_estimable(args.method)
        report = api.inspect(args.ingredients, allow_pickle=args.allow_pickle, method=args.method,
                             bandwidth=args.bandwidth, dtype=args.dtype,
                             max_shard_size=args.max_shard_size, base=args.base,
                             combine=args.combine, scored=args.scored)  # fmt: skip
        _print_inspection(report, args.json)
        if not report.compatible:
            raise IncompatibleIngredientsError(report.problem)
        return 0
    run_options = {}
    if args.command in ("soup", "run"):
        run_options = dict(overwrite=args.overwrite, allow_pickle=args.allow_pickle,
                           allow_nonfinite=args.allow_nonfinite, resume=args.resume,
                           accumulate=args.accumulate, progress=progress,
                           memory_budget=args.memory_budget, cache=args.cache,
                           max_in_flight=_in_flight(args.max_in_flight), **_device_args(args))  # fmt: skip
    if args.command == "soup":
        result = api.soup(
            args.ingredients, output=args.output, method=args.method, weights=args.weights,
            dtype=args.dtype, max_shard_size=args.max_shard_size,
            task=task_from_args(args), accept=args.accept, order=args.order, seed=args.seed,
            name=args.name, push_to=args.push_to, private=args.private,
            learned=learned_from_args(args), merge=task_vector_from_args(args),
            output_adapter=args.output_adapter, rank=args.rank, **run_options,
        )  # fmt: skip
        if _is_main():
            _print_soup(result, args.json)
    elif args.command == "evaluate":
        task = task_from_args(args)
        if task is None:
            raise RecipeError("evaluate needs a task: --task glue/sst2, or --dataset ... options")
        report = api.evaluate(args.ingredients, task=task, allow_pickle=args.allow_pickle,
                              progress=progress, cache=args.cache, **_device_args(args))  # fmt: skip
        if _is_main():
            _print_evaluation(report, args.json)
    elif args.command == "run":
        result = api.run(args.recipe, output=args.output, push_to=args.push_to,
                         private=args.private, allow_local=args.allow_local,
                         **run_options)  # fmt: skip
        if _is_main():
            _print_soup(result, args.json)
    elif args.command == "push":
        url = api.push(args.folder, args.repo_id, private=args.private, include=args.include)
        print(json.dumps({"url": url}) if args.json else f"pushed: {url}")
    elif args.command == "sweep":
        for made in _sweep(args, progress):
            print(made)
    elif args.command == "demo":
        from hfsoup.demo import demo

        result = demo(workdir=args.workdir, hub_endpoint=args.hub_endpoint, namespace=args.namespace,
                      k=args.k, train=args.train, evaluation=args.eval, progress=progress,
                      junk=args.junk, max_length=args.max_length, seed=args.seed)  # fmt: skip
        _print_soup(result, args.json)
        if not args.json:
            print(f"greedy trajectory plot: {result.output / 'greedy_trajectory.png'}")
    elif args.command == "reproduce":
        from hfsoup.reproduce import reproduce

        out = reproduce(workdir=args.workdir, k=args.k, train=args.train, evaluation=args.eval,
                        max_length=args.max_length, seed=args.seed, figure=args.figure)  # fmt: skip
        print(
            json.dumps(out, indent=2)
            if args.json
            else f"{out['markdown']}\n\nFigure B.1: {out['figure']}"
        )
    elif args.command == "hub":
        from hfsoup.serve.hubauth import check_token, read_tokens_file
        from hfsoup.serve.hubserver import serve

        tokens = [check_token(t, "a --token value") for t in args.token]
        tokens += [t for f in args.tokens_file for t in read_tokens_file(f)]
        given = args.token or args.tokens_file
        serve(args.data, host=args.host, port=args.port, tokens=tokens if given else None)
    return 0


def _check_estimable(method: str) -> None:
    """Refuse ``inspect --method`` for a registered method the estimates do not model."""
    from hfsoup.registry import estimable_methods, get_method

    if get_method(method).estimate is None:
        raise RecipeError(
            f"inspect estimates memory and time for the methods {', '.join(estimable_methods())}; "
            f"method {method!r} has no estimate yet",
            options=["method"],
        )


def _sweep(args: argparse.Namespace, progress: bool) -> list[str]:
    from hfsoup.sweep import SweepRecipe, load_sweep_recipe, sweep, validation_line

    if args.recipe:
        recipe = load_sweep_recipe(args.recipe)
    else:
        if not (args.base and args.n):
            raise RecipeError("sweep needs BASE and --n (or --recipe FILE)")
        task = task_from_args(args)
        if task is None:
            raise RecipeError("sweep needs a task: --task glue/sst2, or --dataset ... options")
        fields = {"base": args.base, "task": task, "n": args.n, "push_prefix": args.push_prefix,
                  "output_dir": args.output_dir, "seed": args.seed, "train_split": args.train_split,
                  "train_limit": args.train_limit}  # fmt: skip
        if args.space:
            if Path(args.space).suffix in (".yaml", ".yml", ".json"):
                fields["space"] = _read_yaml(args.space, "search space file")
            else:
                fields["space"] = _read_yaml(None, "--space", text=args.space)
        try:
            recipe = SweepRecipe.model_validate(fields)
        except ValueError as exc:  # pydantic's ValidationError
            raise RecipeError(f"sweep options: {validation_line(exc)}") from exc
    return sweep(recipe, progress=progress)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the staged output is cleaned up the same way."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated


_INTERRUPTED = threading.Event()


def entry() -> None:
    """The console script and ``python -m hfsoup``: :func:`main`, then exit.

    After an interruption the output is already cleaned up, but fetch threads may still sit in
    a stalled read; a normal interpreter shutdown with them inside native code can abort the
    process ("terminate called without an active exception"), so the process ends at once.
    """
    code = main()
    if _INTERRUPTED.is_set():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hfsoup`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        # Read when datasets / transformers are first imported (later, in _dispatch): with -q
        # their progress bars and warnings stay off stderr too, which keeps errors one line.
        for name, value in (("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
                            ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                            ("TRANSFORMERS_VERBOSITY", "error")):  # fmt: skip
            os.environ.setdefault(name, value)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    command = [c for c in (args.command, getattr(args, "hub_command", None)) if c]
    notices = _Notices(
        logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        hint=lambda text, options: flag_hint(HfsoupError(text, options=options), parser, command),
    )
    logger = logging.getLogger("hfsoup")
    level = logger.level
    logger.addHandler(notices)
    if level == logging.NOTSET or level > notices.level:
        logger.setLevel(notices.level)  # else INFO is dropped before any handler sees it
    try:
        return _dispatch(args)
    except HfsoupError as exc:
        # Scrubbed of credentials (URL userinfo, tokens) whatever a message or traceback quoted.
        if args.debug:
            print(scrub(traceback.format_exc()), file=sys.stderr, end="")
        # One line, whatever a message quoted (a server's answer, a library's advice).
        message = flag_hint(exc, parser, command)
        print(f"{_who()}: error: {scrub(' '.join(message.split()))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        print(f"{_who()}: interrupted; {_left_behind(args)}", file=sys.stderr)
        _INTERRUPTED.set()
        return 128 + (signal.SIGTERM if isinstance(exc, _Terminated) else signal.SIGINT)
    finally:
        logger.removeHandler(notices)
        logger.setLevel(level)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Notices(logging.Handler):
    """The library's notices (the ``hfsoup`` logger) as ``hfsoup: ...`` lines on stderr.

    Warnings always; progress steps (INFO) unless ``--quiet``. One line each, scrubbed of
    credentials like the error line; written to the current ``sys.stderr`` so that an
    in-process caller's capture sees them.
    """

    def __init__(
        self, level: int = logging.WARNING, hint: Callable[[str, Sequence[str]], str] | None = None
    ) -> None:
        super().__init__(level=level)
        self._hint = hint

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            options = getattr(record, "options", ())  # log.warning(..., extra={"options": [...]})
            if options and self._hint is not None:
                text = self._hint(text, options)
            text = scrub(" ".join(text.split()))
            who = getattr(record, "hfsoup_who", None) or _who()  # "hfsoup demo" for its steps
            print(f"{who}: {text}", file=sys.stderr, flush=True)
        except Exception:  # a notice must never turn into an error (or a traceback) of its own
            pass


def _is_main() -> bool:
    """Whether this is the process that prints (the only one, or rank 0 under a launcher)."""
    from hfsoup.compute.distributed import launched_rank

    return launched_rank() == 0


def _who() -> str:
    """``hfsoup``, or ``hfsoup[rank R]`` in the processes of ``accelerate launch`` but the main."""
    from hfsoup.compute.distributed import launched_rank

    return "hfsoup" if _is_main() else f"hfsoup[rank {launched_rank()}]"


def _left_behind(args: argparse.Namespace) -> str:
    """What an interrupted command leaves: nothing, or a greedy run's state to resume from."""
    from hfsoup.io.writer import partial_dir

    # Only resumable (greedy) runs keep their partial folder after an interruption.
    output = getattr(args, "output", None)
    try:
        kept = bool(output) and partial_dir(Path(output).expanduser().resolve()).exists()
    except (OSError, ValueError):  # an output name the file system refuses
        kept = False
    if kept:
        return "no output was written; the greedy run's progress is kept (rerun with --resume)"
    return "no output was written"


if __name__ == "__main__":
    entry()
