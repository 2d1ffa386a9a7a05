"""Why an upload matched, or did not: ``modscan lookup``.

:func:`explain` runs images through the job's own parts, in the job's order: :class:`Fetcher`
(bytes), :class:`Decoder`, :class:`FeatureExtractor` (low-res 128-d query, high-res 512-d),
:meth:`GalleryIndex.candidates` (coarse search above the coarse threshold, rerank of the
survivors) and :meth:`GalleryIndex.decide` (bank rules). The decision it reports is therefore the
one the job would write for the same bytes, gallery version and thresholds.

Fine scores are shown twice: ``fine`` is the normalised score the thresholds apply to (raw cosine
minus the query's background term, see :class:`~pipeline.gallery.index.ScoreNorm`) and ``fine_score_raw``
the plain cosine. A low-content upload (near-uniform, :func:`~pipeline.ingest.decode.is_low_content`) is
never searched by the job; lookup still shows its nearest references, marked as not scored.

Around that it collects what an operator needs to see the reason: the best ``top_k`` coarse
candidates *whatever their score* (a candidate below the coarse threshold is shown with the fine
score it would have had, marked as not reranked by the job), every bank membership of each
candidate with its threshold and verdict, and the rule that made the decision (:class:`Rule`).
Results are frozen dataclasses; :func:`render_table` and :func:`render_json` print them.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.gallery import DisabledReference, GalleryIndex
from pipeline.gallery.query import MatchRule
from pipeline.ingest.decode import DecodeConfig
from pipeline.ops.explain_hashes import HashSignals, hash_signals, render_lines
from pipeline.schemas import Action, Status
from pipeline.signals.hashes import SignalDecoder


class Rule(str, enum.Enum):
    """Which rule made a decision (stable names: scripts may key on them)."""

    DECODE_ERROR = "decode_error"                    # unreadable/undecodable: an error row
    LOW_CONTENT = "low_content"                      # decoded but near-uniform: never searched, never a match
    NO_COARSE_CANDIDATE = "no_coarse_candidate"      # nothing above the coarse threshold: stopped after low-res
    BELOW_FINE_THRESHOLD = "below_fine_threshold"    # reranked, no membership reached its bank's threshold
    BANK_THRESHOLD = "bank_threshold"                # best blocking match reached its bank's threshold
    ALLOW_LIST_PRECEDENCE = "allow_list_precedence"  # an allow-list match at least as good as the best blocking one
    DISABLED_BANK = "disabled_bank"                  # a match reached the threshold, but its bank is disabled
    DISABLED_REFERENCE = "disabled_reference"        # a match reached the threshold, but the reference is disabled
    VERIFICATION_FAILED = "verification_failed"      # reached the fine threshold, not the sure one, and geometric
    #                                                  verification did not confirm it
    HASH_LIST = "hash_list"                          # a hash-list bank (pdq / md5) decided, across signals


class Verdict(str, enum.Enum):
    """What the bank rules made of one (candidate, bank) membership."""

    PASSES = "passes"                          # fine score >= the bank's threshold
    BELOW_THRESHOLD = "below_threshold"
    NOT_RERANKED = "not_reranked"              # below the coarse threshold / outside rerank_k / low content:
    #                                            the job never scored this pair
    BANK_DISABLED = "bank_disabled"
    REFERENCE_DISABLED = "reference_disabled"


@dataclass(frozen=True)
class DecodeResult:
    ok: bool
    low_content: bool                 # decoded, but near-uniform (the job does not search it)
    n_bytes: int
    sha256: str | None
    error_code: str | None
    error_message: str | None


@dataclass(frozen=True)
class Membership:
    bank: str
    category: str
    action: str
    threshold: float
    verdict: str


@dataclass(frozen=True)
class Candidate:
    rank: int
    reference_id: int
    source_uri: str | None
    coarse_score: float
    above_coarse_threshold: bool
    fine_score: float                 # normalised fine score, what thresholds apply to (every shown candidate)
    fine_score_raw: float             # plain 512-d cosine of the pair
    reranked_by_job: bool             # whether the job's cascade scored this pair at all
    memberships: tuple[Membership, ...]


@dataclass(frozen=True)
class Decision:
    status: str
    action: str
    bank: str | None
    category: str | None
    reference_id: int | None
    coarse_score: float | None
    fine_score: float | None          # normalised
    fine_score_raw: float | None
    rule: str
    detail: str
    signal: str | None = None         # descriptor | pdq | md5: what decided (None: nothing matched)
    match_rule: str | None = None     # the descriptor's MatchRule (sure, verified, ...), as in the flag row
    inliers: int | None = None        # geometric verification's RANSAC inliers, as in the flag row
    verified: tuple[tuple[int, int], ...] = ()  # (reference id, inliers) of every candidate verified


@dataclass(frozen=True)
class Explanation:
    image: str
    decode: DecodeResult
    candidates: tuple[Candidate, ...]
    decision: Decision               # the final decision across signals: what the job writes for this upload
    hashes: HashSignals | None = None  # hash-list banks (pipeline.ops.explain_hashes)
    descriptor: Decision | None = None  # the descriptor's own decision (cascade, verification, bank rules)


@dataclass(frozen=True)
class BankRule:
    bank: str
    category: str
    action: str
    threshold: float
    enabled: bool


@dataclass(frozen=True)
class LookupReport:
    gallery_version: str
    model_version: str
    coarse_threshold: float
    default_fine_threshold: float
    rerank_k: int
    banks: tuple[BankRule, ...]
    disabled_references: tuple[DisabledReference, ...]
    explanations: tuple[Explanation, ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
def thresholds_in_force(gal: GalleryIndex) -> tuple[BankRule, ...]:
    """Every bank of the version with the fine threshold the job applies to it."""
    return tuple(BankRule(n, b.category, b.action, gal.bank_threshold(n), b.enabled)
                 for n, b in sorted(gal.banks.items()))


def _memberships(gal: GalleryIndex, gid: int, fine: float, scored: bool) -> tuple[Membership, ...]:
    rows = gal.entries[gal.entries["id"] == gid]
    out = []
    for bank in sorted(rows["bank"].tolist()):
        b, thr = gal.banks[bank], gal.bank_threshold(bank)
        if gid in gal.disabled:
            v = Verdict.REFERENCE_DISABLED
        elif not b.enabled:
            v = Verdict.BANK_DISABLED
        elif not scored:
            v = Verdict.NOT_RERANKED
        else:
            v = Verdict.PASSES if fine >= thr else Verdict.BELOW_THRESHOLD
        out.append(Membership(bank, b.category, b.action, thr, v.value))
    return tuple(out)


def _rule(gal: GalleryIndex, m: Any, job_D: np.ndarray | None, job_I: np.ndarray, job_F: np.ndarray) -> tuple[Rule, str]:
    """The rule behind ``m`` (a :class:`~pipeline.gallery.Match`) from the job's own D, I, F row."""
    valid = job_I >= 0
    if m.status == Status.MATCHED.value:
        return Rule.BANK_THRESHOLD, (f"reference #{m.reference_id} in bank {m.bank!r}: fine {m.fine_score:.3f} >= "
                                     f"threshold {gal.bank_threshold(m.bank):.3f}, {_confirmation(gal, m)} -> {m.action}")
    if m.rule == MatchRule.VERIFICATION_FAILED.value:
        return Rule.VERIFICATION_FAILED, (
            f"best candidate's fine {m.fine_score:.3f} reached the fine threshold but not the sure threshold "
            f"{gal.params.sure_threshold:.3f}, and geometric verification found "
            f"{'no picture to verify' if m.inliers is None else f'{m.inliers} inliers'} "
            f"(< {gal.verify_params.min_inliers}): no flag")
    if m.bank is not None:
        return Rule.ALLOW_LIST_PRECEDENCE, (
            f"allow-list bank {m.bank!r} (reference #{m.reference_id}, fine {m.fine_score:.3f}) matched at least as "
            f"well as every blocking match that reached its threshold: no flag")
    if not valid.any():
        return Rule.NO_COARSE_CANDIDATE, (f"no gallery entry reached the coarse threshold "
                                          f"{gal.params.coarse_threshold:.3f}: stopped after the low-res pass")
    # Nothing counted. Was the best would-be match switched off?
    best: tuple[float, Rule, str] | None = None
    for gid, fine in zip(job_I[valid].tolist(), job_F[valid].tolist()):
        for bank in gal.entries.loc[gal.entries["id"] == gid, "bank"].tolist():
            b, thr = gal.banks[bank], gal.bank_threshold(bank)
            if fine < thr or b.action == Action.ALLOW.value:
                continue
            if gid in gal.disabled:
                d = gal.disabled[gid]
                why = (Rule.DISABLED_REFERENCE, f"reference #{gid} ({bank!r}, fine {fine:.3f} >= {thr:.3f}) is disabled "
                       f"until {d.until or 'enabled again'} by {d.by}: {d.note or 'no note'}")
            elif not b.enabled:
                why = (Rule.DISABLED_BANK, f"reference #{gid} matched bank {bank!r} (fine {fine:.3f} >= {thr:.3f}), "
                       f"but the bank is disabled")
            else:
                continue
            if best is None or fine > best[0]:
                best = (fine, *why)
    if best is not None:
        return best[1], best[2]
    blocking = [(fine, gid, bank) for gid, fine in zip(job_I[valid].tolist(), job_F[valid].tolist())
                for bank in gal.entries.loc[gal.entries["id"] == gid, "bank"].tolist()
                if gal.banks[bank].action != Action.ALLOW.value]
    if not blocking:
        return Rule.BELOW_FINE_THRESHOLD, (f"{int(valid.sum())} candidate(s) reranked, all in allow-list banks: "
                                           f"nothing to block")
    fine, gid, bank = max(blocking)
    return Rule.BELOW_FINE_THRESHOLD, (f"{int(valid.sum())} candidate(s) reranked; best blocking match is reference "
                                       f"#{gid} ({bank!r}) with fine {fine:.3f} < threshold {gal.bank_threshold(bank):.3f}")


