"""Writing a soup: sharded safetensors, the index, config and tokenizer files, atomically.

Everything is written into a hidden folder beside the target and renamed into place only when
complete, so a crash, a full disk or Ctrl-C never leaves a half-written model that looks whole.
A lock file beside the target keeps two hfsoup processes from writing the same output.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hfsoup.errors import OutputExistsError, OutputWriteError
from hfsoup.io.hub import Ingredient
from hfsoup.io.layouts import MODULES_FILE, SETTINGS_FILES
from hfsoup.io.shards import INDEX_NAME, ShardWriter, shard_filename

if TYPE_CHECKING:
    from filelock import BaseFileLock

# Files a user expects beside the weights so that the soup loads and runs like its ingredients.
# (A sentence-transformers model's module folders are written by hfsoup.compute.layout_writer.)
AUX_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor_config.json",
    MODULES_FILE,
    *SETTINGS_FILES,
)
# transformers saves a tokenizer's named chat templates beside the default one, one file each.
TEMPLATES_DIR = "additional_chat_templates"


def partial_dir(target: Path) -> Path:
    """The hidden folder beside ``target`` where its output is assembled."""
    return target.parent / f".{target.name}.hfsoup-partial"


# hfsoup's own names beside an output: the partial folder, the lock, the previous output.
_WORKING_SUFFIXES = (".hfsoup-partial", ".hfsoup-lock", ".hfsoup-old")
_WORKING_NAME = re.compile(r"^\..+\.hfsoup-(partial|lock|old)$", re.DOTALL)
_MAX_NAME_BYTES = 255  # NAME_MAX of Linux and macOS file systems
# The longest output name whose working names (".NAME.hfsoup-partial") still fit in a name.
MAX_OUTPUT_NAME_BYTES = _MAX_NAME_BYTES - 1 - max(len(s) for s in _WORKING_SUFFIXES)


def check_output_name(target: Path) -> None:
    """Refuse an output path hfsoup cannot write, or whose name is one of its working names.

    The path as given (before symlinks are resolved): it may hold no NUL byte; its last part
    may not be a symlink (a soup is never written, nor a folder replaced, through a link), nor
    named like hfsoup's working folders (``.NAME.hfsoup-partial``, ``-lock``, ``-old``, which
    another run of ``NAME`` removes), nor be so long that those names would not fit.

    Raises:
        OutputExistsError: naming the output and the problem.
    """
    text = os.fspath(target)
    if "\0" in text:
        raise OutputExistsError(f"output folder {text!r} holds a NUL byte; choose another name")
    path = Path(text).expanduser()
    name = path.resolve().name if path.name in ("", ".", "..") else path.name
    if len(os.fsencode(name)) > MAX_OUTPUT_NAME_BYTES:
        raise OutputExistsError(
            f"output folder name {name[:40]!r}... is {len(os.fsencode(name))} bytes long; at most "
            f"{MAX_OUTPUT_NAME_BYTES} (hfsoup assembles it in .NAME.hfsoup-partial beside it)"
        )
    if _WORKING_NAME.match(name):
        raise OutputExistsError(
            f"output folder {path} is named like hfsoup's working folders (.NAME.hfsoup-partial, "
            "-lock, -old), which another run removes; choose another name"
        )
    try:
        link = path.is_symlink()
    except OSError as exc:
        raise OutputWriteError(f"cannot use output {path}: {exc.strerror}") from exc
    if link:
        pointed = ""
        with suppress(OSError):  # the link may be gone by now: the message must still come
            pointed = f" (to {os.readlink(path)})"
        raise OutputExistsError(
            f"output {path} is a symlink{pointed}; hfsoup writes no soup through "
            f"a link and replaces no folder it points to: give the folder itself, "
            f"{path.resolve()}",
            options=["output.dir"],
        )


def is_nonempty(target: Path) -> bool:
    return target.exists() and (not target.is_dir() or any(target.iterdir()))


def check_output_target(
    target: Path, *, overwrite: bool = False, inputs: Iterable[Path] = ()
) -> None:
    """Refuse an output folder whose replacement would destroy what it must not.

    A soup is renamed into place, so the target must not be a mount point; and replacing a
    non-empty target deletes it, so with ``overwrite`` it may not be (or hold) one of the
    ``inputs`` (local ingredients), the HF cache or HF home, the home folder, ``/``, or the
    working directory or one of its parents. Checked before anything is read.

    Raises:
        OutputExistsError: naming the target and what it holds.
    """
    check_output_name(target)
    target = target.expanduser().resolve()
    try:
        _check_target(target, overwrite=overwrite, inputs=inputs)
    except OSError as exc:  # a name too long for the file system, a folder that cannot be read
        raise OutputWriteError(f"cannot use output {target}: {exc.strerror}") from exc


def _check_target(target: Path, *, overwrite: bool, inputs: Iterable[Path]) -> None:
    if os.path.ismount(target):
        raise OutputExistsError(
            f"output folder {target} is a mount point, which cannot be replaced; "
            "write the soup into a folder inside it"
        )
    for item in inputs:
        item = Path(item).expanduser().resolve()
        if item == target or item.is_relative_to(target):
            what = "is" if item == target else "holds"
            raise OutputExistsError(
                f"output folder {target} {what} the ingredient {item}; choose another output"
            )
    if not (overwrite and is_nonempty(target)):
        return
    if not target.is_dir():
        raise OutputExistsError(f"output {target} is a file, not a folder; it is not replaced")
    protected = _protected_folders()
    for what, folder in protected:
        if folder == target or folder.is_relative_to(target):
            holds = "is" if folder == target else "holds"
            raise OutputExistsError(
                f"output folder {target} {holds} {what} ({folder}); it is not replaced"
            )
    cache = dict(protected)["the HF cache"]
    if target.is_relative_to(cache):
        raise OutputExistsError(
            f"output folder {target} is inside the HF cache ({cache}); it is not replaced"
        )


def _protected_folders() -> list[tuple[str, Path]]:
    """Folders an overwritten output may neither be nor hold."""
    from huggingface_hub import constants  # not at import: hfsoup.demo sets HF_* first

    folders = [
        ("the HF cache", constants.HF_HUB_CACHE),
        ("the HF home", constants.HF_HOME),
        ("the home folder", Path.home()),
        ("the working directory", Path.cwd()),
    ]
    return [(what, Path(f).expanduser().resolve()) for what, f in folders]


@contextmanager
def staged_output(
    target: Path, *, overwrite: bool = False, keep_partial: bool = False
) -> Iterator[Path]:
    """Yield a temporary folder for the output; on success, move it to ``target``.

    Args:
        target: the output folder the user asked for.
        overwrite: replace a non-empty ``target``.
        keep_partial: keep the temporary folder after a failure (resumable runs keep their
            state there); otherwise it is removed.

    Raises:
        OutputExistsError: ``target`` is not empty and ``overwrite`` is False, or another hfsoup
            process is writing it.
        OutputWriteError: the disk filled up or the folder cannot be written.
    """
    check_output_target(target, overwrite=overwrite)
    target = target.expanduser().resolve()
    if is_nonempty(target) and not overwrite:
        raise OutputExistsError(
            f"output folder {target} exists and is not empty; set overwrite to replace it",
            options=["overwrite"],
        )
    lock = _lock(target)
    tmp = partial_dir(target)
    try:
        try:
            if not keep_partial or not _is_real_dir(tmp):
                _remove(tmp)  # a leftover of a killed run; a link or file there is not followed
            tmp.mkdir(exist_ok=True)
            yield tmp
            _swap_into_place(tmp, target)
        except OSError as exc:
            if not _is_write_error(exc, target.parent):
                raise
            kept = f"; resume state kept in {tmp}" if keep_partial else "; nothing was written"
            what = "disk full" if exc.errno in _FULL_ERRNOS else exc.strerror
            raise OutputWriteError(f"{what} while writing {target}{kept}") from exc
    except BaseException:
        if not keep_partial:
            _remove(tmp, ignore_errors=True)
        raise
    finally:
        _unlock(lock)


_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


def _is_write_error(exc: OSError, parent: Path) -> bool:
    """Whether ``exc`` means "the output cannot be written here" (a user's problem to fix)
    rather than a bug or a fault elsewhere (a local ingredient that cannot be read)."""
    if exc.errno in _FULL_ERRNOS:
        return True
    return exc.errno in _DENIED_ERRNOS and str(exc.filename or "").startswith(str(parent))


def lock_file(target: Path) -> Path:
    """The lock file beside ``target`` that its writer holds."""
    return target.parent / f".{target.name}.hfsoup-lock"


def _is_real_dir(path: Path) -> bool:
    """Whether ``path`` is a folder itself, not a symlink to one."""
    return path.is_dir() and not path.is_symlink()


def _remove(path: Path, *, ignore_errors: bool = False) -> None:
    """Remove ``path``: a folder with what it holds; a symlink or file by its name only."""
    try:
        if _is_real_dir(path):
            shutil.rmtree(path, ignore_errors=ignore_errors)
        elif path.is_symlink() or path.exists():
            path.unlink()
    except OSError:
        if not ignore_errors:
            raise


def _lock(target: Path) -> BaseFileLock:
    """Hold an exclusive lock on ``.NAME.hfsoup-lock`` beside ``target`` (no waiting).

    ``filelock`` (flock on POSIX, msvcrt on Windows; imported here, so that importing hfsoup
    needs neither). filelock opens the file for writing and truncates it, so a symlink planted
    under that name is removed first (never written through) and anything there that is not a
    regular file is refused. The holder removes the file when done (:func:`_unlock`), so a lock
    won on a file that is gone, or was replaced meanwhile, guards nothing and counts as held.
    """
    from filelock import FileLock, Timeout

    path = lock_file(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            path.unlink()
        if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, "not a regular file", str(path))
    except OSError as exc:
        where = path if exc.errno in (errno.ELOOP, errno.EISDIR, errno.EEXIST) else target.parent
        raise OutputWriteError(f"cannot write to {where}: {exc.strerror}") from exc
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire(timeout=0)
    except Timeout as exc:
        raise OutputExistsError(f"another hfsoup process is writing {target}") from exc
    except OSError as exc:
        raise OutputWriteError(f"cannot write to {target.parent}: {exc.strerror}") from exc
    if not _holds(lock, path):
        lock.release()
        raise OutputExistsError(f"another hfsoup process is writing {target}")
    return lock


def _holds(lock: BaseFileLock, path: Path) -> bool:
    """Whether ``lock`` is held on the file now at ``path`` (not on one unlinked meanwhile)."""
    # filelock keeps the locked descriptor in its context (3.x and 4.x); without it, the
    # file's existence is what can be checked.
    fd = getattr(getattr(lock, "_context", None), "lock_file_fd", None)
    try:
        now = os.stat(path)
        return fd is None or os.path.samestat(now, os.fstat(fd))
    except OSError:
        return False


def _unlock(lock: BaseFileLock) -> None:
    """Remove the lock file, then release it: removed while still held, so that a process that
    opened it meanwhile sees it gone (:func:`_holds`). Windows cannot remove an open file: there
    it is removed after the release, when no other process has opened it since."""
    path = Path(lock.lock_file)
    try:
        path.unlink(missing_ok=True)
        removed = True
    except OSError:
        removed = False
    lock.release()
    if not removed:
        with suppress(OSError):
            path.unlink(missing_ok=True)


def _swap_into_place(tmp: Path, target: Path) -> None:
    old = target.parent / f".{target.name}.hfsoup-old"
    if target.exists():
        _remove(old)  # what a killed run left there; a link there is removed, not followed
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        if old.exists():  # put the previous output back rather than leave it hidden
            os.replace(old, target)
        raise
    _remove(old, ignore_errors=True)


def write_config(folder: Path, config: dict, dtype: torch.dtype | None) -> None:
    """Write the first ingredient's config.json, with its dtype updated when ``dtype`` is set."""
    config = dict(config)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def is_aux_file(path: str) -> bool:
    """Whether a repo path is a tokenizer / processor / generation file a soup copies from its
    first ingredient (:data:`AUX_FILES`, or a named chat template in :data:`TEMPLATES_DIR`)."""
    folder, _, name = path.rpartition("/")
    if not folder:
        return name in AUX_FILES
    return folder == TEMPLATES_DIR and name.endswith(".jinja") and not name.startswith(".")


def copy_aux_files(folder: Path, ingredient: Ingredient) -> list[str]:
    """Copy the tokenizer / processor / generation files of ``ingredient`` that exist
    (:func:`is_aux_file`), and a sentence-transformers model's top-level files.

    Each goes through the source's ``local_file``, so a local ingredient's file that is a
    symlink out of its folder is refused like its weights are.

    Raises:
        IngredientNotFoundError: a local file points outside its folder or is not a regular file.
    """
    copied = []
    for name in [*AUX_FILES, *sorted(f for f in ingredient.files if "/" in f)]:
        if name in ingredient.files and is_aux_file(name):
            (folder / name).parent.mkdir(exist_ok=True)
            shutil.copyfile(ingredient.source.local_file(name), folder / name)
            copied.append(name)
    return copied


__all__ = [
    "INDEX_NAME",
    "ShardWriter",
    "check_output_target",
    "copy_aux_files",
    "is_aux_file",
    "partial_dir",
    "shard_filename",
    "staged_output",
    "write_config",
]
