"""Reading object bytes by URI for manifest input: ``{"image_key", "uri"}`` -> ``bytes`` and ``read_error``.

A plain stage class like :class:`~pipeline.ingest.decode.Decoder`: state in ``__init__``, work in
``__call__(batch)``, exactly one output row per input row, never raises for one bad object.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import plain_message
from pipeline.ingest.storage import KeyPolicy, Store, open_store, split_uri
from pipeline.schemas import check_columns


class Fetcher:
    """Reads object bytes by URI; a missing/unreadable object becomes ``read_error`` (no raise).

    With a ``policy`` (manifest input) every local path is checked again at read time, after
    resolving symlinks: the driver already refused keys outside the allowed locations, and this
    closes the gap of a link created in between. A refused path is read as nothing.
    """

    def __init__(self, policy: KeyPolicy | None = None) -> None:
        self._stores: dict[str, Store] = {}
        self.policy = policy

    def _fetch(self, uri: str) -> bytes:
        if self.policy is not None and not uri.startswith("s3://"):
            uri = self.policy.resolve(uri)  # ForbiddenKey -> this object's read error
        if uri.startswith("s3://"):
            bucket = uri[5:].split("/", 1)[0]
            st = self._stores.get(bucket) or self._stores.setdefault(bucket, open_store("s3://" + bucket))
            return st.fs.open_input_stream(uri[5:]).read()
        st, name = split_uri(uri)
        return st.read_bytes(name)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        check_columns(batch, ["image_key", "uri"], "Fetcher")
        datas: list[bytes] = []
        errors: list[str | None] = []
        for uri in batch["uri"]:
            try:
                datas.append(self._fetch(str(uri)))
                errors.append(None)
            except Exception as e:
                datas.append(b"")
                errors.append(plain_message(e, 300))
        return {"image_key": np.asarray(batch["image_key"], dtype=object),
                "bytes": np.asarray(datas, dtype=object), "read_error": np.asarray(errors, dtype=object),
                "image_uri": np.asarray([str(u) for u in batch["uri"]], dtype=object)}  # kept for the signatures
