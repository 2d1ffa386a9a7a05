"""Which banks each gallery id belongs to, as arrays: what the bank rules of
:meth:`pipeline.gallery.query.GalleryIndex.decide` look up for every candidate."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.gallery.banks import Bank


class Memberships:
    """Which banks each gallery id belongs to, as arrays over the id-sorted entries (shared pages
    when the entries are a node cache's mapped table): ``of_id(gid)`` -> its enabled memberships
    ``(bank, category, action, fine threshold)``, none for a disabled reference."""

    def __init__(self, ids: np.ndarray, codes: np.ndarray, rules: list[tuple[str, str, str, float] | None],
                 disabled: Mapping[int, Any]) -> None:
        self.ids, self.codes, self.rules, self.disabled = ids, codes, rules, disabled
        thresholds = [r[3] for r in rules if r is not None]
        self.lowest = min(thresholds) if thresholds else np.inf

    @classmethod
    def of(cls, entries: pd.DataFrame | pa.Table, banks: Mapping[str, Bank], threshold: Callable[[str], float],
           disabled: Mapping[int, Any]) -> Memberships:
        """From the entries (a DataFrame, or a node cache's mapped Arrow table), the version's
        banks, the fine threshold in force for a bank, and the disabled references."""
        if isinstance(entries, pa.Table):
            ids = entries.column("id").to_numpy()
            bank = entries.column("bank").combine_chunks()
            if not pa.types.is_dictionary(bank.type):
                bank = bank.dictionary_encode()
            names = bank.dictionary.to_pylist()
            codes = bank.indices.to_numpy(zero_copy_only=False)
        else:
            ids = entries["id"].to_numpy(np.int64)
            cat = pd.Categorical(entries["bank"])
            names, codes = list(cat.categories), cat.codes
        if len(ids) > 1 and np.any(np.diff(ids) < 0):  # assembled in memory unsorted (tests, build)
            order = np.argsort(ids, kind="stable")
            ids, codes = ids[order], np.asarray(codes)[order]
        rules: list[tuple[str, str, str, float] | None] = []
        for name in names:
            b = banks[name]  # (image banks only: hash banks have no entries rows)
            rules.append((name, b.category, b.action, threshold(name)) if b.enabled else None)
        return cls(ids, codes, rules, disabled)

    def of_id(self, gid: int) -> list[tuple[str, str, str, float]]:
        if gid in self.disabled:
            return []
        lo, hi = np.searchsorted(self.ids, gid, "left"), np.searchsorted(self.ids, gid, "right")
        return [r for r in (self.rules[int(c)] for c in self.codes[lo:hi]) if r is not None]
