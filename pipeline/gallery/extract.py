"""The gallery's feature stage: decoded reference pictures -> what a version stores of each
(the 128-d coarse and 512-d rerank features, the reference's own hash signals, its keypoints for
geometric verification), or a rejection with an error code.

:class:`GalleryFeatureStage` is a plain stage (``__init__`` builds the model, ``__call__`` works
on a decoded batch); ``jobs/commands/gallery_cmd.py`` distributes it with Ray Data for ``gallery build``
and ``add``; :func:`local_extractor` runs the same stage in-process (tests, review decisions,
benchmarks, small galleries). Both give the :data:`~pipeline.gallery.update.Extractor` contract.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.gallery.update import Extractor
from pipeline.gallery.verify import VerifyParams, pack, reference_keypoints


class GalleryFeatureStage:
    """Stage: decoded batch -> adapter-1 128-d and 512-d features of the high-res image, and the
    reference's ORB keypoints (``keypoints``: packed bytes, :func:`pipeline.gallery.verify.pack`)
    found on its encoded bytes at the verification size.

    A low-content picture (flat colour, near-uniform, almost empty canvas) is rejected with the
    code ``low_content``: as a reference it would match every flat upload.
    """

    def __init__(self, model_dir: str | None, threads: int | None = None, precision: str = "auto",
                 verify: VerifyParams | None = None) -> None:
        from pipeline.features import FeatureExtractor

        self.fx = FeatureExtractor(model_dir, threads=threads, precision=precision)
        self.verify = verify or VerifyParams()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        decoded = np.asarray(batch["ok"], bool)
        low = np.asarray(batch.get("low_content", np.zeros(len(decoded), bool)), bool) & decoded
        ok = decoded & ~low
        codes = np.asarray(batch["error_code"], dtype=object).copy()
        messages = np.asarray(batch["error_message"], dtype=object).copy()
        codes[low] = "low_content"
        messages[low] = "near-uniform picture (flat colour or almost empty): nothing to identify copies by"
        cd, rd = self.fx.config.coarse_dim, self.fx.config.rerank_dim
        coarse = np.zeros((len(ok), cd), np.float32)
        rerank = np.zeros((len(ok), rd), np.float32)
        if ok.any():
            c, r = self.fx.gallery(batch["high"][ok])
            coarse[ok], rerank[ok] = c, r
        n = len(ok)  # the reference's own signals (SignalDecoder's), kept for `gallery export-hashes`
        signals = {c: batch.get(c, np.full(n, d, dtype=object if d is None else np.int16))
                   for c, d in (("md5", None), ("pdq_hash", None), ("pdq_quality", -1))}
        kps = np.empty(n, dtype=object)
        kps[:] = [pack(reference_keypoints(batch["bytes"][i], self.verify)) if ok[i] and "bytes" in batch
                  and batch["bytes"][i] is not None else None for i in range(n)]
        return {"uri": batch["image_key"], "sha256": batch["image_sha256"], "ok": ok,
                "error_code": codes, "error_message": messages, "coarse": coarse, "rerank": rerank,
                "keypoints": kps, **signals}


def stage_rows(b: dict[str, Any]) -> list[dict[str, Any]]:
    """A GalleryFeatureStage output batch -> the per-image dicts of the Extractor contract."""
    out = []
    for i in range(len(b["uri"])):
        ok = bool(b["ok"][i])
        out.append({"uri": str(b["uri"][i]), "sha256": b["sha256"][i], "ok": ok,
                    "error_code": b["error_code"][i], "error_message": b["error_message"][i],
                    "coarse": b["coarse"][i] if ok else None, "rerank": b["rerank"][i] if ok else None,
                    "md5": b["md5"][i] if "md5" in b else None,
                    "pdq_hash": b["pdq_hash"][i] if "pdq_hash" in b else None,
                    "pdq_quality": int(b["pdq_quality"][i]) if "pdq_quality" in b else None,
                    "keypoints": b["keypoints"][i] if ok and "keypoints" in b else None})
    return out


def local_extractor(model_dir: str | None = None) -> Extractor:
    """Same contract without Ray (used by tests and tiny galleries)."""
    from models.card import read_card
    from pipeline.ingest.decode import DecodeConfig
    from pipeline.ingest.fetch import Fetcher

    card = read_card(model_dir)
    from pipeline.signals.hashes import SignalDecoder

    fetch, dec = Fetcher(), SignalDecoder(DecodeConfig.for_model(card.config))
    stage = GalleryFeatureStage(model_dir)

    def extract(uris: list[str]) -> list[dict[str, Any]]:
        out = []
        for i in range(0, len(uris), 32):
            chunk = uris[i:i + 32]
            out += stage_rows(stage(dec(fetch({"image_key": np.asarray(chunk, object), "uri": np.asarray(chunk, object)}))))
        return out

    return extract


