"""Which objects one run moderates: a prefix listing or a manifest, decided by the driver before Ray starts.

Every listed object and every manifest row gets exactly one flag row, except the names in
:data:`MARKER_NAMES` (and, when asked, names without an image extension), which are counted as
skipped. A manifest key outside the allowed locations (:class:`~pipeline.ingest.storage.KeyPolicy`)
is never read: it becomes a ``forbidden_key`` row. Plain domain logic, no Ray:
``jobs/runtime/ray_stages.py`` turns an :class:`InputPlan` into a Ray dataset.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from models.preprocess import IMAGE_SUFFIXES
from pipeline.errors import InputError, MissingInput, UsageError, plain_message
from pipeline.ingest.storage import ForbiddenKey, KeyPolicy, Store, open_store, redact, split_uri

MANIFEST_SUFFIXES = (".parquet", ".csv")

# The only listed objects that get no row: commit markers of this and other batch jobs, and
# folder placeholders / OS metadata that are never uploads. Anything else (``_DSC0001.JPG``,
# ``.hidden.jpg``) is an upload and gets a row; skipped names are counted in ``_run.json``.
MARKER_NAMES = ("_SUCCESS", "_run.json", ".DS_Store", ".keep", ".gitkeep")
KEY_COLUMNS = ("key", "image_key", "uri")


@dataclass
class InputPlan:
    """What a run reads: one flag row per entry of ``keys`` and of ``forbidden``, nothing else.

    ``read_uris[i]`` is what is read for ``keys[i]`` (prefix input: a path in ``store``; manifest:
    a URI or local path the :class:`~pipeline.ingest.storage.KeyPolicy` allowed). ``forbidden`` keys
    become ``forbidden_key`` rows written by the driver and are never read. ``skipped`` holds the
    listed names that get no row (:data:`MARKER_NAMES`, or non-image names with
    ``image_extensions_only``), by reason.
    """

    uri: str
    kind: str                                   # "prefix" | "manifest"
    keys: list[str]
    read_uris: list[str]
    forbidden: list[tuple[str, str]] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    store: Store | None = None                  # prefix input: the listed store
    policy: KeyPolicy | None = None             # manifest input

    @property
    def rows(self) -> int:
        return len(self.keys) + len(self.forbidden)

    def skipped_counts(self) -> dict[str, int]:
        return {reason: len(names) for reason, names in sorted(self.skipped.items()) if names}

    def readable(self, keep: Callable[[str], bool]) -> InputPlan:
        """This plan with only the readable keys ``keep`` accepts (what a resumed run still has to
        read), in the same order; no forbidden keys and nothing skipped (those are not read)."""
        pairs = [(k, u) for k, u in zip(self.keys, self.read_uris) if keep(k)]
        return InputPlan(self.uri, self.kind, [k for k, _ in pairs], [u for _, u in pairs],
                         store=self.store, policy=self.policy)


def is_manifest(uri: str) -> bool:
    """Whether ``uri`` names a manifest (by its suffix, :data:`MANIFEST_SUFFIXES`) rather than a prefix."""
    return uri.lower().endswith(MANIFEST_SUFFIXES)


def _read_key_table(uri: str) -> tuple[Any, bool]:
    """The manifest as an Arrow table (CSV: every key column as strings) -> (table, is CSV)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    st, name = split_uri(uri)
    try:
        if not st.exists(name):
            raise MissingInput(f"manifest {redact(uri)} does not exist")
        csv = name.lower().endswith(".csv")
        if csv:
            with st.fs.open_input_stream(st.path(name)) as f:
                table = pacsv.read_csv(
                    f, parse_options=pacsv.ParseOptions(ignore_empty_lines=False),
                    convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in KEY_COLUMNS},
                                                         strings_can_be_null=False, quoted_strings_can_be_null=False))
        else:
            with st.fs.open_input_file(st.path(name)) as f:
                table = pq.read_table(f)
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise MissingInput(f"manifest {redact(uri)} does not exist") from None
        raise InputError(f"manifest {redact(uri)} cannot be read: {plain_message(e, 300)}") from None
    return table, csv


def _key_problems(keys: list[str | None], csv: bool) -> tuple[str, dict[str, list[str]]]:
    """Every bad key by problem, numbered like the file (CSV: header = line 1) -> (unit, problems)."""
    where = (lambda i: i + 2) if csv else (lambda i: i + 1)
    unit = "line" if csv else "row"
    bad: dict[str, list[str]] = {}
    first_seen: dict[str, int] = {}
    for i, k in enumerate(keys):
        problem = None
        if k is None or not k.strip():
            problem = "blank key"
        elif k != k.strip():
            problem = "key with leading or trailing whitespace"
        elif any(ord(c) < 32 or ord(c) == 127 for c in k):
            problem = "key with a control character"
        elif k in first_seen:
            problem = f"duplicate of {unit} {where(first_seen[k])}"
        else:
            first_seen[k] = i
        if problem:
            bad.setdefault(problem, []).append(str(where(i)))
    return unit, bad


