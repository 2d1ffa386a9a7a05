"""The sub-commands of ``modscan``: each module registers its parser(s) with ``add_parser(subparsers)``
and sets ``fn`` to the function that runs it (:mod:`jobs.cli` lists the modules).

- ``train_cmd.py``: ``train`` (the three training stages) and its ``--set`` parsing
- ``card_cmd.py``: ``card`` (verify a model and print its card)
- ``gallery_cmd.py``: ``gallery build|add|remove|export-hashes|info``
- ``moderate_cmd.py``: ``moderate``, ``nightly``, ``hourly``, ``backfill``
- ``demo.py``: ``demo`` (sample gallery and uploads, end to end)
- ``evaluate_cmd.py``: ``evaluate`` (copy-detection metrics, calibrated thresholds)
- ``bench_cmd.py``: ``bench``, the group registering the benchmarks of :mod:`jobs.bench`
- ``lookup_cmd.py``: ``lookup`` (why an image matched, or did not)
- ``review_cmd.py``: ``review apply`` (reviewers' decisions -> a gallery version)
- ``gpu_check.py``: ``gpu-check`` (smoke check of a node image on one GPU)
- ``retro_cmd.py``: ``retro`` (re-decide past days after a gallery change)
- ``hashes_cmd.py``: ``hashes fetch`` (a hash bank's list file from a hash-sharing exchange)
- ``waves_cmd.py``: ``waves`` (near-duplicate clusters among a partition's uploads)
"""
