"""Shared fixtures. Tests that need ../shared/data skip with a clear reason where it is absent."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# the node cache of gallery versions (pipeline.gallery.nodecache): one per test session, removed at
# exit; set before any Ray cluster starts, so the actors inherit it
if "MODSCAN_GALLERY_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["MODSCAN_GALLERY_CACHE"] = _cache = tempfile.mkdtemp(prefix="modscan-test-gallery-cache-")
    atexit.register(shutil.rmtree, _cache, True)

# the operator's world (a gallery built with the shipped model, a day of uploads, its committed flags),
# built once per session for the files that use it: see operator_world.py
pytest_plugins = ["operator_world"]

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def shared_dir(name: str) -> Path:
    p = SHARED / name
    if not p.is_dir():
        pytest.skip(f"needs ../shared/data/{name} (the project's shared photo set; absent in a bare clone)")
    return p


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small, randomly initialised (seeded) model saved like a real one: for I/O and shape tests."""
    import torch

    from models.card import ModelCard, save_model
    from models.descriptor import Backbone, DescriptorConfig, DescriptorModel

    torch.manual_seed(0)
    # ResNet-18: its zero-initialised residual blocks give a random model distinct features per image
    cfg = DescriptorConfig(backbone=Backbone.RESNET18, high_res=64, low_res=48)
    d = tmp_path_factory.mktemp("tiny_model")
    save_model(DescriptorModel(cfg).eval(), d, ModelCard(config=cfg, training={"note": "random init for tests"}))
    return d


@pytest.fixture(scope="session")
def shipped_model_dir() -> Path:
    from models.card import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "model.safetensors").exists():
        pytest.fail("the shipped model models/default/model.safetensors is missing")
    return DEFAULT_MODEL_DIR


def _as_image(im: Image.Image | np.ndarray) -> Image.Image:
    return Image.fromarray(im) if isinstance(im, np.ndarray) else im


def jpeg_bytes(im: Image.Image | np.ndarray, quality: int = 90) -> bytes:
    """A picture (PIL or an RGB uint8 array) encoded as JPEG."""
    buf = io.BytesIO()
    _as_image(im).convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(im: Image.Image | np.ndarray) -> bytes:
    """A picture (PIL or an array) encoded as PNG."""
    buf = io.BytesIO()
    _as_image(im).save(buf, format="PNG")
    return buf.getvalue()


def save_jpeg(im: Image.Image | np.ndarray, path: Path, quality: int = 92) -> Path:
    """Write a picture as a JPEG file at ``path`` (parents created). -> ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(im, quality))
    return path


def procedural_jpeg(path: Path, seed: int = 0, size: tuple[int, int] = (160, 120)) -> Path:
    """A generated everyday picture (seeded) written as a JPEG at ``path`` (parents created). -> ``path``."""
    import random

    from pipeline.evaluation.samples import procedural

    path.parent.mkdir(parents=True, exist_ok=True)
    procedural(random.Random(seed), size).save(path, format="JPEG", quality=85)
    return path


def upload_folder(root: Path, n: int) -> Path:
    """A day of uploads in ``root``: ``n`` generated everyday pictures (img-0000.jpg ..., seeded, the same
    for every call) and rocket.jpg, the one the test galleries hold. -> ``root``."""
    import random

    from pipeline.evaluation.samples import procedural

    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        procedural(rng, (200, 150)).save(root / f"img-{i:04d}.jpg", quality=85)
    Image.fromarray(photo("rocket")).save(root / "rocket.jpg")
    return root


def driver_env() -> dict[str, str]:
    """The environment of a ``modscan`` driver run as a subprocess: this checkout on the path, and no
    ``RAY_ADDRESS``, so that it starts its own local Ray, as a fresh scheduled job would."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return env


