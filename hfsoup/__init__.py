"""hfsoup: model soups from the Hugging Face Hub.

Average several fine-tunes of one pretrained model, named by repo ID, streamed shard by shard;
score them; write and push the soup with a model card that records the recipe.

>>> import hfsoup
>>> hfsoup.inspect(["org/ft-1", "org/ft-2@v1"]).compatible      # doctest: +SKIP
>>> hfsoup.soup(["org/ft-1", "org/ft-2@v1"], output="out/soup")  # doctest: +SKIP
>>> hfsoup.push("out/soup", "me/my-soup")                        # doctest: +SKIP

The functions are imported lazily, so ``import hfsoup`` is cheap and sets up nothing.
"""

from __future__ import annotations

from typing import Any

from hfsoup._version import __version__

_API = ("Inspection", "SoupResult", "evaluate", "inspect", "push", "run", "soup")
__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        from hfsoup import api

        return getattr(api, name)
    raise AttributeError(f"module 'hfsoup' has no attribute {name!r}")
