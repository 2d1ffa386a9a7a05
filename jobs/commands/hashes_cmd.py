"""``modscan hashes fetch``: write a hash bank's list file from a hash-sharing program's exchange.

Uses Meta's ``threatexchange`` library (BSD; the optional ``exchange`` extra: ``pip install
modscan[exchange]``), which has the clients of ThreatExchange (``fb_threatexchange``), NCMEC
(``ncmec``), StopNCII (``stop_ncii``), Tech Against Terrorism (``tat``) and a local-file exchange
(``local_file``: a signal file on disk, for tests and hand-made lists). Names are the library's
own ``SignalExchangeAPI.get_name()``.

``threatexchange`` requires ``faiss-cpu``, which must never sit beside ``faiss-gpu`` (they share the
``faiss`` module): install the extra only where modscan runs on CPU, or run the fetch as a step of
its own (its own virtual environment or container with ``modscan[cpu,exchange]``) that writes the
list file the GPU job then reads. The fetch needs nothing from the job but the output location.

Credentials are found the way ``threatexchange`` finds them (its ``CredentialHelper``: an
environment variable or a file in the home directory, named in the error when missing); modscan
never takes a secret on its command line. The collaboration's settings (``--collab KEY=VALUE``,
values parsed as JSON where they are JSON) are the fields of the exchange's own config class, e.g.
``filename=/path`` for ``local_file`` or ``environment=...`` for ``ncmec``.

Output: the signals of the bank's kind (``pdq``: ``PdqSignal``; ``md5``: ``VideoMD5Signal``, the
type program MD5s arrive as), sorted by hash, in the signal-file format (default) or as CSV with
each signal's fetched metadata (the program's ids, labels and opinions) as its ``metadata`` JSON;
written atomically to a local path or ``s3://`` URI, validated by the same reader the job uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import json
from typing import TYPE_CHECKING, Any

from pipeline.errors import ModscanError, UsageError

if TYPE_CHECKING:  # pipeline.signals.lists pulls torch and pyarrow: imported when a command runs
    from pipeline.signals.lists import HashEntry

# pipeline.signals.lists.KINDS, the bank kinds (``--kind``'s choices), kept here so that building the
# parser imports no list reader; tests/jobs/test_cli.py checks that the two agree
KINDS: tuple[str, ...] = ("pdq", "md5")

# get_name() -> (module, class) of the exchanges threatexchange ships
EXCHANGES = {
    "local_file": ("threatexchange.exchanges.impl.file_api", "LocalFileSignalExchangeAPI"),
    "fb_threatexchange": ("threatexchange.exchanges.impl.fb_threatexchange_api", "FBThreatExchangeSignalExchangeAPI"),
    "ncmec": ("threatexchange.exchanges.impl.ncmec_api", "NCMECSignalExchangeAPI"),
    "stop_ncii": ("threatexchange.exchanges.impl.stop_ncii_api", "StopNCIISignalExchangeAPI"),
    "tat": ("threatexchange.exchanges.impl.techagainstterrorism_api", "TATSignalExchangeAPI"),
}


def _need_threatexchange() -> None:
    try:
        importlib.import_module("threatexchange")
    except ImportError:
        raise UsageError("modscan hashes fetch needs the optional 'exchange' extra: pip install 'modscan[exchange]' "
                         "(threatexchange; it requires faiss-cpu: keep it out of a faiss-gpu environment)") from None


def exchange_class(name: str) -> Any:
    """The ``threatexchange`` SignalExchangeAPI class named ``name``; UsageError otherwise."""
    _need_threatexchange()
    if name not in EXCHANGES:
        raise UsageError(f"unknown exchange {name!r} (known: {sorted(EXCHANGES)})")
    mod, cls = EXCHANGES[name]
    return getattr(importlib.import_module(mod), cls)


def signal_type(kind: str) -> Any:
    """``threatexchange``'s SignalType class for a bank kind."""
    if kind not in KINDS:
        raise UsageError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if kind == "pdq":
        from threatexchange.signal_type.pdq.signal import PdqSignal

        return PdqSignal
    from threatexchange.signal_type.md5 import VideoMD5Signal

    return VideoMD5Signal


def parse_collab(pairs: list[str]) -> dict[str, Any]:
    """``["k=v", ...]`` -> dict; a value that parses as JSON is taken as JSON (numbers, lists, true)."""
    out: dict[str, Any] = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k.strip():
            raise UsageError(f"--collab takes KEY=VALUE, got {p!r}")
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _collab(api_cls: Any, name: str, fields: dict[str, Any]) -> Any:
    import dacite

    cfg_cls = api_cls.get_config_cls()
    data = {"name": name, "api": api_cls.get_name(), "enabled": True, **fields}
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"{api_cls.get_name()}: unknown collaboration setting(s) {unknown} (known: {sorted(known)})")
    try:
        return dacite.from_dict(cfg_cls, data, config=dacite.Config(cast=[enum.Enum, set, frozenset, tuple], strict=True))
    except (dacite.DaciteError, ValueError, TypeError) as e:
        raise UsageError(f"{api_cls.get_name()}: bad collaboration settings: {e}") from None


