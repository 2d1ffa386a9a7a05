"""Getting uploads in: object storage, reading bytes, decoding.

* :mod:`~pipeline.ingest.storage` — one small store interface over local folders and S3
  (``pyarrow.fs``); key policies for manifest input.
* :mod:`~pipeline.ingest.fetch` — :class:`Fetcher`, bytes by URI for manifest input (a stage).
* :mod:`~pipeline.ingest.decode` — :class:`Decoder`, bounded decoding of every Pillow mode to the
  model's two squares, or a stable error code (a stage; never raises for a bad input).
* :mod:`~pipeline.ingest.plan` — which objects one run moderates (a prefix listing or a manifest),
  and the keys it refuses.

Imports run one way: nothing here imports from ``gallery``, ``moderation``, ``ops`` or ``evaluation``.
"""
