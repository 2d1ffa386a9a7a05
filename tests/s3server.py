"""A real S3 endpoint for the tests: a moto server on 127.0.0.1 (random port).

The tests reach S3 through the same code as production (boto3 and pyarrow's ``S3FileSystem``).
Needs the ``test`` extra (``moto[server]``); the fixtures in ``conftest.py`` use it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-value-xyz",
          "AWS_REGION": "us-east-1"}


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
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
