"""Paths and URIs for every file the pipelines read or write, through pyarrow file systems.

A location is a local path (relative or absolute) or a URI such as ``file:///data/events``,
``s3://bucket/prefix`` or ``gs://bucket/prefix``. Local paths are resolved to absolute ones, so a
location stays valid when a Ray worker runs in another working directory.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow.fs as pafs


def has_scheme(location: str | Path) -> bool:
    return "://" in str(location)


def normalize(location: str | Path) -> str:
    """Return a URI unchanged, or a local path made absolute."""
    return str(location) if has_scheme(location) else str(Path(location).resolve())


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """Return the file system of a location and the path inside it."""
    return pafs.FileSystem.from_uri(normalize(location))


def join(location: str | Path, *parts: str) -> str:
    """Append path parts to a location, keeping its scheme."""
    base = normalize(location)
    if has_scheme(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def make_dirs(location: str | Path) -> None:
    filesystem, path = resolve(location)
    filesystem.create_dir(path, recursive=True)


def exists(location: str | Path) -> bool:
    filesystem, path = resolve(location)
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def read_text(location: str | Path) -> str:
    filesystem, path = resolve(location)
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode("utf-8")


def write_text(location: str | Path, text: str) -> None:
    filesystem, path = resolve(location)
    with filesystem.open_output_stream(path) as stream:
        stream.write(text.encode("utf-8"))


def upload_dir(local_dir: str | Path, location: str | Path) -> None:
    """Copy a local folder's files to a location."""
    filesystem, path = resolve(location)
    filesystem.create_dir(path, recursive=True)
    pafs.copy_files(str(Path(local_dir).resolve()), path, pafs.LocalFileSystem(), filesystem)


def download_dir(location: str | Path, local_dir: str | Path | None = None) -> Path:
    """Copy a folder from a location into a local folder (a new temporary one by default)."""
    local = Path(local_dir) if local_dir else Path(tempfile.mkdtemp(prefix="seqrec-"))
    local.mkdir(parents=True, exist_ok=True)
    filesystem, path = resolve(location)
    pafs.copy_files(path, str(local.resolve()), filesystem, pafs.LocalFileSystem())
    return local