def kill_driver_when(cmd: list[str], ready: Callable[[], bool], timeout: float = 240.0, wait: float = 0.0) -> bool:
    """Start the driver ``cmd`` in its own session and SIGKILL its whole process group (the driver's
    local Ray too) once ``ready()`` is true, ``wait`` seconds after. -> whether it was killed, False
    when it finished (or ``timeout`` passed) first."""
    import signal
    import subprocess
    import time

    p = subprocess.Popen(cmd, cwd=ROOT, env=driver_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline, killed = time.time() + timeout, False
    while time.time() < deadline and p.poll() is None:
        if ready():
            time.sleep(wait)
            os.killpg(p.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    p.wait(timeout=60)
    return killed


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """``modscan ARGV`` in-process -> (exit code, stdout, stderr)."""
    from jobs.cli import main

    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_line(err: str) -> str:
    """The one line an operator sees on stderr (asserted: one line, no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def photo(name: str) -> np.ndarray:
    """A photo scikit-image ships, as RGB uint8."""
    from pipeline.evaluation.samples import skimage_photo

    return np.asarray(skimage_photo(name))


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster shared by the integration tests."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray


from s3server import moto_server  # noqa: E402  (tests/s3server.py: the moto S3 endpoint)


@pytest.fixture()
def s3_server():
    with moto_server() as endpoint:
        yield endpoint


def restart_ray():
    """A fresh local Ray cluster of 2 CPUs (any running one shut down first), started now so that its
    workers inherit the environment as it is (e.g. a moto server's ``AWS_ENDPOINT_URL``). -> ``ray``."""
    import ray

    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs shared by the tests of one module."""
    ray = restart_ray()
    yield ray
    ray.shutdown()


NAMES = ["astronaut", "rocket", "coffee", "camera", "chelsea", "horse"]


def write_refs(root: Path, names: list[str]) -> Path:
    """Sample photos ``names`` as PNG references under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.fromarray(photo(n)).save(root / f"{n}.png")
    return root


@pytest.fixture()
def built(tmp_path, tiny_model_dir):
    """A 3-shard gallery of two banks (coffee in both, a non-image and a broken file rejected)."""
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.gallery.banks import Bank
    from pipeline.gallery.extract import local_extractor
    from pipeline.ingest.storage import open_store

    a = write_refs(tmp_path / "a", NAMES[:3])
    b = write_refs(tmp_path / "b", NAMES[2:4])  # coffee is in both banks
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    banks = [Bank("aa", str(a), "sensitive/x", "filter"), Bank("bb", str(b), "low_quality/spam", "downrank")]
    card = read_card(tiny_model_dir)
    store = open_store(str(tmp_path / "gal"), create=True)
    extract = local_extractor(str(tiny_model_dir))
    v, stats = G.build(store, banks, card, extract, n_shards=3)
    return store, card, extract, v, stats, tmp_path


def rocket_gallery(root: Path) -> str:
    """A gallery under ``root`` of one bank (``v``, sensitive, filter) holding the rocket photo
    (entry id 0), built with the shipped model. -> its folder."""
    from models.card import read_card
    from pipeline import gallery as G
    from pipeline.gallery.banks import Bank
    from pipeline.gallery.extract import local_extractor
    from pipeline.ingest.storage import open_store

    save_jpeg(photo("rocket"), root / "refs" / "rocket.jpg", quality=90)
    G.build(open_store(str(root / "gal"), create=True), [Bank("v", str(root / "refs"), "sensitive/x", "filter")],
            read_card(None), local_extractor(None), n_shards=2)
    return str(root / "gal")


def tiny_trainer(out: Path, images_dir: Path, **overrides):
    """A :class:`~models.training.Trainer` of a tiny ResNet-18 (64/48 px) for a few seconds of real
    training: one backbone epoch, two epochs per adapter, one cached view, no held-out split (tests
    that follow every epoch; early stopping is tested in models/training/test_trainer.py). ``overrides``: TrainConfig fields."""
    from models.descriptor import Backbone, DescriptorConfig
    from models.training import TrainConfig, Trainer

    overrides.setdefault("cache_views", 1)
    overrides.setdefault("epochs_backbone", 1)
    overrides.setdefault("model", DescriptorConfig(backbone=Backbone.RESNET18, high_res=64, low_res=48))
    overrides.setdefault("adapter_val_every", 0)
    cfg = TrainConfig(batch_size=8, synthetic_images=4, epochs_adapter1=2, epochs_adapter2=2, batch_size_adapters=16,
                      queue_size=16, distill_bank=32, background_photos=4, background_graphics=3, **overrides)
    return Trainer(images_dir, out, cfg, command="test")


@pytest.fixture()
def gen_images(tmp_path: Path) -> Path:
    """16 small generated pictures in a folder: a training set for tiny trainer tests."""
    import random

    from pipeline.evaluation.samples import procedural

    d = tmp_path / "imgs"
    d.mkdir()
    rng = random.Random(0)
    for i in range(16):
        procedural(rng, (96, 80)).save(d / f"{i}.png")
    return d
