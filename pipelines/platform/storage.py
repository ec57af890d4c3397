"""One filesystem layer for local paths and ``s3://`` URIs.

Every stage reads and writes through these helpers, so the same code runs on a
laptop (local directories) and on a cluster (an S3 bucket or any S3-compatible
store such as SeaweedFS or MinIO). It wraps fsspec (s3fs for S3) rather than
re-implementing anything, and hands pyarrow / Ray Data a native pyarrow
filesystem.

S3 settings come from the usual AWS variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION,
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) or from :func:`configure_s3`, which CLI
flags call. Credentials are never logged and never written into repr/str or
exception text; messages only name the URI and the endpoint.

This module must not import ray: it is used inside Ray workers and also before
Ray starts (``check_readable`` / ``check_writable`` fail a job early).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "StorageError",
    "configure_s3",
    "s3_env_vars",
    "is_s3",
    "get_filesystem",
    "pyarrow_filesystem",
    "join",
    "exists",
    "makedirs",
    "list_files",
    "file_info",
    "read_bytes",
    "write_bytes",
    "read_text",
    "write_text",
    "open",
    "local_copy",
    "upload_dir",
    "download_dir",
    "remove",
    "check_readable",
    "check_writable",
]

# Timeouts for normal work: a slow-but-alive store still works, a dead one
# fails in tens of seconds instead of botocore's default minutes.
_CONNECT_TIMEOUT_S = 5
_READ_TIMEOUT_S = 60
_ATTEMPTS = 3
# Pre-flight checks must answer in seconds: one attempt, short timeouts.
_CHECK_CONNECT_TIMEOUT_S = 2
_CHECK_READ_TIMEOUT_S = 3
# ...and a hard cap on each pre-flight call, since botocore's timeouts are per
# socket operation (a server that accepts but never answers took 2-3x longer).
_CHECK_DEADLINE_S = 6


class StorageError(OSError):
    """A storage problem explained in one line (URI and cause, never credentials)."""


class StorageFull(StorageError):
    """The output's filesystem is full: one line saying where, and that a rerun finishes the rest."""


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, also as pyarrow words it ("[errno 28] No space left on device" with no errno set)."""
    return getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc)


@dataclass(frozen=True)
class S3Settings:
    """Resolved S3 settings. Secrets are excluded from repr so they cannot leak
    through logs or tracebacks that print this object."""

    endpoint_url: str | None = None
    region: str | None = None
    key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)


def configure_s3(
    endpoint_url: str | None = None,
    key: str | None = None,
    secret: str | None = None,
    region: str | None = None,
    token: str | None = None,
) -> None:
    """Override S3 settings (CLI flags call this); ``None`` keeps the current value.

    The values are exported as the standard AWS_* variables of this process, so
    that there is one source of truth: our helpers, botocore, pyarrow and the
    Ray workers started from this process (a local ``ray.init`` passes its
    environment down) all see the same endpoint and credentials. For a remote
    cluster, pass :func:`s3_env_vars` in the job's runtime_env instead.
    """
    if endpoint_url is not None:
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint_url
    if key is not None:
        os.environ["AWS_ACCESS_KEY_ID"] = key
        # A token belongs to one key pair: keep a stale one and every call fails.
        if token is None:
            os.environ.pop("AWS_SESSION_TOKEN", None)
    if secret is not None:
        os.environ["AWS_SECRET_ACCESS_KEY"] = secret
    if token is not None:
        os.environ["AWS_SESSION_TOKEN"] = token
    if region is not None:
        os.environ["AWS_REGION"] = region
        os.environ["AWS_DEFAULT_REGION"] = region


def _settings() -> S3Settings:
    env = os.environ.get
    return S3Settings(
        endpoint_url=env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL") or None,
        region=env("AWS_REGION") or env("AWS_DEFAULT_REGION") or None,
        key=env("AWS_ACCESS_KEY_ID") or None,
        secret=env("AWS_SECRET_ACCESS_KEY") or None,
        token=env("AWS_SESSION_TOKEN") or None,
    )


def s3_env_vars() -> dict[str, str]:
    """The AWS_* variables a Ray worker needs to reach the same store
    (for ``runtime_env={"env_vars": ...}`` on a remote cluster)."""
    names = (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_EC2_METADATA_DISABLED",
    )
    return {n: os.environ[n] for n in names if os.environ.get(n)}


def _public_endpoint(settings: S3Settings) -> str:
    """Endpoint for messages: without any user:password@ part."""
    if not settings.endpoint_url:
        return "AWS S3 (default endpoint)"
    u = urlsplit(settings.endpoint_url)
    return f"{u.scheme}://{u.hostname}" + (f":{u.port}" if u.port else "") + u.path.rstrip("/")


def _scrub(text: str, settings: S3Settings) -> str:
    """Defence in depth: blank out secrets should a library echo one back."""
    for secret in (settings.secret, settings.token):
        if secret and len(secret) >= 8:  # shorter ones are not real secrets; would garble text
            text = text.replace(secret, "***")
    return text


# --------------------------------------------------------------------------- URIs


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _split(uri) -> tuple[bool, str]:
    """(is_s3, path for the filesystem): 'bucket/key' for S3, absolute path locally."""
    uri = os.fspath(uri)
    if is_s3(uri):
        return True, uri[len("s3://") :].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        raise StorageError(f"unsupported URI scheme (use a local path or s3://): {uri}")
    return False, os.path.abspath(os.path.expanduser(uri))


def _to_uri(s3: bool, path: str) -> str:
    return "s3://" + path if s3 else path


def join(uri, *parts: str) -> str:
    """Join path parts with '/', for local paths and s3:// URIs alike."""
    out = os.fspath(uri)
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = out.rstrip("/") + "/" + part
    return out


