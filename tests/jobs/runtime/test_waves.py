"""jobs/runtime/waves.py and jobs/commands/waves_cmd.py on a real S3 endpoint (moto server) with an hourly partition:
``modscan moderate --hour`` with ``[job] waves``, the hour's committed waves read back, its review
page's Waves section, and ``gallery add --from-wave --hour``. The day-partition tests on local disk
are in ``tests/pipeline/moderation/test_waves.py``."""

from __future__ import annotations

import random

import pytest
from conftest import jpeg_bytes, photo, restart_ray, rocket_gallery
from PIL import Image
from planted_waves import DAY, EDITS, UNRELATED_PHOTOS

from models.augment import apply_named
from pipeline.moderation import flags as F
from pipeline.moderation import wave_output as O

pytestmark = pytest.mark.slow


@pytest.fixture()
def ray_in_s3(s3_server):
    """A fresh 2-CPU Ray cluster started inside the moto server's environment (workers reach it)."""
    ray = restart_ray()
    yield s3_server
    ray.shutdown()


def test_waves_of_an_hour_on_s3_committed_read_back_and_banked(tmp_path, ray_in_s3, capsys) -> None:
    import boto3

    from jobs.cli import main
    from pipeline.gallery.audit import read_log
    from pipeline.ingest.storage import open_store

    s3 = boto3.client("s3", endpoint_url=ray_in_s3)
    for b in ("up-waves", "flags-waves"):
        s3.create_bucket(Bucket=b)
    im = Image.fromarray(photo("astronaut"))
    for i, e in enumerate(EDITS[:6]):
        s3.put_object(Bucket="up-waves", Key=f"d/astro-{i}.jpg", Body=jpeg_bytes(apply_named(im, e, random.Random(i))))
    for n in UNRELATED_PHOTOS[:4]:
        s3.put_object(Bucket="up-waves", Key=f"d/{n}.jpg", Body=jpeg_bytes(photo(n)))
    gal = rocket_gallery(tmp_path)
    toml = tmp_path / "job.toml"
    toml.write_text("[job]\nactors = 1\nbatch_size = 16\nverify_gallery = false\nwaves = true\n")
    out = "s3://flags-waves/f"
    hour = f"{DAY}T13"  # an hourly partition: dt=D/hour=13
    assert main(["moderate", "--input", "s3://up-waves/d/", "--gallery", gal, "--output", out, "--date", DAY,
                 "--hour", "13", "--config", str(toml)]) == 0
    assert "1 waves of 5+ (6 uploads)" in capsys.readouterr().out
    assert O.read_waves(O.waves_root(out), DAY).empty  # the day has no day partition: its hour has the rows
    df = O.read_waves(O.waves_root(out), hour).set_index("image_key")
    assert len(df) == 10 and df.index.is_unique
    astro = df.loc[[f"astro-{i}.jpg" for i in range(6)]]
    assert astro["uploaded_at"].notna().all()  # upload times: S3's LastModified
    assert astro["wave"].all() and astro["dup_cluster_id"].nunique() == 1 and sorted(astro["dup_rank"]) == [1, 2, 3, 4, 5, 6]
    assert not df.drop(astro.index)["wave"].any()
    flags_run = F.read_run(open_store(out), hour)["run_id"]
    page = open_store(out).read_text(f"_reviews/dt={DAY}/hour=13/review-{flags_run}.html")
    assert "<h2>Waves (1 clusters of near-duplicate uploads, 6 uploads)</h2>" in page
    cid = str(astro["dup_cluster_id"].iloc[0])
    assert main(["gallery", "add", gal, "--bank", "v", "--from-wave", cid, "--flags", out, "--date", DAY,
                 "--hour", "13"]) == 0
    first = astro.index[astro["dup_rank"] == 1][0]
    assert f"representative {first}" in read_log(open_store(gal))[-1].note
