"""Hash lists inside a gallery version, and the query side of them.

A hash bank (``kind = "pdq"`` or ``"md5"``, :mod:`pipeline.gallery.banks`) holds a list, not images.
``gallery build`` reads its list file (:func:`pipeline.signals.lists.read_list`) and the version
keeps it the way it keeps shards: one ``list-<bank>.parquet`` per hash bank
(:data:`~pipeline.schemas.HASH_LIST_SCHEMA`: ``hash``, ``entry_id``, ``metadata``, in list order),
recorded in :attr:`Manifest.hash_lists <pipeline.gallery.manifest.Manifest.hash_lists>` with its
sha256 and checked on every load, with the exact duplicate lines ingestion dropped.

**The PDQ index is built once, when the version is written**, and stored beside a pdq bank's list
as ``list-<bank>.pdq-index.safetensors`` (:func:`index_bytes`: the codes and the multi-hash tables
of :class:`~pipeline.signals.index.PdqIndex`, 110-230 B/hash), listed in the manifest with its
sha256 (``HashListFile.index``). A process that opens the version maps that file
(:meth:`PdqIndex.mapped <pipeline.signals.index.PdqIndex.mapped>`, from a local gallery or a
node's cache; read into memory from S3) instead of rebuilding the index, and searches it flat up
to :data:`~pipeline.signals.index.FLAT_MAX` entries, multi-hash beyond. A version written before
the stored index existed has none: its index is built on load, as then.

:class:`HashBanks` is what a loaded version queries: one :class:`~pipeline.signals.index.PdqIndex`
or :class:`~pipeline.signals.index.Md5Index` per enabled hash bank.

Imports: ``manifest``, ``schemas`` and :mod:`pipeline.signals` only (``store`` and ``query`` use it).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.gallery.banks import Bank
from pipeline.schemas import HASH_LIST_SCHEMA
from pipeline.signals.index import Md5Index, PdqIndex
from pipeline.signals.lists import HashEntry, HashList


def list_file_name(bank: str) -> str:
    return f"list-{bank}.parquet"


def index_file_name(bank: str) -> str:
    return f"list-{bank}.pdq-index.safetensors"


def index_bytes(entries: Sequence[HashEntry]) -> bytes:
    """The stored PDQ index of a pdq list: codes and multi-hash tables, whatever the list's size
    (the reader picks flat or multi-hash by size; the tables cost ~1 s per million entries here)."""
    return PdqIndex.build(entries, "mih").to_bytes()


class StoredList(HashList):
    """A hash bank's list as a version holds it: the entries, the duplicates its ingestion dropped,
    and ``pdq_index``, the PDQ index stored beside it (None: an md5 list, or a version without one)."""

    def __init__(self, entries: Sequence[HashEntry] = (), duplicates: int = 0, pdq_index: PdqIndex | None = None) -> None:
        super().__init__(entries, duplicates, "stored")
        self.pdq_index = pdq_index


def list_bytes(entries: Sequence[HashEntry]) -> bytes:
    """A list as the Parquet bytes a version stores."""
    t = pa.Table.from_pydict({"hash": [e.hash for e in entries], "entry_id": [e.entry_id for e in entries],
                              "metadata": [e.metadata for e in entries]}, schema=HASH_LIST_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(t, buf)
    return buf.getvalue()


def entries_from_bytes(data: bytes) -> list[HashEntry]:
    t = pq.read_table(io.BytesIO(data)).to_pydict()
    return [HashEntry(h, i, m) for h, i, m in zip(t["hash"], t["entry_id"], t["metadata"])]


class IndexedEntries(Sequence[HashEntry]):
    """A pdq list's entries made on access, for a process that only queries the list: each hash is
    the hex of the stored index's codes (memory-mapped), the entry ids and metadata are two Arrow
    columns of the list file (nulls cost nothing in a signal file's list). A 10M-entry list as
    :class:`HashEntry` objects is ~330 bytes an entry of private memory and ~6 s a million to make
    (measured); here it is the ids and metadata the list has, and a hit builds one entry.
    Read-only; equal to any sequence of the same entries."""

    def __init__(self, data: bytes, pdq_index: PdqIndex, duplicates: int = 0) -> None:
        t = pq.read_table(io.BytesIO(data), columns=["entry_id", "metadata"])
        if t.num_rows != len(pdq_index):
            raise ValueError(f"the list holds {t.num_rows} entries, its stored index {len(pdq_index)}")
        # a column of nulls only (a signal file's list) is not kept at all
        self._ids, self._meta = (None if t.column(c).null_count == t.num_rows else t.column(c).combine_chunks()
                                 for c in ("entry_id", "metadata"))
        self._codes = pdq_index.arrays()["codes"]
        self.pdq_index, self.duplicates = pdq_index, int(duplicates)

    def __len__(self) -> int:
        return len(self._codes)

    @overload
    def __getitem__(self, i: int) -> HashEntry: ...
    @overload
    def __getitem__(self, i: slice) -> list[HashEntry]: ...

    def __getitem__(self, i: int | slice) -> HashEntry | list[HashEntry]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        j = range(len(self))[i]  # IndexError out of range; negative indexes from the end
        return HashEntry(self._codes[j].tobytes().hex(), self._ids[j].as_py() if self._ids is not None else None,
                         self._meta[j].as_py() if self._meta is not None else None)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other))


@dataclass(frozen=True)
class HashHit:
    """One list entry an upload's signal reached, in one hash bank."""

    bank: str
    category: str
    action: str
    signal: str               # pdq | md5
    distance: int             # Hamming distance (0 for md5)
    entry_idx: int            # position in the bank's list
    entry: HashEntry

    @property
    def entry_key(self) -> str:
        """``list_entry_id`` of the flag row: the list's own id, else the matched list hash."""
        return self.entry.entry_id if self.entry.entry_id is not None else self.entry.hash


@dataclass(frozen=True)
class HashQuery:
    """What the hash banks made of one upload: every hit, and the pdq banks whose quality floor
    the upload's PDQ quality was below (not matched against them)."""

    hits: tuple[HashHit, ...] = ()
    below_quality: tuple[str, ...] = ()


def _stored_index(entries: Sequence[HashEntry]) -> PdqIndex | None:
    index = getattr(entries, "pdq_index", None)
    return index if isinstance(index, PdqIndex) and len(index) == len(entries) else None


class HashBanks:
    """The enabled hash banks of a loaded version, each with its list and index: the index stored
    in the version where the list carries one (:class:`StoredList`), else built here."""

    def __init__(self, banks: Mapping[str, Bank], lists: Mapping[str, Sequence[HashEntry]]) -> None:
        self.banks = {n: b for n, b in banks.items() if b.is_hash and b.enabled and n in lists}
        self.lists = {n: lists[n] for n in self.banks}
        self.index: dict[str, Any] = {
            n: ((_stored_index(self.lists[n]) or PdqIndex.build(self.lists[n])) if b.kind == "pdq"
                else Md5Index.build(self.lists[n]))
            for n, b in self.banks.items()}

    def __len__(self) -> int:
        return len(self.banks)

    def query(self, md5s: Sequence[str | None], pdqs: Sequence[str | None],
              qualities: Sequence[int | None]) -> list[HashQuery]:
        """Per upload: MD5 exact against every md5 bank; PDQ within each pdq bank's
        ``pdq_max_distance``, skipped (and named in ``below_quality``) where the upload's quality
        is below the bank's ``pdq_min_quality``. ``None`` signals match nothing."""
        n = len(md5s)
        hits: list[list[HashHit]] = [[] for _ in range(n)]
        below: list[list[str]] = [[] for _ in range(n)]
        for name in sorted(self.banks):
            b = self.banks[name]
            if b.kind == "md5":
                res = self.index[name].query([m.lower() if m else None for m in md5s])
            else:
                keep = [p if p is not None and q is not None and q >= b.pdq_min_quality else None
                        for p, q in zip(pdqs, qualities)]
                for i, (p, k) in enumerate(zip(pdqs, keep)):
                    if p is not None and k is None:
                        below[i].append(name)
                res = self.index[name].query(keep, b.pdq_max_distance)
            for i, ms in enumerate(res):
                hits[i] += [HashHit(name, b.category, b.action, b.kind, m.distance, m.entry_idx,
                                    self.lists[name][m.entry_idx]) for m in ms]
        return [HashQuery(tuple(h), tuple(bq)) for h, bq in zip(hits, below)]
