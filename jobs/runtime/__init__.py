"""The job's configuration, orchestration and Ray wiring, run by :mod:`jobs.commands`.

- ``job_config.py``: :class:`JobConfig`, the ``[job]`` table of a TOML file and its checks
- ``ray_stages.py``: Ray set-up and the fetch -> decode -> actors wiring of ``moderate`` and ``gallery build|add``
- ``ray_notices.py``: Ray's one known-harmless error line, kept out of ``modscan demo``'s output
- ``run.py``: one moderation run: the checks before Ray starts, the pipeline, the commit, ``_run.json``, the summary
- ``retro.py``: one retro run: past days re-decided after a gallery change
- ``waves.py``: one waves run: near-duplicate clusters among a committed partition's uploads
"""