# ------------------------------------------------------------------ filesystems


def _s3fs(settings: S3Settings, fast: bool = False):
    import s3fs  # imported lazily: local-only users need no S3 stack

    config = {
        "connect_timeout": _CHECK_CONNECT_TIMEOUT_S if fast else _CONNECT_TIMEOUT_S,
        "read_timeout": _CHECK_READ_TIMEOUT_S if fast else _READ_TIMEOUT_S,
        "retries": {"max_attempts": 1 if fast else _ATTEMPTS, "mode": "standard"},
    }
    if settings.endpoint_url:
        # S3-compatible stores (SeaweedFS, MinIO) serve buckets as paths; with a
        # host-name endpoint botocore would otherwise try bucket.host names.
        config["s3"] = {"addressing_style": "path"}
        # Only send checksums the S3 API requires: older S3-compatible servers
        # reject botocore's newer default CRC trailers.
        config["request_checksum_calculation"] = "when_required"
        config["response_checksum_validation"] = "when_required"
    fs = s3fs.S3FileSystem(
        key=settings.key,
        secret=settings.secret,
        token=settings.token,
        endpoint_url=settings.endpoint_url,
        client_kwargs={"region_name": settings.region or ("us-east-1" if settings.endpoint_url else None)},
        config_kwargs=config,
        # Jobs watch for new and changed files: never answer from a stale listing.
        use_listings_cache=False,
        # The pre-flight instance gets its own object, so its single-retry
        # setting below cannot leak into the cached instance used for real work.
        skip_instance_cache=fast,
    )
    if fast:
        fs.retries = 1  # s3fs retries on top of botocore (class default 5)
    return fs


def get_filesystem(uri) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path without scheme) for a local path or s3:// URI."""
    s3, path = _split(uri)
    if s3:
        return _s3fs(_settings()), path
    # auto_mkdir: writing a file creates its parent folders, as S3 does implicitly.
    return LocalFileSystem(auto_mkdir=True), path


def pyarrow_filesystem(uri):
    """(pyarrow.fs.FileSystem, path) for pyarrow / Ray Data readers and writers.

    For S3 this is pyarrow's native C++ S3FileSystem, not
    PyFileSystem(FSSpecHandler(s3fs)): against SeaweedFS both read and write
    Parquet correctly, but the native one moves data in C++ threads without the
    GIL, is what Ray Data expects and retries on, and pickles to Ray workers as
    plain settings, whereas the fsspec wrapper funnels every call through
    Python and s3fs's private event-loop thread (slow, and fragile after fork).
    """
    import pyarrow.fs as pafs

    s3, path = _split(uri)
    if not s3:
        return pafs.LocalFileSystem(), path
    st = _settings()
    kwargs = dict(
        access_key=st.key,
        secret_key=st.secret,
        session_token=st.token,
        region=st.region,
        connect_timeout=_CONNECT_TIMEOUT_S,
        request_timeout=_READ_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=_ATTEMPTS),
    )
    if st.endpoint_url:
        u = urlsplit(st.endpoint_url)
        kwargs.update(
            endpoint_override=u.netloc + u.path.rstrip("/"), scheme=u.scheme or "https", region=st.region or "us-east-1"
        )
    elif not st.region and path:
        # Real AWS without a configured region: ask where the bucket lives, as
        # pyarrow's own from_uri does; otherwise requests get redirected errors.
        with contextlib.suppress(Exception):
            kwargs["region"] = pafs.resolve_s3_region(path.split("/", 1)[0])
    if not st.key:
        kwargs.pop("access_key"), kwargs.pop("secret_key"), kwargs.pop("session_token")
    return pafs.S3FileSystem(**kwargs), path


