"""``modscan bench scale``: precision at 10K-10M references, measured on real pictures.

Pictures come from ``--trained DIR`` (photos the model was trained on), ``--unseen DIR`` (photos
it never saw) and ``--generated N`` (generated everyday pictures). Each is a reference and two
queries (itself and an edited copy, written under ``WORKDIR/scale-queries/`` so that the verifier
reads real files). The numbers: :mod:`pipeline.evaluation.scale`. ``--write-card`` stores the
tails and the verifier's pass rate in the model card (``scale_tails``), where ``gallery build``
reads them to calibrate each version's thresholds for its size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.bench.common import cached_pooled_statistics, machine, photo_paths, table

if TYPE_CHECKING:  # the modules below load torch and faiss: `modscan --help` imports this file
    from pipeline.evaluation import scale as S

VERIFY_TOP = 1500  # highest-scoring unrelated pairs the verifier is measured on


def _pictures(trained: list[Path], unseen: list[Path], generated: int, work: Path) -> list[tuple[str, str, Path]]:
    """(name, group, file) of every picture; generated ones are written under ``work``."""
    from models.synthetic import generate

    out = [(f"trained/{p.parent.name}/{p.stem}", "trained", p) for p in photo_paths(trained, 10**9)]
    out += [(f"unseen/{p.parent.name}/{p.stem}", "unseen", p) for p in photo_paths(unseen, 10**9)]
    gdir = work / "scale-generated"
    gdir.mkdir(parents=True, exist_ok=True)
    for i in range(generated):
        kind, im = generate("bench-scale", i)
        p = gdir / f"{i:05d}-{kind}.png"
        if not p.exists():
            im.save(p)
        out.append((f"generated/{p.stem}", "generated", p))
    return out


def _edited(pics: list[tuple[str, str, Path]], work: Path, seed: int) -> list[Path]:
    """One edited copy of each picture (1-3 edits of the named suite), as JPEG files."""
    from PIL import Image

    from models.augment import apply_named, random_edit_names

    qdir = work / "scale-queries"
    qdir.mkdir(parents=True, exist_ok=True)
    out = []
    for _n, _g, p in pics:  # named by source and seed: a rerun with other pictures never reads a stale copy
        key = hashlib.sha256(f"{seed}:{p.resolve()}".encode()).hexdigest()[:20]
        q = qdir / f"{key}.jpg"
        if not q.exists():
            rng = random.Random(f"{seed}:{p.name}")
            with Image.open(p) as im:
                apply_named(im.convert("RGB"), random_edit_names(rng), rng).save(q, quality=90)
        out.append(q)
    return out


def _families(files: list[Path]) -> np.ndarray:
    """Near-duplicate families of the originals: union of pairs within PDQ distance FAMILY_PDQ."""
    import pdqhash
    from PIL import Image

    from pipeline.evaluation import scale as S

    H = []
    for p in files:
        with Image.open(p) as im:
            H.append(np.asarray(pdqhash.compute(np.ascontiguousarray(np.asarray(im.convert("RGB"))))[0], bool))
    Hb = np.packbits(np.stack(H), axis=1)
    parent = list(range(len(files)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(files)):
        d = np.unpackbits(Hb[i] ^ Hb[i + 1:], axis=1).sum(axis=1)
        for j in np.nonzero(d <= S.FAMILY_PDQ)[0]:
            parent[find(i)] = find(i + 1 + int(j))
    roots = [find(i) for i in range(len(files))]
    _, fam = np.unique(roots, return_inverse=True)
    return fam.astype(np.int64)


def _features(pics: list[tuple[str, str, Path]], edited: list[Path], fx: Any) -> S.ScaleSet:
    from pipeline.evaluation import scale as S
    from pipeline.ingest.decode import DecodeConfig, Decoder

    dec = Decoder(DecodeConfig.for_model(fx.config))
    files = [p for _n, _g, p in pics]
    g128, g512, q128, q512 = [], [], [], []
    for i in range(0, len(files), 128):
        o = dec.decode_all([f.read_bytes() for f in files[i:i + 128]])
        e = dec.decode_all([f.read_bytes() for f in edited[i:i + 128]])
        c, r = fx.gallery(o["high"])
        g128.append(c)
        g512.append(r)
        q128 += [fx.query_coarse(o["low"]), fx.query_coarse(e["low"])]
        q512 += [fx.fine_features(o["high"]), fx.fine_features(e["high"])]
    n = len(files)
    blocks = [(i, min(i + 128, n)) for i in range(0, n, 128)]
    q_src = np.concatenate([np.arange(a, b) for (a, b) in blocks for _ in (0, 1)])
    q_edited = np.concatenate([np.full(b - a, bool(k)) for (a, b) in blocks for k in (0, 1)])
    Q512 = np.concatenate(q512)
    offset = np.zeros(len(Q512), np.float32)  # set by _offsets
    return S.ScaleSet([nm for nm, _g, _p in pics], np.asarray([g for _n, g, _p in pics]), _families(files),
                      np.concatenate(g128), np.concatenate(g512), np.concatenate(q128), Q512, offset, q_src, q_edited)


def _cached_features(pics: list[tuple[str, str, Path]], edited: list[Path], fx: Any, work: Path, seed: int) -> S.ScaleSet:
    """:func:`_features`, kept in ``WORKDIR/scale-features-<key>.npz`` for reruns with the same
    model, pictures and seed (the model passes are most of the bench's time)."""
    import dataclasses

    from pipeline.evaluation import scale as S

    key = hashlib.sha256(json.dumps([fx.version_id, seed, [str(p) for _n, _g, p in pics]]).encode()).hexdigest()[:16]
    path = work / f"scale-features-{key}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=False)
        return S.ScaleSet(**{f.name: (z[f.name].tolist() if f.name == "names" else z[f.name])
                             for f in dataclasses.fields(S.ScaleSet)})
    ss = _features(pics, edited, fx)
    arrays: dict[str, Any] = {f.name: np.asarray(getattr(ss, f.name)) for f in dataclasses.fields(S.ScaleSet)}
    np.savez(path, **arrays)
    return ss


def _offsets(ss: S.ScaleSet, fx: Any, self_cos: float = 0.95) -> np.ndarray:
    """Each query's score-normalisation offset, as the job computes it, except that a photo's own
    entry in the background bank is left out: the bank holds 600 of the training photos, and an
    upload is never a background picture (its own entry would take its top-1 background cosine
    to ~1 and push every score of it down). Generated pictures keep the whole bank: similar
    graphics in the bank are what normalisation is for."""
    from pipeline.gallery.index import ScoreNorm

    norm = ScoreNorm.from_dict(fx.card.thresholds.get("norm"))
    if not norm.beta or fx.background is None:
        return np.zeros(len(ss.q_src), np.float32)
    bank = fx.background.f512
    own = (ss.g512 @ bank.T >= self_cos) & (ss.groups != "generated")[:, None]  # (P, bank): a photo's own entries
    out = np.empty(len(ss.q_src), np.float32)
    for i in range(0, len(ss.q_src), 1024):
        rows = np.arange(i, min(i + 1024, len(ss.q_src)))
        Sb = np.where(own[ss.q_src[rows]], -np.inf, ss.q512[rows] @ bank.T)
        k = max(1, min(norm.k, Sb.shape[1]))
        out[rows] = norm.beta * (-np.partition(-Sb, k - 1, axis=1)[:, :k]).mean(axis=1)
    return out


class _Verifier:
    """Inliers of (query row, picture) pairs, with every picture's keypoints found once."""

    def __init__(self, files: list[Path], edited: list[Path], ss: S.ScaleSet) -> None:
        from pipeline.gallery.verify import VerifyParams

        self.files, self.edited, self.ss, self.p = files, edited, ss, VerifyParams()
        self._ref: dict[int, Any] = {}
        self.seconds, self.pairs = 0.0, 0

    def inliers(self, q: int, pic: int) -> int:
        from pipeline.gallery.verify import count_inliers, grey_from_bytes, query_keypoints, reference_keypoints

        t = time.perf_counter()
        if pic not in self._ref:
            self._ref[pic] = reference_keypoints(self.files[pic].read_bytes(), self.p)
        src = int(self.ss.q_src[q])
        f = self.edited[src] if self.ss.q_edited[q] else self.files[src]
        g = grey_from_bytes(f.read_bytes(), self.p.side)
        n = 0 if g is None else count_inliers(query_keypoints(g, self.p), self._ref[pic], self.p)
        self.seconds += time.perf_counter() - t
        self.pairs += 1
        return n

    def ref_count(self, pic: int) -> int:
        from pipeline.gallery.verify import reference_keypoints

        if pic not in self._ref:
            self._ref[pic] = reference_keypoints(self.files[pic].read_bytes(), self.p)
        return len(self._ref[pic])


def _synthetic_check(card_thr: dict[str, float], real: dict[str, Any], photos: list[Path], work: Path) -> list[dict[str, Any]]:
    """The per-pair tails of ``bench search``'s vectors (resampled from ``photos``) at both
    thresholds, against the real photos' (``real``: the ``photos`` group's curves): unrelated
    queries (held-out photos, displaced by real edits) against a gallery."""
    from jobs.bench.common import VectorFactory
    from pipeline.gallery.index import ScoreNorm, background_term

    st = cached_pooled_statistics(photos, work)
    vf = VectorFactory(st)
    P, g128, g512 = vf.gallery(5000)
    q128, q512, _ = vf.queries(P, 0, 2000)
    norm = ScoreNorm.from_dict(st["card"].thresholds.get("norm"))
    from models.card import load_background

    bank = load_background(None, st["card"])
    off = norm.beta * background_term(q512, bank.f512 if bank is not None else None, norm.k)
    S128, F = q128 @ g128.T, q512 @ g512.T - off[:, None]
    rows = []
    for name, Sx, t in (("coarse", S128, card_thr["coarse"]), ("fine", F, card_thr["fine"])):
        syn = float((Sx >= t).mean())
        rl = real[name].rate(t)
        rows.append({"score": name, "threshold": t, "synthetic per pair": syn, "real per pair": rl,
                     "ratio": syn / rl if rl > 0 else float("inf"), "within 2x": bool(0.5 <= syn / max(rl, 1e-12) <= 2)})
    return rows


def bench_scale(trained: list[Path], unseen: list[Path], generated: int, work: Path, seed: int = 0,
                write_card: bool = False) -> dict[str, Any]:
    from pipeline.features import FeatureExtractor

    t0 = time.time()
    fx = FeatureExtractor()
    pics = _pictures(trained, unseen, generated, work)
    edited = _edited(pics, work, seed)
    ss = _cached_features(pics, edited, fx, work, seed)
    ss.offset = _offsets(ss, fx)
    files = [p for _n, _g, p in pics]
    print(f"{machine()}\n{len(pics)} pictures ({', '.join(f'{g} {int((ss.groups == g).sum())}' for g in sorted(set(ss.groups)))}), "
          f"{len(ss.q_src)} queries, {len(set(ss.family.tolist()))} families; features in {time.time() - t0:.0f}s", flush=True)
    res = _measure(ss, fx, _Verifier(files, edited, ss), trained + unseen, work)
    res.update({"machine": machine(), "model": fx.version_id, "seconds": round(time.time() - t0, 1)})
    _print(res)
    (work / "scale.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    if write_card:
        _write_card(res)
    return res


def _measure(ss: S.ScaleSet, fx: Any, ver: _Verifier, photos: list[Path], work: Path) -> dict[str, Any]:
    from pipeline.evaluation import scale as S
    from pipeline.gallery.calibration import ScoreTails

    thr = {k: float(fx.card.thresholds[k]) for k in ("coarse", "fine")}
    by_group = S.tails_by_group(ss)
    top = S.top_unrelated(ss, VERIFY_TOP)
    top_in = np.asarray([ver.inliers(q, p) for q, p, _s in top])
    passes = [{"query": ss.names[int(ss.q_src[q])], "edited": bool(ss.q_edited[q]), "reference": ss.names[p],
               "fine": round(float(sc), 4), "inliers": int(n)}
              for (q, p, sc), n in zip(top, top_in) if n >= ver.p.min_inliers]
    ms_pair = 1000 * ver.seconds / max(ver.pairs, 1)
    p = ver.p
    k = int((top_in >= p.min_inliers).sum())
    tails = ScoreTails(S.envelope(by_group, "coarse"), S.envelope(by_group, "fine"), S.upper95(k, len(top)), len(top),
                       source=f"modscan bench scale: {len(ss.names)} pictures, {by_group['all']['fine'].pairs} unrelated pairs")
    c = S.copies(ss)
    c_in = np.asarray([ver.inliers(int(q), int(s)) for q, s in zip(c["rows"], c["src"])])
    unverifiable = np.asarray([ver.ref_count(int(s)) < p.min_ref_keypoints for s in c["src"]])
    c_in = np.where(unverifiable, 10**6, c_in)  # such references are decided by the fine threshold alone
    sizes = S.size_rows(tails, c, c_in, thr, p.min_inliers)
    cal_1m = [r for r in sizes if r["references"] == 1_000_000 and r["sure"] is not None][0]
    flagged_1m = (c["fine"] >= cal_1m["fine"]) & ((c["fine"] >= cal_1m["sure"]) | (c_in >= p.min_inliers))
    return {
        "card_thresholds": thr, "verify_params": p.to_dict(),
        "tails": {g: {kk: v.to_dict() for kk, v in t.items()} for g, t in by_group.items()},
        "at_card_thresholds": [{"group": g, "pairs": t["fine"].pairs, "coarse per pair": t["coarse"].rate(thr["coarse"]),
                                "fine per pair": t["fine"].rate(thr["fine"])} for g, t in by_group.items()],
        "verifier": {"top_unrelated_pairs": len(top), "lowest fine score": float(top[-1][2]), "passed": k,
                     "pass_rate": k / len(top), "pass_rate_upper95": tails.verifier_pass,
                     "max_inliers": int(top_in.max()), "ms_per_pair": ms_pair, "passes": passes,
                     "copies": len(c_in), "copies_verified": float((c_in >= p.min_inliers).mean()),
                     "top_inliers": top_in.tolist(), "top_fine": [round(float(x[2]), 4) for x in top],
                     "copy_inliers": np.where(unverifiable, -1, c_in).tolist(),
                     "unverifiable_references": int(np.unique(c["src"][unverifiable]).size)},
        "independence_check": S.measured_vs_independent(ss, by_group["all"]["fine"], (thr["fine"], 0.3, 0.35, 0.2)),
        "sizes": sizes, "coarse_curve_1m": S.coarse_curve(tails, c, flagged_1m),
        "synthetic_check": _synthetic_check(thr, by_group["photos"], photos, work),
        "scale_tails": {**tails.to_dict(), "copies": {
            "coarse": [round(float(x), 4) for x in c["coarse"]], "fine": [round(float(x), 4) for x in c["fine"]],
            "verified": [int(x >= p.min_inliers) for x in c_in]}},
    }


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 0.01 and x != 0 else f"{x:.4f}"
    return "-" if x is None else str(x)


def _print(res: dict[str, Any]) -> None:
    def show(title: str, rows: list[dict[str, Any]]) -> None:
        print(f"\n{title}")
        print(table([{k: _fmt(v) for k, v in r.items()} for r in rows], list(rows[0])))

    show("per-pair rates of unrelated pairs at the card's thresholds", res["at_card_thresholds"])
    v = res["verifier"]
    print(f"\nverifier on the {v['top_unrelated_pairs']} highest-scoring unrelated pairs (fine >= {v['lowest fine score']:.3f}): "
          f"{v['passed']} pass (95 % upper bound {v['pass_rate_upper95']:.2e}), most inliers {v['max_inliers']}; "
          f"copies verified {v['copies_verified']:.3f} of {v['copies']}; {v['ms_per_pair']:.1f} ms per pair")
    show("independence check: the largest real gallery, measured vs predicted", res["independence_check"])
    show("expected per unrelated upload, by gallery size (per-pair tails x independence)", res["sizes"])
    show("coarse stage at 1M references", res["coarse_curve_1m"])
    show("bench search's synthetic vectors against the real tails", res["synthetic_check"])


def _write_card(res: dict[str, Any]) -> None:
    from models.card import CARD_FILE, DEFAULT_MODEL_DIR

    path = Path(DEFAULT_MODEL_DIR) / CARD_FILE
    card = json.loads(path.read_text())
    card["scale_tails"] = res["scale_tails"]
    path.write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote scale_tails into {path}")


def cli_bench_scale(a: argparse.Namespace) -> int:
    work = Path(a.workdir or "bench-out")
    work.mkdir(parents=True, exist_ok=True)
    bench_scale([Path(p) for p in a.trained or []], [Path(p) for p in a.unseen or []], a.generated, work, a.seed,
                a.write_card)
    return 0


def add_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    """Register ``scale`` under ``modscan bench``."""
    q = bench_subparsers.add_parser("scale", help="false flags and survivors at 10K-10M references, from real pictures")
    q.add_argument("--trained", action="append", metavar="DIR", help="photos the model was trained on")
    q.add_argument("--unseen", action="append", metavar="DIR", help="photos the model never saw")
    q.add_argument("--generated", type=int, default=300, help="generated everyday pictures (default 300)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--write-card", action="store_true", help="store the tails in the shipped model card")
    q.add_argument("--workdir", default=None)
    q.set_defaults(fn=cli_bench_scale)
