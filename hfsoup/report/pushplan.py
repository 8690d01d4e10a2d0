"""What a push sends: where to, which local files, and which remote files it replaces.

A push uploads regular files inside the soup folder only (a symlink is refused, never followed),
and by default only the files hfsoup itself writes (:func:`is_soup_file`); anything else in the
folder is left out unless asked for by an ``include`` pattern. In the same commit it deletes the
remote files hfsoup owns that the new soup does not have, so a re-push with another shard
layout cannot leave the old weights for transformers to load.

No HTTP here: :func:`push_folder` opens the files and :func:`hfsoup.io.hub.commit_files` makes
the commit.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shlex
import stat
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, NoReturn

from hfsoup.errors import PushError

CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
RECIPE_NAME = "hfsoup_recipe.yaml"
RESULTS_NAME = "results.json"
# The card's figures (report.TRAJECTORY_PNG, learned_run.ALPHA_PNG; a test keeps them equal:
# importing learned_run here would load transformers and datasets for every push).
CARD_IMAGES = ("greedy_trajectory.png", "learned_alpha.png")
SINGLE_WEIGHTS = "model.safetensors"
# Weight files transformers may load from a repo's top level; a push replaces all of them.
WEIGHT_PATTERNS = (
    "model*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "*.bin.index.json",
)
# A soup of LoRA adapters written as one adapter (hfsoup.compute.lora_writer).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_MAX_NAMED = 8  # names listed in one line before "and N more"
_MAX_REPO_ID_SHOWN = 100
_READ_AT_ONCE = 8 * 2**20  # bytes; larger files are streamed from an open descriptor


def check_repo_id(repo_id: object) -> None:
    """Refuse anything but a Hub repo ID, ``name`` or ``org/name``, before any work is done.

    Raises:
        ValueError: with a one-line reason that quotes (a shortened) ``repo_id``.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    shown = repr(repo_id)
    if len(shown) > _MAX_REPO_ID_SHOWN:
        shown = shown[:_MAX_REPO_ID_SHOWN] + "..."
    if isinstance(repo_id, str) and repo_id.count("/") <= 1:
        try:
            validate_repo_id(repo_id)
            return
        except HFValidationError:
            pass
    raise ValueError(
        f"{shown} is not a Hub repo ID: use 'name' or 'org/name' (letters, digits, '-', '_' "
        "and '.'; not starting or ending with '-' or '.', no '--' or '..', at most 96 characters)"
    )


def is_soup_file(path: str, module_folders: Sequence[str] | None = None) -> bool:
    """Whether a repo path is one hfsoup writes into a soup (and so replaces on a push).

    Files in subfolders are a named chat template, or a file of a sentence-transformers module
    folder: one of ``module_folders`` (those the soup's modules.json names) when given, else a
    folder named as sentence-transformers names them (``1_Pooling``).
    """
    from hfsoup.io.layouts import is_module_file
    from hfsoup.io.writer import is_aux_file

    if is_aux_file(path) or is_module_file(path, module_folders):
        return True
    if "/" in path:
        return False
    fixed = (CONFIG_NAME, CARD_NAME, RECIPE_NAME, RESULTS_NAME, *CARD_IMAGES, *ADAPTER_FILES)
    return path in fixed or any(fnmatch.fnmatchcase(path, p) for p in WEIGHT_PATTERNS)


@dataclass
class PushPlan:
    """The files of a folder a push uploads, and those it leaves out (paths relative to it)."""

    folder: Path
    files: list[str]
    left_out: list[str] = field(default_factory=list)

    def left_out_line(self) -> str | None:
        """One line naming the files left out, or ``None`` when there are none."""
        if not self.left_out:
            return None
        return (
            f"push leaves out {len(self.left_out)} file(s) of {self.folder} that hfsoup did not "
            f"write: {named(self.left_out)} (add them with --include PATTERN)"
        )


def named(paths: Sequence[str]) -> str:
    """``a, b, c`` for a few paths, ``a, ..., h and 12 more`` for many."""
    shown = ", ".join(paths[:_MAX_NAMED])
    return shown if len(paths) <= _MAX_NAMED else f"{shown} and {len(paths) - _MAX_NAMED} more"


