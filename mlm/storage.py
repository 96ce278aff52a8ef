"""Where every stage reads and writes: local paths and object-store URIs, one API.

A cluster has no shared disk, so a dataset, a run folder, checkpoints, a model directory
and predictions may live on an object store (`s3://bucket/key`, `gs://bucket/key`, any
scheme pyarrow.fs knows) as well as in a local folder. Every stage goes through these
functions; none opens a dataset, run or model path with `open()` itself.

Commit rules (nothing half written is ever taken for data):
* a file is written to a temporary name in its folder and then moved to its name
  (local: fsync + rename, atomic; object store: the temporary object, complete, is
  copied to its key, and an object appears whole or not at all);
* a folder is complete when its marker is there: a dataset's `manifest.json`, a model
  directory's `config.json`; markers are written last.

S3 endpoints and credentials come from the usual AWS variables (AWS_ENDPOINT_URL_S3,
AWS_ACCESS_KEY_ID, ...) in each process, Ray workers included.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class StorageError(OSError):
    """A path or URI that cannot be read or written; the message names it."""


def is_uri(path: str | os.PathLike) -> bool:
    """An object-store (or other remote) URI, as opposed to a local path / file:// URI."""
    s = str(path)
    return _URI.match(s) is not None and not s.startswith("file://")


def normalize(path: str | os.PathLike) -> str:
    """A URI as given (no trailing slash), a local path made absolute."""
    s = str(path)
    if is_uri(s):
        return s.rstrip("/")
    return os.path.abspath(s.removeprefix("file://"))


