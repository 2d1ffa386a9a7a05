"""``modscan moderate|nightly|hourly|backfill``: one day or hour, yesterday, the last full hour, or
a range of days or hours, one partition each.

The command-line side of :mod:`jobs.runtime.run`: flags -> :class:`~jobs.runtime.job_config.JobConfig`, input
templates with ``{date}`` (and ``{hour}`` for hours), and the backfill loop (resumable:
committed partitions are skipped, and an interrupted one resumes from its finished chunks).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
from typing import TYPE_CHECKING

from pipeline.errors import MissingInput, ModscanError, UsageError, plain_message

if TYPE_CHECKING:  # the job's config, the job and the flags pull torch, pandas and pyarrow: imported when run
    from jobs.runtime.job_config import JobConfig

log = logging.getLogger(__name__)


def _cfg(a: argparse.Namespace) -> JobConfig:
    from jobs.runtime.job_config import JobConfig

    return JobConfig.from_toml(a.config, batch_size=a.batch_size, actors=a.actors,
                               allow_empty_input=True if getattr(a, "allow_empty", False) else None)


def _from_template(template: str, part: str) -> str:
    """The input of partition ``part``: ``{date}`` filled in, and ``{hour}`` (``00``-``23``) for an hour."""
    from pipeline.moderation import flags as F

    dt, hour = F.split_partition(part)
    fields = {"date": dt} if hour is None else {"date": dt, "hour": f"{hour:02d}"}
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        what = "{date}" if hour is None else "{date} and {hour}"
        raise UsageError(f"--input-template {template!r}: only {what} can be filled in ({plain_message(e)})") from None


def _run(a: argparse.Namespace, input_uri: str, part: str, cfg: JobConfig | None = None) -> dict:
    """One partition with the job flags of ``a``; prints the summary. With ``[job] waves``, the
    committed partition's waves next (:func:`_waves_after`)."""
    from jobs.runtime.run import moderate, summary

    cfg = cfg or _cfg(a)
    info = moderate(input_uri, a.gallery, a.output, part, a.model, cfg, a.ray_address,
                    signatures_uri=a.signatures, restart=a.restart, allow_mixed_day=a.allow_mixed_day)
    print(summary(info))
    if cfg.waves:
        _waves_after(a, part, cfg)
    return info


def _waves_after(a: argparse.Namespace, part: str, cfg: JobConfig) -> None:
    """``modscan waves`` on the partition just committed (docs/waves.md). The flags are published
    whatever happens here; a failure says so and how to rerun only the waves."""
    from jobs.runtime.waves import summary_lines, waves
    from pipeline.moderation import flags as F

    try:
        print(summary_lines(waves(a.output, part, cfg, a.model, a.signatures, None, a.ray_address)))
    except Exception as e:
        day, hour = F.split_partition(part)
        again = f"modscan waves --output {a.output} --date {day}" + ("" if hour is None else f" --hour {hour}")
        raise ModscanError(f"flags of {F.partition_key(part)} are committed, but its waves failed "
                           f"({plain_message(str(e) if isinstance(e, ModscanError) else e)}): rerun `{again}`") from e


def cli_moderate(a: argparse.Namespace) -> int:
    from pipeline.moderation import flags as F

    dt = F.valid_date(a.date, "--date")
    _run(a, a.input, F.hour_partition(dt, a.hour) if a.hour is not None else dt)
    return 0


def cli_hourly(a: argparse.Namespace) -> int:
    """The last full hour (UTC), or ``--at``: one ``dt=D/hour=HH`` partition."""
    from pipeline.moderation import flags as F

    part = F.valid_partition(a.at, "--at") if a.at is not None else F.previous_hour()
    if not F.is_hourly(part):
        raise UsageError(f"--at {a.at!r} is not an hour in the form YYYY-MM-DDTHH (e.g. 2026-02-05T13)")
    _run(a, _from_template(a.input_template, part), part)
    return 0


def yesterday() -> str:
    """Yesterday's date (UTC), ``YYYY-MM-DD``: what ``nightly`` moderates by default."""
    return (_dt.datetime.now(_dt.UTC).date() - _dt.timedelta(days=1)).isoformat()


def cli_nightly(a: argparse.Namespace) -> int:
    from pipeline.moderation import flags as F

    dt = F.valid_date(a.date, "--date") if a.date is not None else yesterday()
    cfg = _cfg(a)
    info = _run(a, _from_template(a.input_template, dt), dt, cfg)
    if cfg.retro_days:  # the gallery changed since yesterday's run: re-check the last retro_days days
        from jobs.runtime.retro import nightly_retro, summary_lines

        for rep in nightly_retro(a.gallery, a.output, dt, info["gallery_version"], cfg, a.model, a.signatures,
                                 a.ray_address):
            print(summary_lines(rep))
    return 0


