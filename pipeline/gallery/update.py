"""Gallery updates: build a version from bank sources, add or remove images, describe a gallery.

Every update writes one new immutable version (:func:`pipeline.gallery.store.write_audited`) with
its audit record. A version derived from another (add, remove; review apply in
:mod:`pipeline.ops.review_decisions`) reuses the stored vectors and keeps the gallery's own model id and
thresholds (:func:`pipeline.gallery.store.write_derived`); only ``build`` takes them from a model card.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from models.card import ModelCard
from models.preprocess import IMAGE_SUFFIXES
from pipeline.gallery import audit as A
from pipeline.gallery.banks import Bank
from pipeline.gallery.calibration import Budgets, initial
from pipeline.gallery.index import CoarseIndexSpec
from pipeline.gallery.manifest import Manifest, Rejected, VersionModel
from pipeline.gallery.store import (
    GalleryContent,
    current_version,
    list_versions,
    now_utc,
    read_content,
    read_manifest,
    write_audited,
    write_derived,
)
from pipeline.gallery.verify import VerifyParams
from pipeline.ingest.storage import Store, open_store
from pipeline.schemas import ENTRY_SCHEMA
from pipeline.signals.lists import HashEntry, read_list

# extract(uris) -> one dict per uri: {"uri", "sha256", "ok", "error_code", "error_message",
#                                     "coarse": (128,) or None, "rerank": (512,) or None,
#                                     optional "pdq_hash", "pdq_quality", "md5": the reference's signals,
#                                     optional "keypoints": its packed ORB keypoints (pipeline.gallery.verify)}
Extractor = Callable[[list[str]], list[dict[str, Any]]]


class Update(NamedTuple):
    """A published update: the new version and what it did (counts per bank, or of the change)."""

    version: str
    stats: dict[str, Any]


def list_source(source: str) -> list[str]:
    """Image URIs under a bank source (folder or S3 prefix), sorted."""
    st = open_store(source)
    return [st.full_uri(k) for k in st.list() if k.lower().endswith(IMAGE_SUFFIXES)]


def add_images(content: GalleryContent, bank: Bank, uris: list[str], extract: Extractor) -> dict[str, int]:
    """Extract ``uris`` and add them to ``bank`` in ``content``; dedupes by sha256."""
    stats = {"added": 0, "already_present": 0, "new_membership": 0, "rejected": 0}
    if not uris:
        return stats
    by_sha = {}
    if len(content.entries):
        by_sha = dict(zip(content.entries["sha256"], content.entries["id"]))
    members = set(zip(content.entries["id"], content.entries["bank"])) if len(content.entries) else set()
    next_id = int(content.ids.max()) + 1 if len(content.ids) else 0
    new_ids, new_c, new_r, new_rows = [], [], [], []
    now = now_utc()
    for r in extract(uris):
        if not r["ok"]:
            content.rejected.append(Rejected(bank.name, r["uri"], r["error_code"], r["error_message"]))
            stats["rejected"] += 1
            continue
        sha = r["sha256"]
        if sha in by_sha:
            gid = int(by_sha[sha])
            if (gid, bank.name) in members:
                stats["already_present"] += 1
                continue
            stats["new_membership"] += 1
        else:
            gid = next_id
            next_id += 1
            by_sha[sha] = gid
            new_ids.append(gid)
            new_c.append(r["coarse"])
            new_r.append(r["rerank"])
            if content.keypoints is not None:  # a version that verifies keeps every reference's keypoints
                content.keypoints[gid] = bytes(r.get("keypoints") or b"")
            stats["added"] += 1
        members.add((gid, bank.name))
        new_rows.append({"id": gid, "bank": bank.name, "category": bank.category, "action": bank.action,
                         "source_uri": r["uri"], "sha256": sha, "added_at": now, "pdq_hash": r.get("pdq_hash"),
                         "pdq_quality": r.get("pdq_quality") if r.get("pdq_hash") else None, "md5": r.get("md5")})
    if new_ids:
        content.ids = np.concatenate([content.ids, np.asarray(new_ids, np.int64)])
        content.coarse = np.concatenate([content.coarse, np.vstack(new_c).astype(np.float32)])
        content.rerank = np.concatenate([content.rerank, np.vstack(new_r).astype(np.float32)])
    if new_rows:
        add = pd.DataFrame(new_rows)
        content.entries = pd.concat([content.entries, add], ignore_index=True) if len(content.entries) else add
    return stats


def _empty_content(coarse_dim: int, rerank_dim: int) -> GalleryContent:
    return GalleryContent(np.zeros(0, np.int64), np.zeros((0, coarse_dim), np.float32),
                          np.zeros((0, rerank_dim), np.float32),
                          pd.DataFrame({f.name: pd.Series(dtype=object) for f in ENTRY_SCHEMA}), {})


def build(store: Store, banks: list[Bank], card: ModelCard, extract: Extractor, n_shards: int = 4,
          rerank_dtype: str = "float16", coarse_spec: str | CoarseIndexSpec = "Flat", *, who: str | None = None,
          note: str | None = None, budgets: Budgets = Budgets()) -> Update:
    """Extract every enabled bank and publish a new version, recording the card's model and
    thresholds, calibrated for the version's size from the card's tails within ``budgets``
    (:mod:`pipeline.gallery.calibration`; every later version of the gallery is calibrated for
    its own size the same way). Returns (version, per-bank stats)."""
    model = VersionModel.from_card(card)
    model = model.with_thresholds(calibration=initial(card.thresholds, card.scale_tails, budgets))
    content = _empty_content(model.coarse_dim, model.rerank_dim)
    content.keypoints, content.verify_params = {}, VerifyParams()
    stats: dict[str, Any] = {}
    for b in banks:
        content.banks[b.name] = b
        if not b.enabled:
            stats[b.name] = {"skipped": "disabled"}
        elif b.is_hash:
            content.lists[b.name] = read_list(b.source, b.kind)
            stats[b.name] = {"list_entries": len(content.lists[b.name]),
                             "duplicates_dropped": getattr(content.lists[b.name], "duplicates", 0)}
        else:
            stats[b.name] = add_images(content, b, list_source(b.source), extract)
    parent = current_version(store)
    version = write_audited(store, content, model, n_shards, rerank_dtype, parent, coarse_spec, "build",
                            who, note, details={"banks": stats})
    return Update(version, stats)


def add(store: Store, bank_name: str, uris: list[str], card: ModelCard, extract: Extractor,
        new_bank: Bank | None = None, *, who: str | None = None, note: str | None = None
        ) -> Update:
    """New version = current + ``uris`` in ``bank_name``; existing vectors are reused, not re-extracted.
    ``card`` is the model ``extract`` runs (it must be the gallery's); the gallery keeps its thresholds."""
    m, content = read_content(store)
    m.check_model(card.version_id)
    if bank_name not in content.banks:
        if new_bank is None:
            raise KeyError(f"bank {bank_name!r} is not in gallery {m.version}; pass --banks to declare it")
        content.banks[bank_name] = new_bank
    stats = add_images(content, content.banks[bank_name], uris, extract)
    version = write_derived(store, m, content, "add", who, note=note, details={"bank": bank_name, **stats})
    return Update(version, stats)


def remove(store: Store, card: ModelCard | None = None, bank: str | None = None, ids: Iterable[int] = (),
           shas: Iterable[str] = (), *, who: str | None = None, note: str | None = None,
           hashes: Iterable[str] = (), entry_ids: Iterable[str] = ()) -> Update:
    """New version without the given memberships. An image left in no bank loses its vectors.
    Removing extracts nothing, so ``card`` is optional: given, a gallery of another model is refused.
    ``hashes`` / ``entry_ids`` remove entries of a hash bank's list (``bank`` names it)."""
    m, content = read_content(store)
    if card is not None:
        m.check_model(card.version_id)
    hashes, entry_ids = {h.lower() for h in hashes}, set(entry_ids)
    if hashes or entry_ids:
        return _remove_list_entries(store, m, content, bank, hashes, entry_ids, who, note)
    e = content.entries
    ids, shas = set(int(i) for i in ids), set(shas)
    sel = pd.Series(True, index=e.index)
    if ids or shas:
        sel &= e["id"].isin(ids) | e["sha256"].isin(shas)
    elif bank is None:
        raise ValueError("remove needs --bank, --ids or --sha256")
    if bank is not None:
        if bank not in content.banks:
            raise KeyError(f"bank {bank!r} is not in gallery {m.version}")
        sel &= e["bank"] == bank
    removed = int(sel.sum())
    content.entries = e[~sel].reset_index(drop=True)
    keep = np.isin(content.ids, content.entries["id"].to_numpy(np.int64))
    dropped = int((~keep).sum())
    content.ids, content.coarse, content.rerank = content.ids[keep], content.coarse[keep], content.rerank[keep]
    if content.keypoints is not None:
        live = set(content.ids.tolist())
        content.keypoints = {g: b for g, b in content.keypoints.items() if g in live}
    if bank is not None and not ids and not shas:
        content.banks.pop(bank)
        content.lists.pop(bank, None)
    stats = {"memberships_removed": removed, "images_dropped": dropped}
    version = write_derived(store, m, content, "remove", who, note=note,
                            details={"bank": bank, "ids": sorted(ids), "sha256": sorted(shas), **stats})
    return Update(version, stats)


def _hash_bank(content: GalleryContent, m: Manifest, bank: str | None) -> Bank:
    if bank is None or bank not in content.banks:
        raise KeyError(f"bank {bank!r} is not in gallery {m.version}")
    b = content.banks[bank]
    if not b.is_hash:
        raise ValueError(f"bank {bank!r} is an image bank: list entries (hash, entry id) belong to pdq/md5 banks")
    return b


def _remove_list_entries(store: Store, m: Manifest, content: GalleryContent, bank: str | None, hashes: set[str],
                         entry_ids: set[str], who: str | None, note: str | None) -> Update:
    """New version without the list entries of hash bank ``bank`` with those hashes or entry ids."""
    _hash_bank(content, m, bank)
    assert bank is not None  # _hash_bank raised otherwise
    old = content.lists.get(bank, [])
    content.lists[bank] = [e for e in old if e.hash not in hashes and e.entry_id not in entry_ids]
    stats = {"list_entries_removed": len(old) - len(content.lists[bank]), "list_entries": len(content.lists[bank])}
    version = write_derived(store, m, content, "remove", who, note=note,
                            details={"bank": bank, "hashes": sorted(hashes), "entry_ids": sorted(entry_ids), **stats})
    return Update(version, stats)


def replace_list(store: Store, bank_name: str, list_uri: str, new_bank: Bank | None = None, *,
                 who: str | None = None, note: str | None = None) -> Update:
    """New version = current with hash bank ``bank_name``'s list replaced by the (newer) list file
    ``list_uri`` (read and validated whole first). Stats: entries added, removed and kept, by hash."""
    m, content = read_content(store)
    if bank_name not in content.banks:
        if new_bank is None:
            raise KeyError(f"bank {bank_name!r} is not in gallery {m.version}; pass --banks to declare it")
        content.banks[bank_name] = new_bank
    b = _hash_bank(content, m, bank_name)
    entries = read_list(list_uri, b.kind)
    before, after = {e.hash for e in content.lists.get(bank_name, [])}, {e.hash for e in entries}
    content.banks[bank_name] = Bank(**{**b.__dict__, "source": list_uri})
    content.lists[bank_name] = entries
    stats = {"added": len(after - before), "removed": len(before - after), "kept": len(after & before),
             "list_entries": len(entries), "duplicates_dropped": entries.duplicates}
    version = write_derived(store, m, content, "add", who, note=note, details={"bank": bank_name, **stats})
    return Update(version, stats)


def export_hashes(store: Store, bank: str, kind: str = "pdq") -> list[HashEntry]:
    """The ``kind`` (pdq | md5) hashes of image bank ``bank``'s references, one per reference with
    one (in id order; entry id = gallery reference id), for :func:`~pipeline.signals.lists.write_list`."""
    m, content = read_content(store)
    if bank not in content.banks or content.banks[bank].is_hash:
        raise KeyError(f"{bank!r} is not an image bank of gallery {m.version}")
    col = "pdq_hash" if kind == "pdq" else "md5"
    e = content.entries
    if col not in e.columns:
        e = e.assign(**{col: None})
    rows = e[(e["bank"] == bank) & e[col].map(lambda x: isinstance(x, str))].sort_values("id")
    return [HashEntry(h, str(int(i))) for h, i in zip(rows[col], rows["id"])]


def info(store: Store) -> dict[str, Any]:
    """Versions, counts per bank, model id and size of the current version."""
    m = read_manifest(store)
    vstore = store.child(f"versions/{m.version}")
    size = sum(store.fs.get_file_info(vstore.path(k)).size for k in vstore.list())
    return {"root": store.uri, "current": m.version, "versions": list_versions(store), "model_id": m.model.model_id,
            "created_at": m.created_at, "counts": m.counts.to_dict(),
            "banks": {n: {"kind": b.bank.kind, "category": b.bank.category, "action": b.bank.action, "count": b.count,
                          "enabled": b.bank.enabled, "fine_threshold": b.bank.fine_threshold,
                          **({"pdq_max_distance": b.bank.pdq_max_distance, "pdq_min_quality": b.bank.pdq_min_quality}
                             if b.bank.kind == "pdq" else {})}
                      for n, b in m.banks.items()},
            "hash_lists": {h.bank: {"kind": h.kind, "entries": h.count, "source": h.source, "duplicates_dropped": h.duplicates,
                                    "stored_index": h.index} for h in m.hash_lists},
            "shards": len(m.shards), "rerank_dtype": m.rerank_dtype,
            "thresholds": {k: v for k, v in m.model.thresholds().items() if k != "calibration"},
            "per_unrelated_upload": _expected(m), "verification": _verification(store, m),
            "bytes": int(size), "rejected": len(m.rejected),
            **_review_state(store, m)}


def _expected(m: Manifest) -> dict[str, Any] | None:
    """What the version's thresholds are expected to give per unrelated upload (its size
    calibration), and the share of the model's measured edited copies they flag; None for a
    version whose model card had no scale tails (thresholds not sized)."""
    cal = m.model.calibration
    if not cal or "expected" not in cal:
        return None
    e = cal["expected"]
    return {"references": cal.get("references"), "survivors": e["survivors"], "verified": e["verified"],
            "false_flags": e["false_flags"], "copy_recall": e.get("copy_recall"), "budgets": cal.get("budgets"),
            "floor": cal.get("base"), "tails_source": cal["tails"].get("source")}


def _verification(store: Store, m: Manifest) -> dict[str, Any] | None:
    """The version's keypoints: count, bytes per reference, and the parameters (None: no verification)."""
    k = m.keypoints
    if k is None:
        return None
    vstore = store.child(f"versions/{m.version}")
    size = store.fs.get_file_info(vstore.path(k.file)).size
    return {"references": k.entries, "keypoints": k.keypoints, "bytes": int(size),
            "bytes_per_reference": round(size / max(k.entries, 1), 1), "params": k.params.to_dict()}


def _review_state(store: Store, m: Manifest, recent: int = 20) -> dict[str, Any]:
    """Disabled references of ``m`` (in force or expired) and the tail of the audit log."""
    in_force = m.disabled_in_force()
    disabled = [{**d.to_dict(), "in_force": d.id in in_force} for d in m.disabled_references]
    records = A.read_log(store)
    return {"disabled_references": disabled,
            "audit": {"records": len(records), "chain_problems": A.verify_log(store),
                      "recent": A.flat_entries(records)[-recent:]}}

