"""Moderating a day: the Moderator stage, the flood guard and the flags partition commit.

* :mod:`~pipeline.moderation.moderator` — :class:`Moderator`, decoded batches -> flag rows
  (features, the cascade over the gallery, the bank rules).
* :mod:`~pipeline.moderation.floodguard` — holds a reference that matches far more uploads than a
  real one should.
* :mod:`~pipeline.moderation.flags` — staged -> verified -> committed writes of one ``dt=``
  partition, the run lock, and :func:`read_flags` for the recommender (also importable as
  ``pipeline.flags``).

Imports run one way: ``ingest`` <- ``gallery`` <- ``moderation``; nothing here imports ``ops`` or
``evaluation``.
"""
