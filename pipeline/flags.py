"""The recommender's import path for reading flags: ``from pipeline.flags import read_flags``.

The flags partition protocol lives in :mod:`pipeline.moderation.flags`; this module re-exports
what readers use, so that their import never moves.
"""

from pipeline.moderation.flags import RUN_JSON, SUCCESS, is_committed, partition_key, read_flags, read_run

__all__ = ["RUN_JSON", "SUCCESS", "is_committed", "partition_key", "read_flags", "read_run"]
