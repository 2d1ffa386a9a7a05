"""The ``modscan`` command and the Ray wiring: the layer above :mod:`pipeline` and :mod:`models`.

- ``cli.py``: the ``modscan`` entry point: the list of command modules, ``--debug``, ``main`` (errors, exit codes)
- ``commands/``: one module per sub-command or group of them, each registering its own parser
- ``runtime/``: the job's configuration, orchestration and Ray wiring (moderate, retro, waves)
- ``bench/``: the benchmarks of ``modscan bench``, one module each, and what they share
"""
