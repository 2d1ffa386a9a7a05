"""The operator's world shared by the tests of ``pipeline/ops/`` and the flood guard: one real
gallery built with the shipped model (reference folders, a banks list), one day of local uploads
(copies, plain backgrounds an over-broad reference matches, a low-content and a truncated file), the
job's own Moderator rows for them, and those rows staged, flood-guarded and committed with a review page.

Registered in ``conftest.py`` (``pytest_plugins``), so the session builds it once for every file that
uses it: ``pipeline/ops/test_explain.py``, ``test_review_decisions.py`` and ``test_review_page.py``,
``pipeline/gallery/test_audit.py``, ``pipeline/moderation/test_floodguard.py``.
"""

from __future__ import annotations

import io
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import photo, save_jpeg
from PIL import Image

from models.augment import apply_named
from pipeline import gallery as G
from pipeline.moderation import flags as F

DAY = "2026-04-02"
N_PLAIN = 8           # plain gradient uploads: all match the over-broad near-uniform reference
FLOOD_LIMIT = 5       # max_matches_per_reference in these tests (< N_PLAIN)


def _near_blank(rng: np.random.Generator, h: int, w: int, level: np.ndarray, gradient: float = 0.0,
                noise: float = 2.5) -> Image.Image:
    a = np.ones((h, w, 3), np.float32) * level + rng.normal(0, noise, (h, w, 3)) + np.linspace(0, gradient, w)[None, :, None]
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def make_world(root: Path) -> dict[str, Path]:
    """Reference folders, a banks list and one day of uploads (local files)."""
    rng = np.random.default_rng(0)
    r = random.Random(3)
    refs = root / "refs"
    for n in ("astronaut", "rocket", "camera"):
        save_jpeg(Image.fromarray(photo(n)), refs / "violence" / f"{n}.jpg")
    # the over-broad reference: a plain light-grey gradient someone added to a sensitive bank (varied
    # enough to pass the decoder's low-content check, generic enough to match every plain background)
    save_jpeg(_near_blank(rng, 300, 400, np.array([210, 210, 210]), 60.0, 4.0), refs / "violence" / "plain-gradient.jpg")
    save_jpeg(Image.fromarray(photo("chelsea")), refs / "spam" / "chelsea.jpg")
    save_jpeg(Image.fromarray(photo("camera")), refs / "fp" / "camera.jpg")   # known false positive: allow wins
    up = root / "uploads"
    for i in range(N_PLAIN):  # plain grey gradient backgrounds (wallpapers, text-post backgrounds): not low content
        save_jpeg(_near_blank(rng, 240 + 10 * i, 320, np.full(3, rng.uniform(200, 220)), 50.0 + 3 * i, 4.0), up / f"plain-{i:02d}.jpg")
    save_jpeg(_near_blank(rng, 200, 300, np.array([120, 160, 200])), up / "flat.jpg")  # low content: never searched
    save_jpeg(apply_named(Image.fromarray(photo("rocket")), ["flip"], r), up / "copy-rocket-flip.jpg")
    save_jpeg(apply_named(Image.fromarray(photo("chelsea")), ["flip"], r), up / "copy-chelsea-flip.jpg")
    save_jpeg(apply_named(Image.fromarray(photo("camera")), ["flip"], r), up / "copy-camera-flip.jpg")
    for n in ("coins", "horse"):
        save_jpeg(Image.fromarray(photo(n)), up / f"other-{n}.jpg")
    buf = io.BytesIO()
    Image.fromarray(photo("astronaut")).save(buf, format="JPEG")
    (up / "broken-truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    return {"refs": refs, "uploads": up}


def banks_for(refs: str) -> list:
    from pipeline.gallery.banks import Bank

    return [Bank("violence", f"{refs}/violence", "sensitive/violence", "filter"),
            Bank("spam", f"{refs}/spam", "low_quality/spam", "downrank"),
            Bank("fp", f"{refs}/fp", "allow/known_false_positive", "allow")]


@pytest.fixture(scope="session")
def ops_world(tmp_path_factory, shipped_model_dir):
    from models.card import read_card
    from pipeline.gallery.extract import local_extractor
    from pipeline.ingest.storage import open_store

    root = tmp_path_factory.mktemp("operator")
    w = make_world(root)
    extract = local_extractor(None)
    card = read_card(None)
    gal = root / "gallery"
    v, stats = G.build(open_store(str(gal), create=True), banks_for(str(w["refs"])), card, extract, n_shards=2,
                       who="builder", note="initial banks")
    assert v == "v000001" and stats["violence"]["added"] == 4 and stats["fp"]["new_membership"] == 1
    e = G.read_content(open_store(str(gal)))[1].entries
    ref = {Path(u).stem: int(i) for i, u in zip(e["id"], e["source_uri"])}
    uploads = sorted(str(p) for p in w["uploads"].iterdir())
    return {**w, "root": root, "gallery": gal, "card": card, "extract": extract, "ref": ref, "uploads_list": uploads}


@pytest.fixture()
def fresh(ops_world, tmp_path):
    """A private copy of the built gallery (tests that write versions must not share one)."""
    dst = tmp_path / "gallery"
    shutil.copytree(ops_world["gallery"], dst)
    return dst


@pytest.fixture(scope="session")
def fx():
    from pipeline.features import FeatureExtractor

    return FeatureExtractor(None)


@pytest.fixture(scope="session")
def moderated(ops_world):
    """The job's own Moderator stage on every upload (no Ray): the flag rows the job would stage."""
    return moderate_rows(str(ops_world["gallery"]), ops_world["uploads_list"], ops_world["uploads"], "run-local")


def moderate_rows(gallery_uri: str, uris: list[str], root: Path | str, run_id: str):
    from models.card import read_card
    from pipeline.ingest.decode import DecodeConfig, Decoder
    from pipeline.ingest.fetch import Fetcher
    from pipeline.moderation.moderator import Moderator, RunContext

    card = read_card(None)
    arr = np.asarray(uris, dtype=object)
    dec = Decoder(DecodeConfig(low_res=card.config.low_res, high_res=card.config.high_res))(
        Fetcher()({"image_key": arr, "uri": arr}))
    rel = [u[len(str(root)) + 1:] for u in uris]
    dec["image_key"] = np.asarray(rel, dtype=object)  # the job's keys are relative to the input prefix
    return Moderator(gallery_uri, RunContext(DAY, run_id))(dec)


def open_index(gallery: Path | str, fx) -> G.GalleryIndex:
    """Open a gallery the way the job's Moderator does (model id checked, background bank given)."""
    return G.open_gallery(str(gallery), fx)


def lookup(gallery: Path | str, images: list[str], fx, **kw):
    from pipeline.ops.explain import explain

    return {Path(e.image).name: e for e in explain(images, open_index(gallery, fx), fx, **kw).explanations}




def decisions_csv(*rows: str) -> str:
    return "image_key,reference_id,decision,reviewer,note,bank,until,run_id\n" + "\n".join(rows) + "\n"




def stage_rows(out, run_id: str, table) -> None:
    """Claim the partition and stage rows the way the job does (several Parquet files under
    _staging/R/data/)."""
    F.claim_partition(out, DAY, run_id)
    for i in (0, 1):  # every other row: the held reference's rows end up in both files
        F.write_staged(out, run_id, f"{i:02d}.parquet", table.take(list(range(i, len(table), 2))))


@pytest.fixture(scope="session")
def committed(ops_world, moderated, tmp_path_factory):
    """Moderator rows staged, flood-guarded, verified and committed; review page written."""
    from pipeline.ingest.storage import open_store
    from pipeline.moderation.floodguard import guard_staged
    from pipeline.ops.review_page import write_review

    out = open_store(str(tmp_path_factory.mktemp("flags")), create=True)
    run_id = "20260402T000000-flood"
    stage_rows(out, run_id, moderated)
    report = guard_staged(out, run_id, FLOOD_LIMIT)
    counts = F.verify_staged(out, run_id, len(moderated))
    F.commit_partition(out, DAY, run_id, {"run_id": run_id, "counts": counts, "flood_guard": report.to_dict()})
    page = write_review(out, DAY, run_id, str(ops_world["uploads"]), str(ops_world["gallery"]))
    return {"out": out, "report": report, "counts": counts, "page": page, "run_id": run_id}


