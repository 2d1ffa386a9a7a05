"""Hash signals: PDQ and MD5 of uploads, the hash lists of hash-sharing programs, and their indexes.

Most sensitive reference sets reach a platform as hash lists (NCMEC, StopNCII, GIFCT / Tech
Against Terrorism, ThreatExchange), never as images. This package is the self-contained core that
matches uploads against such lists, beside the copy-detection descriptor:

- :mod:`pipeline.signals.hashes`: an upload's signals, computed once per file: :func:`md5_hex` of
  the bytes, :func:`pdq_hex` / :func:`pdq_from_image` / :func:`pdq_from_bytes` (hex in
  ThreatExchange's convention), :func:`hamming`, the hex -> ``uint8[32]`` packing faiss binary
  indexes take, and the stage the job runs, :class:`~pipeline.signals.hashes.SignalDecoder` (the
  job's :class:`~pipeline.ingest.decode.Decoder` with MD5 and PDQ added, in the same decode);
- :mod:`pipeline.signals.lists`: reading and writing hash lists (ThreatExchange's plain signal
  file, ``<signal_type> <hash>`` per line, bare-hash files, and a CSV with
  ``hash[,entry_id][,metadata]``), exact duplicate lines dropped and counted, every other problem
  reported at its line, all at once (exit 2, like bank files);
- :mod:`pipeline.signals.index`: :class:`~pipeline.signals.index.PdqIndex` (flat up to a measured
  size, multi-index hashing beyond; exact at every distance; stored and memory-mapped) and
  :class:`~pipeline.signals.index.Md5Index` (exact); :mod:`pipeline.signals.multihash`: the
  multi-hash tables as plain numpy arrays.

Imports run one way: ``signals`` uses :mod:`pipeline.ingest` (decoding bounds, storage) and
:mod:`pipeline.errors` only; nothing in ``signals`` imports the gallery, the moderator or the
flags, which use it. Within the package: ``lists`` uses ``hashes``; ``index`` uses both and
``multihash``.
"""

from __future__ import annotations
