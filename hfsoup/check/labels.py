"""Label alignment: the same classes named in another order are permuted, never averaged blindly."""

from __future__ import annotations

from collections.abc import Mapping

from hfsoup.errors import IncompatibleIngredientsError


def label_permutation(
    reference_id2label: Mapping[int | str, str], other_id2label: Mapping[int | str, str]
) -> list[int] | None:
    """How to reorder another ingredient's classification head to match the reference's labels.

    Args:
        reference_id2label: ``id2label`` of the reference ingredient (keys may be ints or the
            strings of ``config.json``).
        other_id2label: ``id2label`` of the ingredient to align.

    Returns:
        ``None`` when both name the same labels in the same order; otherwise ``perm`` with
        ``perm[i]`` = the other's id of the reference's label ``i``, so that
        ``other_head_rows[perm]`` lists the other's rows in the reference's order.

    Raises:
        IncompatibleIngredientsError: The label names differ as sets, repeat, or the ids are
            not ``0..n-1``.

    Example:
        ```py
        >>> label_permutation({0: "neg", 1: "pos"}, {0: "pos", 1: "neg"})
        [1, 0]
        ```
    """
    reference = _ordered_names(reference_id2label, "reference")
    other = _ordered_names(other_id2label, "other")
    if set(reference) != set(other):
        only_ref = sorted(set(reference) - set(other))
        only_other = sorted(set(other) - set(reference))
        raise IncompatibleIngredientsError(
            f"ingredients name different labels: {only_ref} only in one, {only_other} only in "
            "the other; their classification heads cannot be averaged"
        )
    if reference == other:
        return None
    position = {name: i for i, name in enumerate(other)}
    return [position[name] for name in reference]


def _ordered_names(id2label: Mapping[int | str, str], which: str) -> list[str]:
    try:
        by_id = {int(key): str(name) for key, name in id2label.items()}
    except ValueError:
        raise IncompatibleIngredientsError(
            f"the {which} id2label has non-integer ids: {sorted(map(str, id2label))}"
        ) from None
    if sorted(by_id) != list(range(len(by_id))):
        raise IncompatibleIngredientsError(
            f"the {which} id2label ids are not 0..n-1: {sorted(by_id)}"
        )
    names = [by_id[i] for i in range(len(by_id))]
    if len(set(names)) != len(names):
        raise IncompatibleIngredientsError(f"the {which} id2label repeats a label: {names}")
    return names