def join(base: str | os.PathLike, *parts: str) -> str:
    base = normalize(base)
    if is_uri(base):
        return "/".join([base, *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def name(path: str | os.PathLike) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def parent(path: str | os.PathLike) -> str:
    p = normalize(path)
    return p.rsplit("/", 1)[0] if is_uri(p) else os.path.dirname(p)


_FS_CACHE: dict[str, object] = {}


def resolve(path: str | os.PathLike):
    """(pyarrow filesystem, path inside it). Filesystems of URIs are cached per
    scheme and bucket (building an S3 filesystem costs a few ms)."""
    import pyarrow.fs as pafs

    p = normalize(path)
    if not is_uri(p):
        return pafs.LocalFileSystem(), p
    scheme, rest = p.split("://", 1)
    rest, _, query = rest.partition("?")
    bucket = rest.split("/", 1)[0]
    key = f"{scheme}://{bucket}" + (f"?{query}" if query else "")
    try:
        if key not in _FS_CACHE:  # the bucket alone: keys may hold characters URIs may not
            _FS_CACHE[key] = pafs.FileSystem.from_uri(key)[0]
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad URIs
        raise StorageError(f"cannot open {p}: {str(e).splitlines()[0]}") from None
    return _FS_CACHE[key], rest


def _info(path: str):
    fs, inner = resolve(path)
    try:
        return fs.get_file_info(inner)
    except OSError as e:
        raise StorageError(f"cannot reach {path}: {str(e).splitlines()[0]}") from None


def exists(path: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    return _info(str(path)).type != pafs.FileType.NotFound


def is_file(path: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    return _info(str(path)).type == pafs.FileType.File


def is_dir(path: str | os.PathLike) -> bool:
    """A local folder, or a URI prefix with something under it (object stores have no
    empty folders)."""
    import pyarrow.fs as pafs

    return _info(str(path)).type == pafs.FileType.Directory


def size(path: str | os.PathLike) -> int:
    return int(_info(str(path)).size)


def makedirs(path: str | os.PathLike) -> None:
    """A local folder (parents included); nothing to do on an object store."""
    if not is_uri(path):
        os.makedirs(normalize(path), exist_ok=True)


def list_names(folder: str | os.PathLike) -> list[str]:
    """Names of a folder's direct children (files and folders); [] when it is absent."""
    import pyarrow.fs as pafs

    fs, inner = resolve(folder)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    except OSError as e:
        raise StorageError(f"cannot list {folder}: {str(e).splitlines()[0]}") from None
    return sorted(i.base_name for i in infos)


def read_bytes(path: str | os.PathLike) -> bytes:
    fs, inner = resolve(path)
    try:
        with fs.open_input_stream(inner) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"no such file: {path}") from None
    except OSError as e:
        raise StorageError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def open_input_file(path: str | os.PathLike):
    """A random-access file (what pyarrow.parquet reads)."""
    fs, inner = resolve(path)
    try:
        return fs.open_input_file(inner)
    except FileNotFoundError:
        raise StorageError(f"no such file: {path}") from None
    except OSError as e:
        raise StorageError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def parquet_file(path: str | os.PathLike, page_checksums: bool = True):
    """A Parquet file for reading; only its footer is read here. With `page_checksums`,
    every data page that carries a CRC32 (shards are written with them) is checked as it
    is read, and a mismatch raises OSError; a file written without them reads as before."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(open_input_file(path), page_checksum_verification=page_checksums)


def _tmp_name(path: str) -> str:
    return join(parent(path), f".{name(path)}.tmp{os.getpid()}")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary name in the same folder, then commit
    it (see the module docstring): a reader sees the old file, or the whole new one."""
    p = normalize(path)
    if not is_uri(p):
        os.makedirs(os.path.dirname(p), exist_ok=True)
        tmp = _tmp_name(p)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        return
    fs, inner = resolve(p)
    _, tmp_inner = resolve(_tmp_name(p))
    try:
        with fs.open_output_stream(tmp_inner) as f:
            f.write(data)
        fs.move(tmp_inner, inner)
    except OSError as e:
        raise StorageError(f"cannot write {p}: {str(e).splitlines()[0]}") from None


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def output_file(path: str | os.PathLike) -> Iterator[str]:
    """A local file to write `path`'s content into; committed (renamed or uploaded)
    when the block ends without an error, removed otherwise."""
    p = normalize(path)
    if not is_uri(p):
        os.makedirs(os.path.dirname(p), exist_ok=True)
        tmp = _tmp_name(p)
        try:
            yield tmp
            os.replace(tmp, p)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return
    with tempfile.TemporaryDirectory(prefix="mlm-out-") as d:
        local = os.path.join(d, name(p))
        yield local
        upload_file(local, p)


def upload_file(local: str, dest: str | os.PathLike) -> None:
    """Copy a local file to `dest`, a path or URI (temporary name, then commit)."""
    dest = normalize(dest)
    makedirs(parent(dest))
    fs, inner = resolve(dest)
    _, tmp_inner = resolve(_tmp_name(dest))
    try:
        with open(local, "rb") as src, fs.open_output_stream(tmp_inner) as out:
            shutil.copyfileobj(src, out, 8 << 20)
        fs.move(tmp_inner, inner)
    except OSError as e:
        raise StorageError(f"cannot write {dest}: {str(e).splitlines()[0]}") from None


def delete(path: str | os.PathLike) -> None:
    """Remove a file or a folder with everything in it; nothing when it is absent."""
    import pyarrow.fs as pafs

    p = normalize(path)
    if not is_uri(p):
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.unlink(p)
        return
    fs, inner = resolve(p)
    kind = _info(p).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(inner)
    elif kind == pafs.FileType.File:
        fs.delete_file(inner)


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    fs, inner = resolve(path)
    try:
        with fs.open_input_stream(inner) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except FileNotFoundError:
        raise StorageError(f"no such file: {path}") from None
    return h.hexdigest()


def put_dir(local_dir: str | os.PathLike, dest: str | os.PathLike, marker: str | None = None,
            move: bool = False) -> str:
    """Copy a local folder to `dest`, replacing what was there. Local: copied beside it
    under a temporary name and renamed into place (with `move`, `local_dir` itself is
    renamed into place when it is on the same file system: no copy). Object store: the
    old objects are removed, then every file is uploaded, `marker` (e.g. config.json)
    last, so the folder counts as complete only once everything else is there."""
    dest = normalize(dest)
    local_dir = os.path.abspath(local_dir)
    if not is_uri(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = _tmp_name(dest)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if not move:
                raise OSError
            os.rename(local_dir, tmp)
        except OSError:  # not asked, or another file system
            shutil.copytree(local_dir, tmp)
        if os.path.exists(dest):
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        return dest
    delete(dest)
    files = sorted(str(p.relative_to(local_dir)) for p in Path(local_dir).rglob("*") if p.is_file())
    if marker in files:
        files = [f for f in files if f != marker] + [marker]
    for rel in files:
        upload_file(os.path.join(local_dir, rel), join(dest, *rel.split(os.sep)))
    return dest


def get_dir(src: str | os.PathLike, local_dir: str | os.PathLike) -> str:
    """Copy a folder (local or URI) to a new local folder `local_dir`."""
    import pyarrow.fs as pafs

    src = normalize(src)
    local_dir = os.path.abspath(local_dir)
    if not is_uri(src):
        shutil.copytree(src, local_dir)
        return local_dir
    fs, inner = resolve(src)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    files = [i for i in infos if i.type == pafs.FileType.File]
    if not files:
        raise StorageError(f"no such folder: {src}")
    for i in files:
        rel = i.path[len(inner):].lstrip("/")
        if any(part.startswith(".") and ".tmp" in part for part in rel.split("/")):
            continue  # an upload in progress
        target = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with fs.open_input_stream(i.path) as f, open(target, "wb") as out:
            shutil.copyfileobj(f, out, 8 << 20)
    return local_dir


@contextlib.contextmanager
def local_dir(path: str | os.PathLike) -> Iterator[str]:
    """A local folder with `path`'s content: the folder itself when it is local, a
    temporary copy (removed afterwards) when it is a URI."""
    p = normalize(path)
    if not is_uri(p):
        yield p
        return
    with tempfile.TemporaryDirectory(prefix="mlm-get-") as d:
        yield get_dir(p, os.path.join(d, name(p)))
