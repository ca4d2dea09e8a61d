"""Seeded orders that depend only on the items' text: a stable shuffle and a sample stratified
by category."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from refusal_dir.errors import DataError


def stable_order(keys: Sequence[str], *, seed: int) -> list[int]:
    """A permutation of ``range(len(keys))`` that depends only on the keys and the seed."""

    def digest(index: int) -> str:
        return hashlib.sha256(f"{seed}\0{keys[index]}".encode()).hexdigest()

    return sorted(range(len(keys)), key=digest)


def stratified_sample(
    keys: Sequence[str], categories: Sequence[str] | None, k: int, *, seed: int
) -> list[int]:
    """Indices of ``k`` of the items, a seeded sample stratified by category, in file order.

    ``keys`` are the items' texts, ``categories`` their categories (``None``: one category, a
    plain seeded sample). Each category gets its share of ``k``, rounded by largest remainder
    (ties to the category met first); within a category the items are taken in a seeded order
    that depends only on their text (:func:`stable_order`), so adding an item to a file does
    not reshuffle the others. ``k >= len(keys)`` keeps every item.
    """
    if categories is not None and len(categories) != len(keys):
        raise DataError(f"{len(keys)} items but {len(categories)} categories: give one each")
    if k < 1:
        raise DataError(f"a sample needs k >= 1 items, got {k}")
    if k >= len(keys):
        return list(range(len(keys)))
    strata: dict[str, list[int]] = {}
    for index, category in enumerate(categories if categories is not None else [""] * len(keys)):
        strata.setdefault(category, []).append(index)
    shares = {category: k * len(items) / len(keys) for category, items in strata.items()}
    counts = {category: int(share) for category, share in shares.items()}
    by_remainder = sorted(strata, key=lambda category: counts[category] - shares[category])
    for category in by_remainder[: k - sum(counts.values())]:
        counts[category] += 1
    chosen: list[int] = []
    for category, items in strata.items():
        order = stable_order([keys[index] for index in items], seed=seed)
        chosen += [items[position] for position in order[: counts[category]]]
    return sorted(chosen)