def regular_files(folder: Path) -> list[str]:
    """Every file inside ``folder``, as sorted POSIX paths relative to it.

    Raises:
        PushError: the folder holds a symlink (to a file or a folder) or something that is not a
            regular file (a FIFO, a socket, a device); all of them are named. Nothing is followed.
    """
    files, refused = [], []
    for top, dirs, names in os.walk(folder, followlinks=False, onerror=_walk_error):
        rel_top = PurePosixPath(Path(top).relative_to(folder))
        for name in [*dirs, *names]:
            rel = str(rel_top / name)
            try:
                mode = os.lstat(os.path.join(top, name)).st_mode
            except OSError as exc:  # removed or unreadable while walking
                _walk_error(exc)
            if stat.S_ISLNK(mode):
                refused.append(f"{rel} (a symlink)")
            elif name in names and not stat.S_ISREG(mode):
                refused.append(f"{rel} (not a regular file)")
            elif name in names:
                files.append(rel)
    if refused:
        raise PushError(
            f"refusing to push {folder}: it holds {named(sorted(refused))}; a push uploads only "
            "regular files inside the folder and follows no link; nothing was uploaded"
        )
    return sorted(files)


def _walk_error(exc: OSError) -> NoReturn:
    raise PushError(f"cannot read {exc.filename} to push it ({exc.strerror}); nothing was uploaded")


def plan_push(folder: Path, include: Sequence[str] = ()) -> PushPlan:
    """The files of the soup in ``folder`` to upload: its own files plus ``include`` matches.

    ``include`` patterns are globs relative to ``folder`` (``*.txt``, ``eval/**``); a pattern
    naming a folder takes the files under it. Only regular files inside ``folder`` can match.

    Raises:
        PushError: a symlink or special file in ``folder``, a pattern matching nothing, or a soup
            whose weights are missing or ambiguous; nothing has been uploaded.
    """
    config = folder / CONFIG_NAME
    if not (config.is_file() or config.is_symlink()):  # before walking what may be a big tree
        raise PushError(f"{folder} is not a soup folder (no {CONFIG_NAME})")
    found = regular_files(folder)
    chosen = set(_own_files(folder, found))
    for pattern in include:
        matched = _matches(folder, pattern, found)
        if not matched:
            raise PushError(
                f"include pattern {pattern!r} matches no regular file inside {folder}; "
                "nothing was uploaded"
            )
        chosen.update(matched)
    files = sorted(chosen)
    return PushPlan(folder, files, [f for f in found if f not in chosen])


def _own_files(folder: Path, found: Sequence[str]) -> list[str]:
    """The files hfsoup writes into a soup, as present in ``folder``; the weights are the
    single ``model.safetensors`` or exactly the shards its index names."""
    from hfsoup.io.writer import INDEX_NAME

    present = set(found)
    if INDEX_NAME in present and SINGLE_WEIGHTS in present:
        raise PushError(
            f"{folder} holds both {SINGLE_WEIGHTS} and {INDEX_NAME}, and transformers would load "
            f"only one of them; hfsoup writes one or the other: remove the stale one"
        )
    if INDEX_NAME in present:
        weights = [INDEX_NAME, *_indexed_shards(folder, present)]
    elif SINGLE_WEIGHTS in present:
        weights = [SINGLE_WEIGHTS]
    elif all(f in present for f in ADAPTER_FILES):  # an adapter: its files are soup files
        weights = []
    else:
        raise PushError(f"{folder} holds no weights ({SINGLE_WEIGHTS} or {INDEX_NAME})")
    modules = _module_folders(folder, present)
    others = [
        f
        for f in found
        if is_soup_file(f, modules) and not any(fnmatch.fnmatchcase(f, p) for p in WEIGHT_PATTERNS)
    ]
    return [*weights, *others]


def _module_folders(folder: Path, present: set[str]) -> list[str]:
    """The module folders the soup's modules.json names (none without one)."""
    from hfsoup.io.layouts import MODULES_FILE, module_folders

    if MODULES_FILE not in present:
        return []
    try:
        with open(folder / MODULES_FILE, "rb") as f:
            return module_folders(json.loads(f.read(1 << 20)))
    except (OSError, ValueError, RecursionError) as exc:
        raise PushError(
            f"{folder / MODULES_FILE} is not a readable modules.json ({exc!r}); nothing was "
            "uploaded"
        ) from exc


