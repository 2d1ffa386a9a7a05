"""Object storage behind one small interface: local folders and S3 (via ``pyarrow.fs``).

:func:`open_store` turns a URI (``/path``, ``file:///path``, ``s3://bucket/prefix``) into a
:class:`Store` rooted there. S3 honours ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), the
standard credential variables and ``AWS_REGION``; retries use the AWS standard strategy with
backoff. Keys are always relative to the root and validated so that no key can escape it.
"""

from __future__ import annotations

import builtins
import os
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs


class UnsafeKeyError(ValueError):
    """A key would escape the store root (absolute, ``..``, or empty segments)."""


def safe_key(key: str) -> str:
    """Normalise a relative key and refuse anything that could leave the root."""
    k = key.replace("\\", "/")
    if k.startswith("/") or "\x00" in k:
        raise UnsafeKeyError(f"key must be relative and printable: {key!r}")
    parts = [p for p in k.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise UnsafeKeyError(f"key escapes its root or is empty: {key!r}")
    return "/".join(parts)


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_filesystem(retries: int | None = None) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem honouring the AWS environment (endpoint, region, retries)."""
    endpoint = s3_endpoint()
    kwargs: dict = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(
            max_attempts=int(retries if retries is not None else os.environ.get("MODSCAN_S3_RETRIES", "8"))),
        "connect_timeout": float(os.environ.get("MODSCAN_S3_CONNECT_TIMEOUT", "5")),
        "request_timeout": float(os.environ.get("MODSCAN_S3_REQUEST_TIMEOUT", "30")),
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs["endpoint_override"] = host or endpoint
        kwargs["scheme"] = scheme if host else "https"
        kwargs["allow_bucket_creation"] = True
    return pafs.S3FileSystem(**kwargs)


@dataclass
class Store:
    """A root inside a filesystem. ``root`` has no trailing slash; keys are relative to it."""

    fs: pafs.FileSystem
    root: str
    uri: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, key: str = "") -> str:
        """Filesystem path of ``key``; ``""`` is the root itself (for listings)."""
        return self.root if key == "" else posixpath.join(self.root, safe_key(key))

    def _obj(self, key: str) -> str:
        """Path of an object: the key must name something strictly inside the root."""
        return posixpath.join(self.root, safe_key(key))

    def child(self, key: str) -> Store:
        k = safe_key(key)
        return Store(self.fs, posixpath.join(self.root, k), self.uri.rstrip("/") + "/" + k)

    def full_uri(self, key: str) -> str:
        return self.uri.rstrip("/") + "/" + safe_key(key)

    def exists(self, key: str) -> bool:
        return self.fs.get_file_info(self._obj(key)).type != pafs.FileType.NotFound

    def read_bytes(self, key: str) -> bytes:
        with self.fs.open_input_stream(self._obj(key)) as f:
            return f.read()

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomic for readers: local writes go to a temp name then ``os.replace``; an S3 PUT is
        atomic by itself (an object is either the old or the new one)."""
        p = self._obj(key)
        if self.is_local:
            os.makedirs(posixpath.dirname(p), exist_ok=True)
            tmp = posixpath.join(posixpath.dirname(p), f".tmp-{uuid.uuid4().hex}-{posixpath.basename(p)}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        else:
            with self.fs.open_output_stream(p) as f:
                f.write(data)

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def list(self, prefix: str = "", recursive: bool = True) -> Iterator[str]:
        """Keys (relative to the root) of the files under ``prefix``, sorted."""
        base = self.path(prefix) if prefix else self.root
        sel = pafs.FileSelector(base, recursive=recursive, allow_not_found=True)
        infos = [i for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File]
        for i in sorted(infos, key=lambda i: i.path):
            yield posixpath.relpath(i.path, self.root)

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:  # builtins: `list` here is the method above
        base = self.path(prefix) if prefix else self.root
        sel = pafs.FileSelector(base, recursive=False, allow_not_found=True)
        return sorted(posixpath.relpath(i.path, self.root) for i in self.fs.get_file_info(sel)
                      if i.type == pafs.FileType.Directory)

    def delete_dir(self, key: str) -> None:
        """Delete everything under ``key`` (an S3 "directory" is a prefix); absent is fine."""
        p = self.path(key)
        if self.fs.get_file_info(p).type == pafs.FileType.Directory:
            self.fs.delete_dir(p)

    def delete_file(self, key: str) -> None:
        try:
            self.fs.delete_file(self.path(key))
        except FileNotFoundError:  # absent is the state asked for
            pass

    def copy(self, src: str, dst: str) -> None:
        """Copy ``src`` to ``dst``, leaving ``src`` as it is: a hard link on local disk (no bytes
        copied; a file replaced later by :meth:`write_bytes` gets a new inode, so the two never
        change together), a plain copy where linking is refused; a server-side copy on S3."""
        if self.is_local:
            os.makedirs(posixpath.dirname(self.path(dst)), exist_ok=True)
            if os.path.lexists(self.path(dst)):
                os.remove(self.path(dst))
            try:
                os.link(self.path(src), self.path(dst))
            except OSError:  # a filesystem without hard links
                import shutil

                shutil.copyfile(self.path(src), self.path(dst))
        else:
            self.fs.copy_file(self.path(src), self.path(dst))

    def move(self, src: str, dst: str) -> None:
        """Rename on local disk; copy-then-delete on S3 (S3 has no rename)."""
        if self.is_local:
            os.makedirs(posixpath.dirname(self.path(dst)), exist_ok=True)
            os.replace(self.path(src), self.path(dst))
        else:
            self.fs.copy_file(self.path(src), self.path(dst))
            self.fs.delete_file(self.path(src))


def open_store(uri: str, *, create: bool = False, retries: int | None = None) -> Store:
    """``/abs/or/relative``, ``file://...`` or ``s3://bucket/prefix`` -> :class:`Store`
    (``retries``: S3 attempts per request, default ``$MODSCAN_S3_RETRIES`` or 8)."""
    if uri.startswith("s3://"):
        fs = s3_filesystem(retries)
        root = uri[len("s3://"):].rstrip("/")
        if not root:
            raise ValueError(f"S3 URI needs a bucket: {uri!r}")
        return Store(fs, root, "s3://" + root)
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    path = os.path.abspath(os.path.expanduser(path))
    if create:
        os.makedirs(path, exist_ok=True)
    return Store(pafs.LocalFileSystem(), path, path)


def split_uri(uri: str, retries: int | None = None) -> tuple[Store, str]:
    """A URI of one object -> (store of its folder, its name); ``retries`` as for :func:`open_store`."""
    if uri.startswith("s3://"):
        head, _, name = uri.rstrip("/").rpartition("/")
        return open_store(head, retries=retries), name
    p = os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)
    return open_store(os.path.dirname(p)), os.path.basename(p)


class ForbiddenKey(ValueError):
    """A manifest key that points outside every location the job may read."""


def _s3_location(uri: str) -> str | None:
    """``s3://bucket/a/b`` in canonical form, or None when a segment is ``.``, ``..`` or empty
    (S3 does not resolve them, HTTP clients may: such a key cannot be trusted to mean itself)."""
    rest = uri[len("s3://"):].rstrip("/")
    parts = rest.split("/")
    if not rest or any(p in ("", ".", "..") for p in parts):
        return None
    return "s3://" + rest


def _under(loc: str, prefix: str) -> bool:
    return loc == prefix or loc.startswith(prefix.rstrip("/") + "/")


@dataclass(frozen=True)
class KeyPolicy:
    """Where the keys of one manifest may point; decided before anything is read.

    * A relative key resolves under the manifest's folder (or S3 prefix) and may not contain a
      ``..`` segment.
    * An absolute path, ``file://`` or ``s3://`` URI is read only when it lies under the manifest's
      folder or under one of ``allowed`` (``[job] allowed_input_prefixes``).
    * Local paths are compared after resolving symlinks, so a link inside an allowed folder cannot
      lead out of it; any other URI scheme is refused.

    Why: a manifest is data written by someone else. Without these rules its author could make the
    job read, hash and thumbnail any file a worker can read (``/etc/...``, credentials, another
    tenant's bucket).
    """

    base: str                   # canonical manifest folder: realpath or s3://bucket/prefix
    allowed: tuple[str, ...] = ()

    @staticmethod
    def canonical(location: str) -> str:
        """A prefix from the configuration -> canonical form; ValueError when it cannot be one."""
        if location.startswith("s3://"):
            loc = _s3_location(location)
            if loc is None:
                raise ValueError(f"allowed input prefix {location!r} is not a clean s3://bucket/prefix")
            return loc
        path = location[len("file://"):] if location.startswith("file://") else location
        if "://" in path or not path.startswith("/"):
            raise ValueError(f"allowed input prefix {location!r} must be an absolute path or an s3:// URI")
        return os.path.realpath(path)

    @classmethod
    def for_manifest(cls, manifest_uri: str, allowed: tuple[str, ...] | list[str] = ()) -> KeyPolicy:
        st, _ = split_uri(manifest_uri)
        base = _s3_location(st.uri) if st.uri.startswith("s3://") else os.path.realpath(st.root)
        if base is None:
            raise ValueError(f"manifest location {manifest_uri!r} is not a clean s3://bucket/prefix")
        return cls(base, tuple(cls.canonical(p) for p in allowed))

    def _check(self, loc: str, key: str) -> str:
        if _under(loc, self.base) or any(_under(loc, p) for p in self.allowed):
            return loc
        raise ForbiddenKey(f"{key!r} lies outside the manifest's folder and [job] allowed_input_prefixes")

    def resolve(self, key: str) -> str:
        """The URI or path to read for ``key``; :class:`ForbiddenKey` when it may not be read."""
        if key.startswith("s3://"):
            loc = _s3_location(key)
            if loc is None:
                raise ForbiddenKey(f"{key!r} has an empty, '.' or '..' segment")
            return self._check(loc, key)
        if key.startswith("file://") or key.startswith("/"):
            path = key[len("file://"):] if key.startswith("file://") else key
            return self._check(os.path.realpath(path), key)
        if "://" in key:
            raise ForbiddenKey(f"{key!r} has an unsupported URI scheme (s3:// and local paths only)")
        if ".." in key.split("/"):
            raise ForbiddenKey(f"{key!r} leaves the manifest's folder ('..')")
        if self.base.startswith("s3://"):
            return self.base + "/" + key
        return self._check(os.path.realpath(posixpath.join(self.base, key)), key)


_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


def redact(text: str) -> str:
    """Remove credential values (from the environment) and ``user:password@`` URI parts."""
    import re

    out = re.sub(r"(://)[^/@\s]+:[^/@\s]+@", r"\1***@", str(text))
    for var in _SECRET_VARS:
        val = os.environ.get(var)
        if val and len(val) >= 4:
            out = out.replace(val, "***")
    return out


def resolve_key(manifest_uri: str, key: str) -> str:
    """Where a manifest key points (no policy check: see :class:`KeyPolicy`). Used by the review
    page for rows the job already read."""
    if key.startswith("s3://") or key.startswith("/"):
        return key
    st, _ = split_uri(manifest_uri)
    return st.uri.rstrip("/") + "/" + key
