"""pipeline/gallery/calibration.py: per-pair tails, their extrapolation, thresholds sized for a
gallery, and the sizing every written version gets (pipeline/gallery/store.py)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.gallery.calibration import (
    VERIFY_BELOW,
    Budgets,
    ScoreTails,
    TailCurve,
    calibrate_for_size,
    copy_recall,
    initial,
    per_upload,
    sized,
)
from pipeline.gallery.manifest import VersionModel

GRID = tuple(np.round(np.arange(-0.2, 1.0001, 0.01), 2))


def _tails(seed: int = 0, n: int = 500_000) -> ScoreTails:
    """Tails of a known distribution: unrelated scores ~ N(0.05, 0.08) (a Gaussian tail)."""
    rng = np.random.default_rng(seed)
    s = rng.normal(0.05, 0.08, n)
    c = rng.normal(0.2, 0.1, n)
    return ScoreTails(TailCurve.measure(c, GRID), TailCurve.measure(s, GRID), 1e-3, 1500, "test")


def test_per_upload_is_one_minus_the_product_of_independent_misses() -> None:
    assert per_upload(0.0, 10**7) == 0.0 and per_upload(1.0, 3) == 1.0
    assert per_upload(1e-4, 1000) == pytest.approx(1 - (1 - 1e-4) ** 1000, rel=1e-9)
    assert per_upload(1e-9, 10**6) == pytest.approx(1e-3, rel=1e-3)  # small p: about n * p


def test_tail_curve_reads_measurements_then_its_fit() -> None:
    from scipy.stats import norm

    t = _tails().fine
    for thr in (0.1, 0.2, 0.25):  # measured region: the empirical rate, close to the true one
        assert t.rate(thr) == pytest.approx(norm.sf(thr, 0.05, 0.08), rel=0.15)
    assert t.b < 0  # a falling tail
    beyond = t.rate(0.6)  # no pair measured there: the log-linear fit, positive and below the measured end
    assert 0 < beyond < t.rate(0.35)
    # thresholds found for a rate are monotone and at least the grid's start
    assert t.threshold_for(1e-3) < t.threshold_for(1e-5) < t.threshold_for(1e-8)
    assert t.rate(t.threshold_for(1e-6)) <= 1e-6
    back = TailCurve.from_dict(t.to_dict())
    assert back == t


def test_thresholds_rise_with_the_gallery_and_keep_the_budgets() -> None:
    tails = _tails()
    b = Budgets(false_flags=0.001, verify_share=0.05)
    cals = [calibrate_for_size(tails, n, coarse=0.3, fine=0.3, budgets=b) for n in (1, 10_000, 1_000_000, 10_000_000)]
    assert [c.fine for c in cals] == sorted(c.fine for c in cals)
    assert [c.sure for c in cals] == sorted(c.sure for c in cals) and cals[-1].sure > cals[0].sure
    # the floor: just under the card's fine threshold (1 reference: 3 % of pairs reach it)
    assert cals[0].fine == pytest.approx(0.3 - VERIFY_BELOW)
    for c in cals:
        assert c.sure >= c.fine and c.expected_false_flags <= b.false_flags + 1e-12
        assert c.expected_verified <= b.verify_share + 1e-9 or c.fine == pytest.approx(0.3 - VERIFY_BELOW)
        # the sure path alone stays within half the budget
        assert per_upload(tails.fine.rate(c.sure), c.references) <= b.false_flags / 2 + 1e-12


def test_copy_recall_counts_sure_or_verified_copies() -> None:
    copies = {"coarse": [0.9, 0.9, 0.9, 0.2], "fine": [0.8, 0.5, 0.5, 0.9], "verified": [0, 1, 0, 1]}
    assert copy_recall(copies, coarse=0.3, fine=0.4, sure=0.7) == 0.5   # sure; verified; neither; below coarse
    assert copy_recall(copies, coarse=0.3, fine=0.4, sure=None) == 0.75
    assert copy_recall(None, 0.3, 0.4, 0.7) is None


def test_sized_versions_follow_their_size_and_a_version_without_keypoints_raises_fine() -> None:
    tails = _tails()
    thr = {"coarse": 0.3, "fine": 0.3}
    m = VersionModel("m", 128, 512, 0.3, 0.3).with_thresholds(calibration=initial(thr, tails.to_dict()))
    small, big = sized(m, 1, verifies=True), sized(m, 2_000_000, verifies=True)
    assert small.fine_threshold == pytest.approx(0.3 - VERIFY_BELOW) and big.fine_threshold > 0.3 and big.sure_threshold > small.sure_threshold
    assert big.calibration["references"] == 2_000_000 and big.calibration["expected"]["false_flags"] <= 0.001
    no_kp = sized(m, 2_000_000, verifies=False)
    assert no_kp.sure_threshold is None and no_kp.fine_threshold == big.sure_threshold
    plain = VersionModel("m", 128, 512, 0.3, 0.3)  # a card without tails: thresholds are the card's
    assert sized(plain, 10**7, verifies=True) == plain
    # what the manifest writes reads back the same
    back = VersionModel.from_thresholds("m", 128, 512, big.thresholds())
    assert back == big
