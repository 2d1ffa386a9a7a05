"""The benchmarks of ``modscan bench``: one module per sub-command, each with its ``add_parser``
(registered by :mod:`jobs.commands.bench_cmd`), and what they share.

- ``common.py``: the machine line, Markdown tables, ``--photos``, best-of timing, realistic vectors
- ``search.py``: ``bench search`` (coarse stages against an exhaustive 512-d search)
- ``decode.py``: ``bench decode`` (the production decoder against a full decode)
- ``pipeline.py``: ``bench pipeline`` (the job end to end against the single-stage baseline)
- ``baseline.py``: the single-stage ``SingleStageModerator`` that ``bench pipeline`` runs against
- ``s3.py``: the S3 endpoint of ``bench pipeline``'s S3 run
- ``memory.py``: ``bench memory`` (what a gallery costs a node's memory, N actors)
- ``model.py``: ``bench model`` (what each pass of a model costs per image)
- ``retro.py``: ``bench retro`` (a retro pass against a full backfill)
- ``hashes.py``: ``bench hashes`` (PDQ list indexes, flat against multi-index hashing)
- ``pdq_input.py``: ``bench pdq-input`` (PDQ bits lost by each input size PDQ could be computed on)
- ``scale.py``: ``bench scale`` (precision at 10K-10M references on real pictures)
- ``resume.py``: ``bench resume`` (a rerun after a killed driver against a full run)
- ``waves.py``: ``bench waves`` (planted waves found by the real pass)
- ``job.py``: ``bench job`` (a day moderated against a gallery of millions, peak memory)
"""
