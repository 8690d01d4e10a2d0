"""Merge methods: each a value in the registry (:mod:`hfsoup.registry`), run by the
pipeline (:mod:`hfsoup.pipeline`). Importing this package registers the built-in ones; a new
method is one module that calls ``register`` and one import line here (in the order that
``--help``, the recipe and the Space list them).
"""

# isort: off
from hfsoup.methods import uniform  # noqa: F401
from hfsoup.methods import greedy_soup  # noqa: F401
from hfsoup.methods import learned_soup  # noqa: F401
from hfsoup.methods import task_vectors  # noqa: F401
# isort: on

from hfsoup.registry import MergeMethod, get_method, method_names, register, unregister

__all__ = ["MergeMethod", "get_method", "method_names", "register", "unregister"]
