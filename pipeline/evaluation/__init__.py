"""Measuring the descriptor and the cascade.

* :mod:`~pipeline.evaluation.evaluate` — ``modscan evaluate``: runs the evaluation, from its parts:
  :mod:`~pipeline.evaluation.benchmark` (a built or prepared benchmark, its ground truth, the
  calibration and test halves, the features), :mod:`~pipeline.evaluation.calibrate` (score
  normalisation, fine and coarse thresholds, flag parity) and :mod:`~pipeline.evaluation.report`
  (test-half metrics, ``metrics.json``, predictions, the PR curve, ``report.md``, the card update).
* :mod:`~pipeline.evaluation.retrieval_metrics` — µAP, recall at precision, operating points
  (DISC2021 conventions).
* :mod:`~pipeline.evaluation.samples` — the sample pictures of the demo, benchmarks and tests.
* :mod:`~pipeline.evaluation.train_monitor` — the stage-1 monitor of ``modscan train``.

Imports run one way: evaluation uses ``ingest`` and ``gallery`` (the job's own code paths) and is
imported only by ``jobs/``; within it, ``benchmark`` <- ``calibrate`` <- ``report`` <- ``evaluate``.
"""