def _metadata(meta: Any) -> str | None:
    from pipeline.signals.lists import canonical_metadata

    if meta is None or not dataclasses.is_dataclass(meta) or isinstance(meta, type):
        return None
    d = dataclasses.asdict(meta)
    return canonical_metadata(json.loads(json.dumps(d, default=str, sort_keys=True))) if d else None


def fetch_entries(exchange: str, kind: str, collab: dict[str, Any] | None = None, name: str | None = None) -> list[HashEntry]:
    """Fetch every signal of ``kind`` from ``exchange`` (a full fetch, no checkpoint), sorted by hash,
    each with its fetched metadata. ModscanError for missing credentials or a failed fetch."""
    from pipeline.signals.lists import HashEntry

    api_cls = exchange_class(exchange)
    st = signal_type(kind)
    cfg = _collab(api_cls, name or exchange, collab or {})
    from threatexchange.exchanges import auth

    try:
        api = api_cls.for_collab(cfg)
        state: dict[Any, Any] = {}
        checkpoint = None
        for delta in api.fetch_iter([st], checkpoint):
            api_cls.naive_fetch_merge(state, delta.updates)
            checkpoint = delta.checkpoint
        by_type = api_cls.naive_convert_to_signal_type([st], cfg, state)
    except auth.SignalExchangeAPIMissingAuthException as e:
        raise ModscanError(f"{exchange}: no credentials: {e.pretty_str()}") from None
    except auth.SignalExchangeAPIInvalidAuthException as e:
        raise ModscanError(f"{exchange}: credentials refused: {e}") from None
    except (AssertionError, OSError) as e:
        raise ModscanError(f"{exchange}: fetch failed: {type(e).__name__}: {e}") from None
    signals = by_type.get(st, {})
    return [HashEntry(h.lower(), None, _metadata(m)) for h, m in sorted(signals.items(), key=lambda kv: kv[0].lower())]


def write_fetched(entries: list[HashEntry], kind: str, out: str, fmt: str = "signals") -> int:
    """Validate ``entries`` with the job's own list reader, then write them to ``out``; the count."""
    from pipeline.ingest.storage import split_uri
    from pipeline.signals.lists import format_csv, format_signal_file, parse_list

    text = format_signal_file(entries, kind) if fmt == "signals" else format_csv(entries, kind)
    parse_list(text, kind, f"<{out}>", fmt="csv" if fmt == "csv" else "signals", allow_empty=True)
    store, key = split_uri(out)
    store.write_text(key, text)
    return len(entries)


def cli_fetch(a: argparse.Namespace) -> int:
    entries = fetch_entries(a.exchange, a.kind, parse_collab(a.collab or []), a.name)
    if not entries and not a.allow_empty:
        raise ModscanError(f"{a.exchange}: no {a.kind} signals fetched (pass --allow-empty to write an empty list)")
    n = write_fetched(entries, a.kind, a.out, a.format)
    print(f"{n} {a.kind} hash(es) from {a.exchange} -> {a.out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``modscan hashes fetch`` (top-level sub-parsers of ``jobs/cli.py``)."""
    p = sub.add_parser("hashes", help="hash lists of hash-sharing programs (needs the 'exchange' extra)")
    hs = p.add_subparsers(dest="hcmd", required=True)
    q = hs.add_parser("fetch", help="write a hash bank's list file from a program's exchange (threatexchange)")
    q.add_argument("--exchange", required=True, choices=sorted(EXCHANGES))
    q.add_argument("--kind", required=True, choices=list(KINDS), help="the bank's kind: which signals to keep")
    q.add_argument("--collab", action="append", metavar="KEY=VALUE",
                   help="a setting of the exchange's collaboration config (repeatable), e.g. filename=/path/list.txt")
    q.add_argument("--name", default=None, help="collaboration name (default: the exchange's)")
    q.add_argument("--out", required=True, help="list file to write: local path or s3://bucket/key")
    q.add_argument("--format", choices=["signals", "csv"], default="signals",
                   help="signals: '<type> <hash>' lines; csv: hash,entry_id,metadata with the fetched metadata")
    q.add_argument("--allow-empty", action="store_true", help="write an empty list instead of failing")
    q.set_defaults(fn=cli_fetch)
