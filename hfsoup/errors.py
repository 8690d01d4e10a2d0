"""The exceptions hfsoup raises for failures a user can cause.

Every class subclasses :class:`HfsoupError`; the CLI turns any of them into one line on
stderr and exit code 2.
"""

from __future__ import annotations

import os
import re


class HfsoupError(Exception):
    """Base class of every error a user can cause (bad input, missing repo, ...).

    Messages name options as the Python API and recipes spell them (``allow_local``,
    ``output.dir``), never as command-line flags: ``options`` lists the options a message is
    about, and the CLI adds their flags as a hint (:func:`hfsoup.cli.flag_hint`).

    Example:
        >>> raise RecipeError("no output folder: set output.dir", options=["output.dir"])
        Traceback (most recent call last):
        hfsoup.errors.RecipeError: no output folder: set output.dir
    """

    def __init__(self, *args: object, options: tuple[str, ...] | list[str] = ()) -> None:
        super().__init__(*args)
        self.options = tuple(options)


class IngredientSpecError(HfsoupError):
    """An ingredient string is malformed (not ``org/name[@rev]`` nor an existing directory)."""


class IngredientNotFoundError(HfsoupError):
    """The repository, revision or local directory of an ingredient does not exist."""


class AccessDeniedError(HfsoupError):
    """The repository is private or gated and no (valid) token was given."""


class HubConnectionError(HfsoupError):
    """The Hub could not be reached, or kept failing after the retries."""


class IncompatibleIngredientsError(HfsoupError):
    """Ingredients differ in tensor names, shapes, dtypes, architecture or labels."""


class UnsafeWeightsError(HfsoupError):
    """Weights are only available as pickle files and ``allow_pickle`` was not given."""


class CorruptWeightsError(HfsoupError):
    """A safetensors header or payload is malformed, or bytes fail their checksum."""


class NonFiniteWeightsError(HfsoupError):
    """An ingredient's weights hold NaN or Inf and ``allow_nonfinite`` was not given."""


class NothingToResumeError(HfsoupError):
    """``resume`` was asked for, but no interrupted run of the same recipe was found."""


class RecipeError(HfsoupError):
    """A recipe file or the equivalent options are invalid."""


class OutputExistsError(HfsoupError):
    """The output folder exists and is not empty (and ``overwrite`` was not given)."""


class OutputWriteError(HfsoupError):
    """Writing the output failed (disk full, permissions); nothing was left behind."""


class PushError(HfsoupError):
    """Uploading the soup to the Hub failed; the local output is intact."""


class TaskError(HfsoupError):
    """A task (dataset, split, columns, metric) cannot be used as asked."""


class InsufficientMemoryError(HfsoupError):
    """A learned soup fits in the memory available on neither of its execution paths."""


class MissingDependencyError(HfsoupError):
    """An optional package a feature needs is not installed (the message names the extra)."""


class HubServeError(HfsoupError):
    """The local Hub cannot serve as asked: a bad token or tokens file, an address it cannot bind."""


# ``scheme://user:password@host``: everything between ``//`` and ``@`` before the host's path.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
# Hugging Face access tokens (``hf_`` and 30-odd letters and digits).
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
_TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def scrub(text: str) -> str:
    """``text`` with credentials masked: URL userinfo, ``hf_...`` tokens, the ``HF_TOKEN`` value.

    The last line of defence before a message or traceback is printed; messages should not
    hold secrets in the first place.

    Example:
        >>> scrub("cannot reach http://me:s3cret@hub.local:8080/api")
        'cannot reach http://***@hub.local:8080/api'
    """
    text = _URL_USERINFO.sub(r"\g<scheme>***@", text)
    text = _HF_TOKEN.sub("hf_***", text)
    for name in _TOKEN_VARIABLES:
        value = os.environ.get(name, "").strip()
        if len(value) >= 8:  # a short value would mask ordinary words
            text = text.replace(value, "***")
    return text


class UnsupportedLayoutError(IncompatibleIngredientsError):
    """An ingredient is laid out in a way hfsoup cannot soup yet (a PEFT adapter repo, an older
    sentence-transformers layout), as opposed to two ingredients that differ."""


class HubResponseError(HubConnectionError):
    """The server at ``HF_ENDPOINT`` answered something no working Hub sends: a repo listing
    that is not JSON or not an object, no commit SHA, unsafe or repeated file names, sizes or
    digests of the wrong form, a redirect loop, a body of another length than it announced."""


class TokenizerMismatchError(IncompatibleIngredientsError):
    """The ingredients' tokenizers give some tokens different ids (a soup averages embedding rows
    by id); the message names the first differing tokens and how many."""