def backfill(input_template: str, gallery: str, output: str, date_from: str, date_to: str,
             model_dir: str | None = None, cfg: JobConfig | None = None, force: bool = False,
             ray_address: str | None = None, signatures_uri: str | None = None, restart: bool = False,
             allow_mixed_day: bool = False) -> dict[str, str]:
    """One partition per day, or per hour when ``date_from`` and ``date_to`` are hours
    (``YYYY-MM-DDTHH``); committed partitions are skipped unless ``force`` (resumable after a kill:
    the interrupted partition resumes from its finished chunks unless ``restart``).

    A partition whose input is missing is never committed (``"missing: ..."``); one that fails
    (``"failed: ..."``) does not stop the others. The caller reports both and exits non-zero.
    """
    from jobs.runtime.job_config import JobConfig
    from jobs.runtime.run import check_output, moderate, summary
    from pipeline.moderation import flags as F

    days = F.partition_range(date_from, date_to)
    _from_template(input_template, days[0])
    cfg = cfg or JobConfig()
    out = check_output(output)
    result: dict[str, str] = {}
    for dt in days:
        if F.is_committed(out, dt) and not force:
            result[dt] = "skipped (committed)"
        else:
            try:
                info = moderate(_from_template(input_template, dt), gallery, output, dt, model_dir, cfg, ray_address,
                                signatures_uri=signatures_uri, restart=restart, allow_mixed_day=allow_mixed_day)
                print(summary(info), flush=True)
                result[dt] = "done"
            except MissingInput as e:
                result[dt] = f"missing: {plain_message(str(e))}"
            except Exception as e:
                log.debug("backfill day %s failed", dt, exc_info=True)
                result[dt] = f"failed: {plain_message(str(e) if isinstance(e, ModscanError) else e)}"
    return result


def cli_backfill(a: argparse.Namespace) -> int:
    from pipeline.moderation import flags as F

    res = backfill(a.input_template, a.gallery, a.output, a.date_from, a.date_to, a.model, _cfg(a), a.force,
                   a.ray_address, a.signatures, a.restart, a.allow_mixed_day)
    for dt, s in res.items():
        print(f"{dt}: {s}")
    missing = [dt for dt, s in res.items() if s.startswith("missing")]
    failed = [dt for dt, s in res.items() if s.startswith("failed")]
    if missing or failed:
        unit = "hour(s)" if any(F.is_hourly(p) for p in res) else "day(s)"
        raise ModscanError(f"backfill incomplete: {len(missing)} {unit} with missing input "
                           f"({', '.join(missing) or '-'}), {len(failed)} failed ({', '.join(failed) or '-'}); "
                           f"nothing was committed for them, rerun the same command once they are fixed")
    return 0


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gallery", required=True, help="gallery root URI (local path or s3://bucket/prefix)")
    p.add_argument("--output", required=True, help="flags root URI; partitions go under dt=YYYY-MM-DD/ (hours: .../hour=HH/)")
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--config", default=None, help="TOML job config (see configs/moderate.toml)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--actors", type=int, default=None, help="feature/match actors (default: config)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: local or RAY_ADDRESS)")
    p.add_argument("--signatures", default=None, help="signatures root URI (default: OUTPUT/_signatures)")
    p.add_argument("--allow-empty", action="store_true",
                   help="commit an empty partition when the input holds nothing (default: fail, so a scheduler retries)")
    p.add_argument("--restart", action="store_true",
                   help="start the partition over: do not resume the finished chunks a killed run of it left")
    p.add_argument("--allow-mixed-day", action="store_true",
                   help="write a day partition next to hourly ones of that date, or an hour next to its day "
                        "(refused by default: a day-level reader reads the rows of both)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """moderate, nightly, hourly and backfill: the job, for one day or hour, yesterday, the last hour, or a range."""
    p = sub.add_parser("moderate", help="check one day (or hour) of uploads and write its flags partition")
    p.add_argument("--input", required=True, help="prefix (local/s3://) or a .parquet/.csv manifest of keys")
    p.add_argument("--date", required=True, help="partition date YYYY-MM-DD")
    p.add_argument("--hour", default=None, help="an hour of --date (00-23, UTC): write dt=D/hour=HH instead of the day")
    _add_job_args(p)
    p.set_defaults(fn=cli_moderate)

    p = sub.add_parser("nightly", help="moderate yesterday's uploads (idempotent)")
    p.add_argument("--input-template", required=True,
                   help="input URI with {date}, e.g. s3://uploads/{date}/ or manifests/{date}.parquet")
    p.add_argument("--date", default=None, help="default: yesterday (UTC)")
    _add_job_args(p)
    p.set_defaults(fn=cli_nightly)

    p = sub.add_parser("hourly", help="moderate the last full hour's uploads (UTC) into dt=D/hour=HH (idempotent)")
    p.add_argument("--input-template", required=True,
                   help="input URI with {date} and {hour}, e.g. s3://uploads/{date}/{hour}/")
    p.add_argument("--at", default=None, help="the hour YYYY-MM-DDTHH (default: the last full hour, UTC)")
    _add_job_args(p)
    p.set_defaults(fn=cli_hourly)

    p = sub.add_parser("backfill", help="moderate a range of days or hours, one partition each, resumable")
    p.add_argument("--input-template", required=True, help="input URI with {date} (and {hour} for a range of hours)")
    p.add_argument("--from", dest="date_from", required=True, help="YYYY-MM-DD, or YYYY-MM-DDTHH for hourly partitions")
    p.add_argument("--to", dest="date_to", required=True, help="YYYY-MM-DD, or YYYY-MM-DDTHH (same form as --from)")
    p.add_argument("--force", action="store_true", help="redo days that are already committed")
    _add_job_args(p)
    p.set_defaults(fn=cli_backfill)
