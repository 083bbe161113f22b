"""The one place that writes run artifacts: atomically, to a local path or a `s3://`/`gs://` URI.

Local files are written to a temporary file in the same directory and renamed into place, so a crash
never leaves a half-written output that a resumed run would mistake for a finished one. Object stores
(through `pyarrow.fs`) make an object visible only when its upload completes, which gives the same
guarantee. Every stage writes through these functions, never with a bare `open(path, "w")`.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

_REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "file://")


def is_uri(path: str | Path) -> bool:
    return str(path).startswith(_REMOTE_SCHEMES)


def absolute(path: str | Path) -> str:
    """A local path made absolute against the current directory (URIs and "" unchanged).

    The driver resolves paths once: Ray workers and actors run in other working directories.
    """
    text = str(path)
    if not text or is_uri(text):
        return text
    return os.path.abspath(text)


def join(base: str | Path, *parts: str) -> str:
    """Join path parts for local paths and URIs alike.

    A URI's query string (`s3://bucket/run?endpoint_override=host:9000`, which pyarrow reads as
    filesystem options) stays at the end, after the joined parts.
    """
    if is_uri(base):
        location, mark, query = str(base).partition("?")
        return "/".join([location.rstrip("/"), *parts]) + mark + query
    return str(Path(base, *parts))


def _filesystem(uri: str):
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri)
    return filesystem, path


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb", fsync: bool = True) -> Iterator[IO]:
    """Open `path` for writing; the file appears under its name only if the block succeeds.

    `fsync=False` skips flushing to disk before the rename: for thousands of small files that a rerun
    can regenerate (the synthetic set), where complete-or-absent is all that matters.
    """
    if is_uri(path):
        filesystem, inner = _filesystem(str(path))
        filesystem.create_dir(inner.rsplit("/", 1)[0], recursive=True)
        buffer = io.BytesIO()
        text = "b" not in mode
        handle = io.TextIOWrapper(buffer, encoding="utf-8", write_through=True) if text else buffer
        yield handle
        with filesystem.open_output_stream(inner) as stream:
            stream.write(buffer.getvalue())
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> None:
    with atomic_open(path, "wb", fsync=fsync) as handle:
        handle.write(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log (the only non-atomic write: a log may lose its last line, never more)."""
    if is_uri(path):
        previous = read_bytes(path).decode("utf-8") if exists(path) else ""
        write_text(path, previous + line.rstrip("\n") + "\n")
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Compressed .npz; the bytes are built in memory, then written atomically."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def write_parquet(path: str | Path, table) -> None:
    """A pyarrow Table (or a list of row dicts) as Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pylist(list(table))
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    write_bytes(path, buffer.getvalue().to_pybytes())


_CHECKED: set[str] = set()  # run roots this process has already checked


def check_storage(out: str | Path) -> None:
    """Refuse a remote `--out` that cannot be written, before any work starts (exit 2 naming it).

    A local folder is created on demand. For a URI: its query string must be one pyarrow understands
    (`?endpoint_override=host:port&scheme=http` and the like), S3 credentials must be configured, the
    bucket must exist and a small object must be writable there (then deleted). The endpoint of an
    S3-compatible store comes from AWS_ENDPOINT_URL (or the URI's `?endpoint_override=`), read by
    pyarrow. Each root is checked once per process.
    """
    from cse_ray.errors import UserError

    out = str(out)
    if not is_uri(out) or out.startswith("file://") or out in _CHECKED:
        return
    from pyarrow import fs

    try:
        filesystem, inner = _filesystem(out)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0][:300]
        what = "its query string is not understood" if "?" in out and "query" in reason.lower() else \
            "not a storage URI pyarrow can open"
        raise UserError(f"--out {out}: {what} ({reason})") from None
    if out.startswith("s3://") and "anonymous=true" not in out.partition("?")[2]:
        missing = missing_aws_credentials()
        if missing:
            raise UserError(f"--out {out}: no AWS credentials: {missing}")
    bucket = inner.split("/", 1)[0]
    try:
        found = filesystem.get_file_info(bucket).type != fs.FileType.NotFound
    except (OSError, ValueError) as err:
        raise UserError(f"--out {out}: cannot reach the storage ({str(err).splitlines()[0][:300]}); "
                        "check the credentials and AWS_ENDPOINT_URL") from None
    if not found:
        raise UserError(f"--out {out}: the bucket '{bucket}' does not exist (create it first)")
    probe = join(out, ".cse-ray-write-check")
    try:
        write_bytes(probe, b"")
        remove(probe)
    except OSError as err:
        raise UserError(f"--out {out}: cannot write to the bucket '{bucket}' "
                        f"({str(err).splitlines()[0][:300]}); check the credentials' permissions") from None
    _CHECKED.add(out)


def missing_aws_credentials() -> str:
    """Why the AWS SDK's credential chain would find nothing here ("" when it can find something).

    Without credentials the SDK sends unsigned requests: a real store refuses them with an unclear
    "access denied" half-way through a run, and a permissive S3-compatible server accepts them. The
    chain: the AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY variables, a profile in the shared files
    (~/.aws/credentials, ~/.aws/config, AWS_PROFILE), web identity or container credentials, then
    the EC2 instance metadata, which only the SDK can ask (unless AWS_EC2_METADATA_DISABLED=true).
    """
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return ""
    if any(env.get(name) for name in ("AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                                      "AWS_CONTAINER_CREDENTIALS_FULL_URI")):
        return ""
    home = Path(env.get("HOME") or "~").expanduser()
    shared = [Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials"),
              Path(env.get("AWS_CONFIG_FILE") or home / ".aws" / "config")]
    if any(path.is_file() and path.stat().st_size for path in shared):
        return ""
    if env.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true":
        return ""  # an instance role may provide them: the SDK asks the metadata service
    if env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_SECRET_ACCESS_KEY"):
        return "only one of AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY is set"
    return ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile in ~/.aws/credentials "
            "(the instance metadata is off: AWS_EC2_METADATA_DISABLED=true)")


def exists(path: str | Path) -> bool:
    if is_uri(path):
        from pyarrow import fs

        filesystem, inner = _filesystem(str(path))
        return filesystem.get_file_info(inner).type != fs.FileType.NotFound
    return Path(path).exists()


def is_dir(path: str | Path) -> bool:
    """A local directory, or a URI prefix holding at least one object (object stores have no folders)."""
    if is_uri(path):
        from pyarrow import fs

        filesystem, inner = _filesystem(str(path))
        return filesystem.get_file_info(inner).type == fs.FileType.Directory
    return Path(path).is_dir()


def list_files(folder: str | Path) -> set[str]:
    """Names of the finished files directly in `folder`, in one listing (temp files start with '.');
    empty when the folder does not exist. Object stores answer one request per listing, not per file."""
    if is_uri(folder):
        from pyarrow import fs

        filesystem, inner = _filesystem(str(folder))
        infos = filesystem.get_file_info(fs.FileSelector(inner, allow_not_found=True))
        names = [info.base_name for info in infos if info.type == fs.FileType.File]
    else:
        try:
            names = [entry.name for entry in os.scandir(folder) if entry.is_file()]
        except FileNotFoundError:
            return set()
    return {name for name in names if not name.startswith(".")}


def remove(path: str | Path) -> None:
    """Delete one file, local or remote; nothing happens when it does not exist."""
    if is_uri(path):
        filesystem, inner = _filesystem(str(path))
        try:
            filesystem.delete_file(inner)
        except FileNotFoundError:
            pass
        return
    Path(path).unlink(missing_ok=True)


def read_bytes(path: str | Path) -> bytes:
    if is_uri(path):
        filesystem, inner = _filesystem(str(path))
        with filesystem.open_input_stream(inner) as stream:
            return stream.read()
    return Path(path).read_bytes()


@contextmanager
def local_copy(path: str | Path) -> Iterator[str]:
    """A local file with the content of `path`: the path itself, or a temporary download of a URI."""
    if not is_uri(path):
        yield str(path)
        return
    fd, tmp = tempfile.mkstemp(suffix=Path(str(path).partition("?")[0]).suffix or ".bin")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(read_bytes(path))
        yield tmp
    finally:
        Path(tmp).unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    """The file's sha256, read in blocks (checkpoints are hundreds of MB), local or remote."""
    import hashlib

    digest = hashlib.sha256()
    if is_uri(path):
        filesystem, inner = _filesystem(str(path))
        handle = filesystem.open_input_stream(inner)
    else:
        handle = open(path, "rb")
    with handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | Path) -> Any:
    return json.loads(read_bytes(path).decode("utf-8"))
