"""Small numpy helpers shared by the signals' per-batch aggregation."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def split(inv: np.ndarray, values: np.ndarray, ngroups: int,
          mask: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(group, its values) for every group with at least one value (one sort)."""
    if mask is not None:
        inv, values = inv[mask], values[mask]
    if not len(inv):
        return
    order = np.argsort(inv, kind="stable")
    counts = np.bincount(inv, minlength=ngroups)
    ends = np.cumsum(counts)
    sorted_vals = values[order]
    for g in np.flatnonzero(counts).tolist():
        yield g, sorted_vals[ends[g] - counts[g]:ends[g]]


def group(*columns: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group rows by the values of several columns (each (n,) or (n, k)).

    Returns (first row of each group, group index per row, rows per group);
    groups come in no particular order.
    """
    n = len(columns[0])
    parts = [np.ascontiguousarray(c).view(np.uint8).reshape(n, -1) for c in columns]
    mat = np.ascontiguousarray(np.concatenate(parts, axis=1))
    _, first, inv, counts = np.unique(mat.view(np.dtype((np.void, mat.shape[1]))).ravel(),
                                      return_index=True, return_inverse=True,
                                      return_counts=True)
    return first, inv.reshape(-1), counts