def _indexed_shards(folder: Path, present: set[str]) -> list[str]:
    from hfsoup.io.writer import INDEX_NAME

    path = folder / INDEX_NAME
    content = open_regular(folder, INDEX_NAME)
    if not isinstance(content, bytes):  # over the read-at-once size: no index is that big
        content.close()
        raise PushError(
            f"{path} is larger than {_READ_AT_ONCE >> 20} MiB, which no weight index is; "
            "nothing was uploaded"
        )
    try:
        index = json.loads(content.decode("utf-8"))
        shards = set(index["weight_map"].values())
    except RecursionError:
        raise PushError(f"{path} is not a readable weight index (JSON nested too deep)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PushError(f"{path} is not a readable weight index ({exc!r})") from exc
    if not shards or not all(isinstance(s, str) for s in shards):
        raise PushError(f"{folder / INDEX_NAME} names no weight files")
    # Only shard names hfsoup writes: an index naming ".env" must not get it uploaded.
    odd = sorted(s for s in shards if "/" in s or not fnmatch.fnmatchcase(s, "model*.safetensors"))
    if odd:
        raise PushError(
            f"{folder / INDEX_NAME} names {named(odd)}, which is not a weight file of a soup "
            "(model*.safetensors beside the index); nothing was uploaded"
        )
    missing = sorted(s for s in shards if s not in present)
    if missing:
        raise PushError(
            f"{folder / INDEX_NAME} names {named(missing)}, which {folder} does not hold as a "
            "file beside it; nothing was uploaded"
        )
    return sorted(shards)


def _matches(folder: Path, pattern: str, found: Sequence[str]) -> list[str]:
    """The files of ``found`` that ``pattern`` (a glob relative to ``folder``) names."""
    parts = PurePosixPath(pattern).parts
    if not pattern or pattern.startswith(("/", "~")) or ".." in parts:
        raise PushError(
            f"include pattern {pattern!r} must be a glob relative to {folder}, inside it; "
            "nothing was uploaded"
        )
    try:
        hits = [PurePosixPath(p.relative_to(folder)) for p in folder.glob(pattern)]
    except ValueError as exc:  # a pattern pathlib cannot read
        raise PushError(f"bad include pattern {pattern!r} ({exc}); nothing was uploaded") from exc
    roots = {str(h) for h in hits if str(h) != "."}
    return [f for f in found if f in roots or any(f.startswith(r + "/") for r in roots)]


def open_regular(folder: Path, name: str) -> bytes | BinaryIO:
    """The content of ``folder/name`` to upload: its bytes when small, else an open file.

    The file is opened without following a symlink and refused unless it is a regular file, at
    open time, so a file swapped for a link after :func:`regular_files` looked is refused too.
    Small files are read at once so that a push of many files holds few descriptors.

    Raises:
        PushError: naming the file; nothing has been uploaded.
    """
    path = folder / name
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
        # (Windows has neither flag, nor FIFOs; symlinks are refused by the walk there.)
        flags = (
            getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        )
        fd = os.open(path, os.O_RDONLY | flags)
    except OSError as exc:
        what = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror
        raise PushError(f"cannot push {path}: {what}; nothing was uploaded") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise PushError(f"cannot push {path}: not a regular file; nothing was uploaded")
    os.set_blocking(fd, True)
    file = os.fdopen(fd, "rb")
    if info.st_size > _READ_AT_ONCE:
        return file
    with file:
        return file.read()


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    message: str,
    files: list[str] | None = None,
    include: list[str] | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload ``files`` of ``folder`` as one commit.

    The same commit deletes the remote files hfsoup owns (weights, index, card, tokenizer, ...:
    :func:`is_soup_file`) that are not among ``files``, so the repo holds the new soup and no
    stale weights beside it. Other remote files are kept. The files are opened here (a symlink is
    refused); :func:`hfsoup.io.hub.commit_files` sends them.

    Args:
        files: paths relative to ``folder``, as :func:`plan_push` chose them; default: every
            regular file inside it.
        include: the include patterns that chose ``files``, for the retry command a failure
            prints.

    Returns:
        The URL of the commit.

    Raises:
        PushError: a file is a symlink or not a regular file (refused before anything is sent),
            or the upload failed; the message says how to retry. ``folder`` is left intact.
    """
    from hfsoup.io.hub import commit_files, refuse_push_offline

    try:
        check_repo_id(repo_id)
    except ValueError as exc:
        raise PushError(f"cannot push: {exc}") from exc
    refuse_push_offline(repo_id, folder)
    files = regular_files(folder) if files is None else list(files)
    retry = f"retry with: hfsoup push {folder} {repo_id}" + (" --private" if private else "")
    retry += "".join(f" --include {shlex.quote(p)}" for p in include or ())
    with ExitStack() as opened:
        contents: dict[str, bytes | BinaryIO] = {}
        for f in files:
            content = open_regular(folder, f)
            if not isinstance(content, bytes):
                opened.enter_context(content)
            contents[f] = content
        return commit_files(
            repo_id, contents, replaces=is_soup_file, message=message, folder=folder,
            retry=retry, private=private, token=token,
        )  # fmt: skip
