"""``modscan moderate|nightly|backfill``: one day, yesterday, or a range of days, one partition each.

The command-line side of :mod:`jobs.run`: flags -> :class:`~jobs.job_config.JobConfig`, input
templates with ``{date}``, and the backfill loop (resumable: committed days are skipped).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging

from jobs.job_config import JobConfig
from jobs.run import check_output, moderate, summary
from pipeline.errors import MissingInput, ModscanError, UsageError, plain_message
from pipeline.moderation import flags as F

log = logging.getLogger(__name__)


def _cfg(a: argparse.Namespace) -> JobConfig:
    return JobConfig.from_toml(a.config, batch_size=a.batch_size, actors=a.actors,
                               allow_empty_input=True if getattr(a, "allow_empty", False) else None)


def _from_template(template: str, dt: str) -> str:
    try:
        return template.format(date=dt)
    except (KeyError, IndexError, ValueError) as e:
        raise UsageError(f"--input-template {template!r}: only {{date}} can be filled in ({plain_message(e)})") from None


def cli_moderate(a: argparse.Namespace) -> int:
    dt = F.valid_date(a.date, "--date")
    info = moderate(a.input, a.gallery, a.output, dt, a.model, _cfg(a), a.ray_address, signatures_uri=a.signatures,
                    restart=a.restart)
    print(summary(info))
    return 0


def yesterday() -> str:
    """Yesterday's date (UTC), ``YYYY-MM-DD``: what ``nightly`` moderates by default."""
    return (_dt.datetime.now(_dt.UTC).date() - _dt.timedelta(days=1)).isoformat()


def cli_nightly(a: argparse.Namespace) -> int:
    dt = F.valid_date(a.date, "--date") if a.date is not None else yesterday()
    cfg = _cfg(a)
    info = moderate(_from_template(a.input_template, dt), a.gallery, a.output, dt, a.model, cfg, a.ray_address,
                    signatures_uri=a.signatures, restart=a.restart)
    print(summary(info))
    if cfg.retro_days:  # the gallery changed since yesterday's run: re-check the last retro_days days
        from jobs.retro import nightly_retro, summary_lines

        for rep in nightly_retro(a.gallery, a.output, dt, info["gallery_version"], cfg, a.model, a.signatures,
                                 a.ray_address):
            print(summary_lines(rep))
    return 0


def backfill(input_template: str, gallery: str, output: str, date_from: str, date_to: str,
             model_dir: str | None = None, cfg: JobConfig | None = None, force: bool = False,
             ray_address: str | None = None, signatures_uri: str | None = None, restart: bool = False) -> dict[str, str]:
    """One partition per day; committed days are skipped unless ``force`` (resumable after a kill).

    A day whose input is missing is never committed (``"missing: ..."``); a day that fails
    (``"failed: ..."``) does not stop the others. The caller reports both and exits non-zero.
    """
    days = F.day_range(date_from, date_to)
    _from_template(input_template, date_from)
    cfg = cfg or JobConfig()
    out = check_output(output)
    result: dict[str, str] = {}
    for dt in days:
        if F.is_committed(out, dt) and not force:
            result[dt] = "skipped (committed)"
        else:
            try:
                info = moderate(_from_template(input_template, dt), gallery, output, dt, model_dir, cfg, ray_address,
                                signatures_uri=signatures_uri, restart=restart)
                print(summary(info), flush=True)
                result[dt] = "done"
            except MissingInput as e:
                result[dt] = f"missing: {plain_message(str(e))}"
            except Exception as e:
                log.debug("backfill day %s failed", dt, exc_info=True)
                result[dt] = f"failed: {plain_message(str(e) if isinstance(e, ModscanError) else e)}"
    return result


def cli_backfill(a: argparse.Namespace) -> int:
    res = backfill(a.input_template, a.gallery, a.output, a.date_from, a.date_to, a.model, _cfg(a), a.force,
                   a.ray_address, a.signatures, a.restart)
    for dt, s in res.items():
        print(f"{dt}: {s}")
    missing = [dt for dt, s in res.items() if s.startswith("missing")]
    failed = [dt for dt, s in res.items() if s.startswith("failed")]
    if missing or failed:
        raise ModscanError(f"backfill incomplete: {len(missing)} day(s) with missing input "
                           f"({', '.join(missing) or '-'}), {len(failed)} failed ({', '.join(failed) or '-'}); "
                           f"nothing was committed for them, rerun the same command once they are fixed")
    return 0
