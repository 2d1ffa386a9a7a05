"""Operating the system: explaining a decision, feeding reviewers' decisions back, the review
page and the job's Prometheus metrics.

* :mod:`~pipeline.ops.explain` — ``modscan lookup``: why an upload matched, or did not.
* :mod:`~pipeline.ops.review_decisions` — ``modscan review apply``: a reviewers' CSV -> one gallery version.
* :mod:`~pipeline.ops.review_page` — the self-contained HTML page of a run's flags.
* :mod:`~pipeline.ops.prometheus` — a run's ``_run.json`` rendered as Prometheus metrics.

Imports run one way: ``ops`` uses ``ingest``, ``gallery`` and ``moderation``; nothing imports ``ops``
but ``jobs/``.
"""