# ---------------------------------------------------------------------- helpers


def exists(uri) -> bool:
    fs, path = get_filesystem(uri)
    return fs.exists(path)


def makedirs(uri) -> None:
    """Create a local folder (and parents). On S3 folders are implicit; only a
    missing bucket is created."""
    fs, path = get_filesystem(uri)
    fs.makedirs(path, exist_ok=True)


def list_files(uri, extensions=None, recursive: bool = True) -> list[str]:
    """Sorted files under ``uri`` as full URIs (s3://… for S3, absolute paths locally).

    ``extensions``: e.g. ``[".mp4", "avi"]``, case-insensitive; None keeps all.
    A ``uri`` naming a single file returns just that file.
    """
    fs, path = get_filesystem(uri)
    s3 = is_s3(uri)
    if extensions is not None:
        extensions = tuple("." + e.lower().lstrip(".") for e in extensions)
    if not fs.exists(path):
        return []
    found = fs.find(path, maxdepth=None if recursive else 1, withdirs=False, detail=True)
    out = []
    for name, info in found.items():
        # Some S3 stores list zero-byte "folder/" marker objects: they are not files.
        if info.get("type") != "file" or name.endswith("/"):
            continue
        if extensions is None or name.lower().endswith(extensions):
            out.append(_to_uri(s3, name))
    return sorted(out)


def file_info(uri) -> dict:
    """{'size', 'mtime', 'etag'} to notice new or changed files.

    mtime is epoch seconds (float); etag is the S3 ETag (None locally). On S3
    compare the etag: LastModified has only one-second resolution.
    """
    fs, path = get_filesystem(uri)
    info = fs.info(path)
    if is_s3(uri):
        modified = info.get("LastModified")
        etag = info.get("ETag")
        return {
            "size": int(info.get("size") or 0),
            "mtime": modified.timestamp() if modified is not None else None,
            "etag": etag.strip('"') if etag else None,
        }
    st = os.stat(path)
    return {"size": st.st_size, "mtime": st.st_mtime, "etag": None}


def read_bytes(uri) -> bytes:
    fs, path = get_filesystem(uri)
    return fs.cat_file(path)


def write_bytes(uri, data: bytes) -> None:
    fs, path = get_filesystem(uri)
    fs.pipe_file(path, bytes(data))


