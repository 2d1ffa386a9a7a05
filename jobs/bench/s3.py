"""The S3 endpoint of ``modscan bench pipeline``'s S3 run: one given with ``--s3-endpoint``, or a
throwaway moto server on 127.0.0.1 when the ``bench`` extra (``moto[server]``) is installed.

Benchmark tooling only: the job never imports this module, and moto is imported only when a
server is started.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator

# moto accepts any credentials; boto3 and pyarrow need some to sign requests
MOTO_ENV = {"AWS_ACCESS_KEY_ID": "bench-key-id", "AWS_SECRET_ACCESS_KEY": "bench-secret-value", "AWS_REGION": "us-east-1"}


def moto_available() -> bool:
    """Whether a moto server can be started (``pip install 'modscan[bench]'``)."""
    return importlib.util.find_spec("moto") is not None


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """``env`` set in ``os.environ`` (so boto3, pyarrow and Ray workers started afterwards use it), restored on exit."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def s3_endpoint(url: str | None) -> Iterator[str]:
    """The S3 endpoint ``url`` (credentials from the usual AWS environment), or with ``url`` None a
    moto server on 127.0.0.1 (random port) with its own test credentials; ``AWS_ENDPOINT_URL`` is
    set for the duration. -> the endpoint URL."""
    if url is not None:
        with _environment({"AWS_ENDPOINT_URL": url}):
            yield url
        return
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        with _environment({**MOTO_ENV, "AWS_ENDPOINT_URL": endpoint}):
            yield endpoint
    finally:
        server.stop()
