"""Merge methods: each a value in the registry (:mod:`hfsoup.methods.registry`), run by the
pipeline. Importing this package registers the built-in ones."""

from hfsoup.methods.registry import MergeMethod, register

# Placeholders until each method's own module registers its run function.
register(MergeMethod("uniform", "the (weighted) average of every ingredient"))
register(MergeMethod("greedy", "keep an ingredient only if the held-out score does not drop",
                     needs_task=True))  # fmt: skip
register(MergeMethod("learned", "mixing weights learned on the held-out split", needs_task=True))

__all__ = ["MergeMethod", "register"]