def read_manifest_keys(uri: str) -> list[str]:
    """Keys from a Parquet/CSV manifest: column ``key`` (or ``image_key``/``uri``), one per row.

    Keys are strings exactly as written (a CSV key ``007`` stays ``007``: no type inference). A
    blank, null or whitespace-padded key, a control character or a duplicate refuses the whole
    manifest with every bad line numbered (CSV: the header is line 1; Parquet: row numbers from
    1): a job that silently drops rows would report success for uploads it never looked at.
    """
    import pyarrow as pa

    table, csv = _read_key_table(uri)
    col = next((c for c in KEY_COLUMNS if c in table.column_names), None)
    if col is None:
        raise InputError(f"manifest {redact(uri)} needs a column 'key' (or 'image_key' / 'uri'); "
                         f"has {table.column_names}")
    arr = table.column(col)
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if pa.types.is_integer(arr.type):
        arr = arr.cast(pa.string())
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        raise InputError(f"manifest {redact(uri)}: column {col!r} has type {arr.type}; keys must be strings")
    keys = arr.to_pylist()
    unit, bad = _key_problems(keys, csv)
    if bad:
        n = sum(len(v) for v in bad.values())
        detail = "; ".join(f"{problem} at {unit}{'s' if len(v) > 1 else ''} {', '.join(v)}" for problem, v in bad.items())
        raise InputError(f"manifest {redact(uri)} refused, {n} bad key{'s' if n > 1 else ''}: {detail}")
    return keys


def open_input_store(uri: str) -> Store:
    """The input folder or prefix; :class:`MissingInput` when it (or its bucket) does not exist."""
    try:
        st = open_store(uri)
    except ValueError as e:
        raise UsageError(f"--input {uri!r}: {e}") from None
    try:
        kind = st.fs.get_file_info(st.root).type
        if kind == pafs.FileType.NotFound:
            if uri.startswith("s3://"):
                bucket = st.root.split("/", 1)[0]
                if st.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    raise MissingInput(f"input bucket s3://{bucket} does not exist")
                raise MissingInput(f"input prefix {redact(uri)} does not exist (no object under it)")
            raise MissingInput(f"input folder {uri} does not exist")
    except OSError as e:
        raise InputError(f"input {redact(uri)} cannot be read: {plain_message(e, 300)}") from None
    if kind == pafs.FileType.File:
        raise InputError(f"input {redact(uri)} is a file, not a folder or prefix "
                         f"(a manifest must end in {' or '.join(MANIFEST_SUFFIXES)})")
    return st


def _manifest_plan(uri: str, allowed_prefixes: tuple[str, ...]) -> InputPlan:
    keys = read_manifest_keys(uri)
    try:
        policy = KeyPolicy.for_manifest(uri, allowed_prefixes)
    except ValueError as e:
        raise UsageError(str(e)) from None
    plan = InputPlan(uri, "manifest", [], [], policy=policy)
    for k in keys:
        try:
            plan.read_uris.append(policy.resolve(k))
            plan.keys.append(k)
        except ForbiddenKey as e:
            plan.forbidden.append((k, str(e)))
    return plan


def _prefix_plan(uri: str, image_extensions_only: bool) -> InputPlan:
    st = open_input_store(uri)
    plan = InputPlan(uri, "prefix", [], [], store=st)
    try:
        listed = list(st.list())
    except OSError as e:
        raise InputError(f"input {redact(uri)} cannot be listed: {plain_message(e, 300)}") from None
    for k in listed:
        if posixpath.basename(k) in MARKER_NAMES:
            plan.skipped.setdefault("marker", []).append(k)
        elif image_extensions_only and not k.lower().endswith(IMAGE_SUFFIXES):
            plan.skipped.setdefault("not_an_image_extension", []).append(k)
        else:
            plan.keys.append(k)
            plan.read_uris.append(st.path(k))
    return plan


def check_input(uri: str, *, allowed_prefixes: tuple[str, ...] = (), image_extensions_only: bool = False,
                allow_empty: bool = False) -> InputPlan:
    """List the prefix or read the manifest, and decide every row before Ray starts.

    The keywords are the job config's ``allowed_input_prefixes``, ``image_extensions_only`` and
    ``allow_empty_input``. Fails with :class:`MissingInput` when the input does not exist and with
    :class:`InputError` when it holds nothing to moderate, unless ``allow_empty``: for a
    scheduler, "the uploads have not landed yet" must be a failure to retry, not a committed
    empty day.
    """
    plan = _manifest_plan(uri, allowed_prefixes) if is_manifest(uri) else _prefix_plan(uri, image_extensions_only)
    if plan.rows == 0 and not allow_empty:
        skipped = plan.skipped_counts()
        raise InputError(f"input {redact(uri)} has nothing to moderate"
                         + (f" (skipped: {json.dumps(skipped)})" if skipped else "")
                         + "; pass --allow-empty (or allow_empty_input = true) if an empty day is expected")
    return plan


def relative_key_rows(root: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A batch function for prefix input: ``{path, bytes}`` rows of the files read under ``root``
    -> the fetched-rows contract ``{image_key, bytes, read_error}``, keys relative to ``root``."""
    def relkey(batch: dict[str, Any]) -> dict[str, Any]:
        keys = [posixpath.relpath(str(p), root) for p in batch["path"]]
        return {"image_key": np.asarray(keys, dtype=object), "bytes": batch["bytes"],
                "read_error": np.asarray([None] * len(keys), dtype=object)}
    return relkey
