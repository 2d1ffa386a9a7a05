"""The hash-list part of ``modscan lookup``: an upload's own PDQ / MD5, every hash-bank entry they
reach (signal, distance against the bank's limit, the list entry and its metadata), the pdq banks
its PDQ quality is below the floor of, and the decision across signals
(:meth:`~pipeline.gallery.query.GalleryIndex.decide_signals`, the job's own rule)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline.gallery import GalleryIndex


@dataclass(frozen=True)
class HashHitView:
    bank: str
    signal: str                      # pdq | md5
    action: str
    distance: int
    max_distance: int | None         # the bank's pdq_max_distance (None for md5: exact)
    list_entry_id: str
    list_metadata: dict[str, Any] | None


@dataclass(frozen=True)
class HashSignals:
    md5: str | None
    pdq_hash: str | None
    pdq_quality: int | None
    below_quality: tuple[str, ...]   # pdq banks whose pdq_min_quality the upload's quality is below
    hits: tuple[HashHitView, ...]
    signal: str | None               # what decided, across signals (None: nothing matched)
    status: str | None
    bank: str | None


def hash_signals(gal: GalleryIndex, md5: str | None, pdq: str | None, quality: int | None, base: Any) -> HashSignals | None:
    """The hash part of one decoded upload's explanation; None for a gallery without hash banks."""
    if not len(gal.hash_banks):
        return None
    q = gal.query_hashes([md5], [pdq], [quality if pdq is not None else None])[0]
    hits = tuple(HashHitView(h.bank, h.signal, h.action, h.distance,
                             gal.banks[h.bank].pdq_max_distance if h.signal == "pdq" else None, h.entry_key,
                             json.loads(h.entry.metadata) if h.entry.metadata else None) for h in q.hits)
    m = gal.decide_signals(base, q)
    return HashSignals(md5, pdq, quality if pdq is not None else None, q.below_quality, hits,
                       m.signal if m is not None else None, m.status if m is not None else None,
                       m.bank if m is not None else None)


def render_lines(h: HashSignals | None) -> list[str]:
    if h is None:
        return []
    out = [f"  hash signals: pdq {h.pdq_hash or '-'} (quality {h.pdq_quality if h.pdq_quality is not None else '-'}), "
           f"md5 {h.md5 or '-'}"]
    if h.below_quality:
        out.append(f"    pdq quality below the floor of: {', '.join(h.below_quality)} (not matched against them)")
    for x in h.hits:
        lim = f"<= {x.max_distance}" if x.max_distance is not None else "exact"
        out.append(f"    {x.signal} match in {x.bank} ({x.action}): distance {x.distance} {lim}, entry {x.list_entry_id}"
                   + (f", metadata {json.dumps(x.list_metadata)}" if x.list_metadata else ""))
    out.append(f"    decided across signals: {h.status or 'not searched'} by {h.signal or 'nothing'}"
               + (f" (bank {h.bank})" if h.bank else ""))
    return out