def read_text(uri, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_text(uri, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def open(uri, mode: str = "rb", **kwargs):  # noqa: A001 - mirrors builtins.open
    """File object for ``uri`` (use as a context manager)."""
    fs, path = get_filesystem(uri)
    return fs.open(path, mode, **kwargs)


@contextlib.contextmanager
def local_copy(uri) -> Iterator[str]:
    """Yield a local path with the file's content: local paths pass through,
    S3 objects are downloaded to a temporary file deleted afterwards (decoders
    such as decord and PyAV need a real file). The file name is kept so that
    readers that look at the extension still work."""
    s3, path = _split(uri)
    if not s3:
        yield path
        return
    fs, _ = get_filesystem(uri)
    tmp = tempfile.mkdtemp(prefix="cmd-s3-")
    try:
        local = os.path.join(tmp, os.path.basename(path) or "object")
        fs.get_file(path, local)
        yield local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def upload_dir(local_dir, uri) -> int:
    """Copy every file under ``local_dir`` to ``uri`` keeping relative paths;
    returns the number of files. Works for local destinations too."""
    fs, dest = get_filesystem(uri)
    count = sum(len(files) for _root, _dirs, files in os.walk(local_dir))
    if count:
        # fsspec's recursive put (a trailing "/" copies the folder's contents, whether or not
        # `dest` exists); s3fs sends the files concurrently.
        fs.put(os.path.join(os.fspath(local_dir), ""), dest + "/", recursive=True)
    return count


def download_dir(uri, local_dir) -> int:
    """Copy every file under ``uri`` into ``local_dir`` keeping relative paths;
    returns the number of files.

    Not fsspec's recursive get: some S3 stores list zero-byte "folder/" marker objects, which
    it would download as files; list_files skips them."""
    fs, src = get_filesystem(uri)
    count = 0
    for name in list_files(uri):
        rel = _split(name)[1][len(src) :].lstrip("/")
        dest = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        fs.get_file(_split(name)[1], dest)
        count += 1
    return count


def remove(uri, recursive: bool = False) -> None:
    """Delete a file (or a tree with ``recursive=True``); a missing path is fine."""
    fs, path = get_filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


# ------------------------------------------------------------ pre-flight checks


def _is_connection_error(exc: BaseException) -> bool:
    """True for 'could not talk to the endpoint' errors (botocore/aiohttp/timeouts)."""
    import asyncio

    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError
    from fsspec.exceptions import FSTimeoutError

    return isinstance(
        exc, (BotoConnectionError, HTTPClientError, FSTimeoutError, asyncio.TimeoutError, TimeoutError, ConnectionError)
    )


def _fast_call(fs, method: str, *args):
    """Run one s3fs coroutine under the pre-flight deadline."""
    from fsspec.asyn import sync
    from fsspec.exceptions import FSTimeoutError

    try:
        return sync(fs.loop, getattr(fs, method), *args, timeout=_CHECK_DEADLINE_S)
    except FSTimeoutError:
        raise FSTimeoutError(f"no answer within {_CHECK_DEADLINE_S} s") from None


def _s3_error(uri: str, exc: BaseException, what: str, st: S3Settings) -> StorageError:
    """Turn an s3fs/botocore exception into one readable, secret-free line."""
    endpoint = _public_endpoint(st)
    reason = _scrub(" ".join(str(exc).split()) or type(exc).__name__, st)
    if _is_connection_error(exc):
        msg = f"cannot reach S3 endpoint {endpoint} for {uri}: {reason}"
    elif isinstance(exc, PermissionError):
        msg = f"access denied to {uri} at {endpoint} (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY): {reason}"
    elif isinstance(exc, FileNotFoundError):
        msg = f"{what} not found: {uri}"
    else:
        msg = f"cannot access {uri} at {endpoint}: {type(exc).__name__}: {reason}"
    return StorageError(msg)


def check_readable(uri, what: str = "input") -> None:
    """Raise StorageError (one line) unless ``uri`` exists and can be read.
    Fast: a wrong S3 endpoint fails in seconds (one attempt, short timeouts)."""
    uri = os.fspath(uri)
    s3, path = _split(uri)
    if not s3:
        if not os.path.exists(path):
            raise StorageError(f"{what} not found: {uri}")
        if not os.access(path, os.R_OK):
            raise StorageError(f"{what} not readable (permission denied): {uri}")
        return
    st = _settings()
    fs = _s3fs(st, fast=True)
    try:
        _fast_call(fs, "_info", path)
    except Exception as exc:  # noqa: BLE001 - translated into one line
        raise _s3_error(uri, exc, what, st) from None


def check_writable(uri, what: str = "output") -> None:
    """Raise StorageError (one line) unless files can be created under ``uri``:
    writes and deletes a small probe object/file there (creating local folders)."""
    uri = os.fspath(uri)
    s3, path = _split(uri)
    probe = f".write-probe-{uuid.uuid4().hex}"
    if not s3:
        try:
            os.makedirs(path, exist_ok=True)
            with builtins.open(os.path.join(path, probe), "wb"):
                pass
            os.remove(os.path.join(path, probe))
        except OSError as exc:
            raise StorageError(f"cannot write {what} to {uri}: {exc.strerror or exc}") from None
        return
    st = _settings()
    fs = _s3fs(st, fast=True)
    bucket = path.split("/", 1)[0]
    try:
        _fast_call(fs, "_info", bucket)
    except Exception as exc:  # noqa: BLE001
        raise _s3_error(f"s3://{bucket}", exc, "bucket", st) from None
    try:
        _fast_call(fs, "_pipe_file", path + "/" + probe, b"")
        _fast_call(fs, "_rm_file", path + "/" + probe)
    except Exception as exc:  # noqa: BLE001
        raise _s3_error(uri, exc, what, st) from None
