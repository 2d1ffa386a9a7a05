"""Measuring the descriptor and the cascade.

* :mod:`~pipeline.evaluation.evaluate` — ``modscan evaluate``: a built or prepared benchmark, the
  calibration (score normalisation, fine and coarse thresholds) and the report.
* :mod:`~pipeline.evaluation.retrieval_metrics` — µAP, recall at precision, operating points
  (DISC2021 conventions).
* :mod:`~pipeline.evaluation.samples` — the sample pictures of the demo, benchmarks and tests.
* :mod:`~pipeline.evaluation.train_monitor` — the stage-1 monitor of ``modscan train``.

Imports run one way: evaluation uses ``ingest`` and ``gallery`` (the job's own code paths) and is
imported only by ``jobs/``.
"""