def _confirmation(gal: GalleryIndex, m: Any) -> str:
    """How a descriptor match was confirmed (its :class:`~pipeline.gallery.MatchRule`), in words."""
    if m.rule == MatchRule.SURE.value:
        return f"and the sure threshold {gal.params.sure_threshold:.3f} (the descriptor alone decides)"
    if m.rule == MatchRule.VERIFIED.value:
        return f"confirmed by geometric verification ({m.inliers} inliers >= {gal.verify_params.min_inliers})"
    if m.rule == MatchRule.UNVERIFIABLE_REFERENCE.value:
        return "reference too smooth to verify (fewer than " \
               f"{gal.verify_params.min_ref_keypoints} keypoints): the fine threshold alone decides"
    return "no verification stage in this gallery version"


def _finite(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


_JobRow = tuple[Any, np.ndarray, np.ndarray, np.ndarray]       # the job's Match and its D, I, F rows
_ShownRow = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # best k: coarse, ids, fine, fine raw


def _scores(gal: GalleryIndex, fx: Any, dec: dict[str, Any], rows: np.ndarray, low_content: np.ndarray,
            top_k: int) -> tuple[dict[int, _JobRow], dict[int, _ShownRow]]:
    """The job's cascade and bank rules for the decoded ``rows`` (not low content), and the best
    ``top_k`` coarse candidates of every decoded row whatever their score, with their fine scores."""
    job: dict[int, _JobRow] = {}
    shown: dict[int, _ShownRow] = {}
    if not len(rows):
        return job, shown
    xq128 = fx.query_coarse(dec["low"][rows])
    xq512 = fx.fine_features(dec["high"][rows])
    searched = np.nonzero(~low_content[rows])[0]  # the job never searches a low-content upload
    if len(searched):
        c = gal.candidates(xq128[searched], lambda sel: xq512[searched][sel])  # the job's cascade ...
        kp = gal.keypoints_from_bytes([dec["bytes"][rows[s_]] for s_ in searched])
        matches = gal.decide(c.D, c.I, c.F, c.offset, kp)          # ... verification and bank rules
        for j, s_ in enumerate(searched):
            job[int(rows[s_])] = (matches[j], c.D[j], c.I[j], c.F[j])
    k = max(1, min(top_k, gal.cascade.ntotal))
    Ds, Is = gal.cascade.search_coarse(xq128, k, -np.inf)  # display: best k, whatever their score
    Fraw = gal.cascade.score_fine(xq512, Is)
    Fs, _ = gal.normalise(xq512, Fraw)
    for j, r in enumerate(rows):
        shown[int(r)] = (Ds[j], Is[j], Fs[j], Fraw[j])
    return job, shown


def _candidates(gal: GalleryIndex, shown: _ShownRow, I: np.ndarray, F: np.ndarray,
                src: dict[int, str]) -> tuple[Candidate, ...]:
    """The shown candidates of one upload; ``I``, ``F``: the job's candidate ids and fine scores."""
    in_job = {int(g): float(f) for g, f in zip(I.tolist(), F.tolist()) if g >= 0}
    Ds, Is, Fs, Fraw = shown
    cands = []
    for rank, (d, g, f, fr) in enumerate(zip(Ds.tolist(), Is.tolist(), Fs.tolist(), Fraw.tolist()), start=1):
        if g < 0:
            continue
        scored = bool(g in in_job and np.isfinite(in_job[g]))
        cands.append(Candidate(rank, int(g), src.get(g), float(d), d >= gal.params.coarse_threshold, float(f),
                               float(fr), scored, _memberships(gal, int(g), float(f), scored)))
    return tuple(cands)


def _decision(gal: GalleryIndex, m: Any, D: np.ndarray | None, I: np.ndarray, F: np.ndarray) -> Decision:
    """The job's decision ``m`` for a decoded upload (None: low content, never searched) and its rule."""
    if m is None:
        return Decision(Status.LOW_CONTENT.value, Action.NONE.value, None, None, None, None, None, None,
                        Rule.LOW_CONTENT.value, "near-uniform picture (flat colour, almost empty canvas): "
                        "nothing to identify it by, so the job never searches it")
    rule, detail = _rule(gal, m, D, I, F)
    return Decision(m.status, m.action, m.bank, m.category, m.reference_id, m.coarse_score,
                    _finite(m.fine_score), _finite(getattr(m, "fine_score_raw", None)), rule.value, detail,
                    "descriptor" if m.bank else None, m.rule, m.inliers, m.verified)


def _final(descriptor: Decision, hs: HashSignals | None, final: Any) -> Decision:
    """The decision across signals (what the job writes): the descriptor's, unless a hash-list bank decided."""
    if hs is None or final is None or final.signal not in ("pdq", "md5"):
        return descriptor
    how = f"distance {final.pdq_distance}" if final.signal == "pdq" else "the same file"
    detail = (f"{final.signal} list entry {final.list_entry_id} of bank {final.bank!r} ({how}) "
              + ("-> " + final.action if final.status == Status.MATCHED.value else "in an allow bank: no flag"))
    return Decision(final.status, final.action, final.bank, final.category, None, final.coarse_score, None, None,
                    Rule.HASH_LIST.value, detail, final.signal)


def explain(images: list[str], gal: GalleryIndex, fx: Any, top_k: int = 10,
            decode_cfg: DecodeConfig | None = None) -> LookupReport:
    """Run ``images`` (paths or ``s3://`` URIs) through the job's stages and explain each decision.
    ``fx`` is a :class:`~pipeline.features.FeatureExtractor` of the gallery's model."""
    from pipeline.ingest.fetch import Fetcher

    decode_cfg = decode_cfg or DecodeConfig.for_model(fx.config)
    uris = np.asarray(images, dtype=object)
    fetched = Fetcher()({"image_key": uris, "uri": uris})
    sizes = [len(b) for b in fetched["bytes"]]
    dec = SignalDecoder(decode_cfg)(fetched)
    ok = np.asarray(dec["ok"], bool)
    low_content = np.asarray(dec.get("low_content", np.zeros(len(ok), bool)), bool) & ok
    job, shown = _scores(gal, fx, dec, np.nonzero(ok)[0], low_content, top_k)
    src = gal.entries.drop_duplicates("id").set_index("id")["source_uri"].to_dict()
    out = []
    for i, uri in enumerate(images):
        dr = DecodeResult(bool(ok[i]), bool(low_content[i]), sizes[i], dec["image_sha256"][i], dec["error_code"][i],
                          dec["error_message"][i])
        if not ok[i]:
            out.append(Explanation(uri, dr, (), Decision(Status.ERROR.value, Action.NONE.value, None, None, None, None,
                                                         None, None, Rule.DECODE_ERROR.value,
                                                         f"{dr.error_code}: {dr.error_message}")))
            continue
        m, D, I, F = job.get(i, (None, None, np.zeros(0, np.int64), np.zeros(0, np.float32)))
        hs = hash_signals(gal, dec["md5"][i], dec["pdq_hash"][i], int(dec["pdq_quality"][i]), m)
        own = _decision(gal, m, D, I, F)
        final = _final(own, hs, gal.decide_signals(m, gal.query_hashes(
            [dec["md5"][i]], [dec["pdq_hash"][i]], [int(dec["pdq_quality"][i]) if dec["pdq_hash"][i] else None])[0])
            if hs is not None else None)
        out.append(Explanation(uri, dr, _candidates(gal, shown[i], I, F, src), final, hs, own))
    return LookupReport(gal.version, gal.model_id, gal.params.coarse_threshold, gal.params.fine_threshold,
                        gal.params.rerank_k, thresholds_in_force(gal),
                        tuple(sorted(gal.disabled.values(), key=lambda d: d.id)), tuple(out))


# --------------------------------------------------------------------------------------------
def render_json(report: LookupReport) -> str:
    return json.dumps(report.to_dict(), indent=2, default=str)


def _f(x: float | None, nd: int = 3) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def _decision_lines(e: Explanation) -> list[str]:
    def what(d: Decision) -> str:
        w = f"{d.status} / {d.action}"
        if d.bank and d.signal in (None, "descriptor"):
            w += f", bank {d.bank}, reference #{d.reference_id}, fine {_f(d.fine_score)} (raw {_f(d.fine_score_raw)})"
        elif d.bank:
            w += f", bank {d.bank} by {d.signal}"
        return w

    d, own = e.decision, e.descriptor
    L = [f"decision  {what(d)}", f"rule      {d.rule}: {d.detail}"]
    if own is not None and own is not d:
        L += [f"descriptor {what(own)}", f"           {own.rule}: {own.detail}"]
    src = own if own is not None else d
    if src.verified:
        L.append("verified  " + ", ".join(f"reference #{g}: {n} inliers" for g, n in src.verified))
    return L


def render_table(report: LookupReport) -> str:
    """A plain-text report, one block per image."""
    L = [f"gallery {report.gallery_version}, model {report.model_version}; coarse threshold "
         f"{report.coarse_threshold:.3f}, rerank_k {report.rerank_k}",
         "", f"{'bank':<24} {'category':<28} {'action':<9} {'fine thr':>8}  state"]
    for b in report.banks:
        L.append(f"{b.bank:<24} {b.category:<28} {b.action:<9} {b.threshold:>8.3f}  {'enabled' if b.enabled else 'DISABLED'}")
    for d in report.disabled_references:
        L.append(f"disabled reference #{d.id} until {d.until or 'enabled again'} (by {d.by}: {d.note or '-'})")
    for e in report.explanations:
        L += ["", f"== {e.image}"]
        if e.decode.ok:
            L.append(f"decode    ok{' (LOW CONTENT)' if e.decode.low_content else ''}, {e.decode.n_bytes:,} bytes, "
                     f"sha256 {(e.decode.sha256 or '')[:16]}")
        else:
            L.append(f"decode    FAILED {e.decode.error_code}: {e.decode.error_message}")
        if e.candidates:
            L.append(f"  {'rank':>4} {'ref':>6} {'coarse':>7} {'raw':>7} {'fine':>7}  memberships "
                     f"(fine = normalised, what thresholds apply to; * = scored by the job)")
            for c in e.candidates:
                mem = "; ".join(f"{m.bank} {m.action} thr {m.threshold:.3f}: {m.verdict}" for m in c.memberships)
                mark = "*" if c.reranked_by_job else " "
                L.append(f"  {c.rank:>4} {c.reference_id:>6} {c.coarse_score:>7.3f} {c.fine_score_raw:>7.3f} "
                         f"{c.fine_score:>7.3f}{mark} {mem}")
        L += _decision_lines(e)
        L += render_lines(e.hashes)
    return "\n".join(L)
