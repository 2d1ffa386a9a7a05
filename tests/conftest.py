"""Shared fixtures. Tests that need ../shared/data skip with a clear reason where it is absent."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

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
    from models.descriptor import DescriptorConfig, DescriptorModel

    torch.manual_seed(0)
    cfg = DescriptorConfig(high_res=64, low_res=48)
    d = tmp_path_factory.mktemp("tiny_model")
    save_model(DescriptorModel(cfg).eval(), d, ModelCard(config=cfg, training={"note": "random init for tests"}))
    return d


@pytest.fixture(scope="session")
def shipped_model_dir() -> Path:
    from models.card import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "model.safetensors").exists():
        pytest.fail("the shipped model models/default/model.safetensors is missing")
    return DEFAULT_MODEL_DIR


def photo(name: str) -> "np.ndarray":
    """A photo scikit-image ships, as RGB uint8."""
    from jobs.demo import skimage_photo

    return np.asarray(skimage_photo(name))


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster shared by the integration tests."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-value-xyz",
          "AWS_REGION": "us-east-1"}


@contextlib.contextmanager
def moto_server():
    """A real S3 HTTP endpoint (moto server on 127.0.0.1, random port); sets the AWS environment
    for boto3, pyarrow and Ray workers started afterwards, and restores it on exit."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture()
def s3_server():
    with moto_server() as endpoint:
        yield endpoint
