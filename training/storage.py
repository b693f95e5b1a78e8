"""Where a run directory lives: a pyarrow filesystem and a path on it (local disk, NFS, S3, GCS).

Training is handed a `StorageDir`; it never parses URIs or reads credentials
(cluster/storage.py resolves `output.storage` into one). Ray Train writes the
checkpoints through the same filesystem. The run's own files (job.yaml,
metrics.jsonl, export/, report/) are staged on local disk and uploaded whole:
object stores have no append and no rename. On a local filesystem staging is
the run directory itself, so nothing is copied.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs


def write_whole(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path` and rename it over `path`: a crash mid-write leaves the
    old file or the new one, never a cut one that a resumed run would then fail to read."""
    written = path.with_name(f".{path.name}.tmp")
    written.write_text(text, encoding="utf-8")
    written.replace(path)


@dataclass(frozen=True)
class StorageDir:
    """A directory on a filesystem. Picklable: it travels to Ray Train workers."""

    filesystem: pafs.FileSystem
    path: str  # on the filesystem: "/abs/dir" locally, "bucket/prefix/..." on S3 or GCS
    uri: str  # as a user would write it (messages, tunefleet.json, `tunefleet export`)

    @classmethod
    def local(cls, path: str | Path) -> "StorageDir":
        resolved = str(Path(path).expanduser().resolve())
        return cls(pafs.LocalFileSystem(), resolved, resolved)

    def child(self, *parts: str) -> "StorageDir":
        relative = "/".join(p.strip("/") for p in parts if p)
        if not relative:
            return self
        return StorageDir(self.filesystem, f"{self.path.rstrip('/')}/{relative}", f"{self.uri.rstrip('/')}/{relative}")

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def local_path(self) -> Path | None:
        """The directory as a local path when the filesystem is local (no staging needed)."""
        return Path(self.path) if isinstance(self.filesystem, pafs.LocalFileSystem) else None

    def _at(self, relative: str) -> str:
        return f"{self.path.rstrip('/')}/{relative}" if relative else self.path

    def exists(self, relative: str = "") -> bool:
        return self.filesystem.get_file_info(self._at(relative)).type != pafs.FileType.NotFound

    def read_bytes(self, relative: str) -> bytes:
        with self.filesystem.open_input_stream(self._at(relative)) as stream:
            return stream.read()

    def read_text(self, relative: str) -> str:
        return self.read_bytes(relative).decode("utf-8")

    def write_text(self, relative: str, text: str) -> None:
        """Whole or not at all: an object store's put already is; on a local disk the text goes to a temporary
        file that is renamed over the target, so a crash mid-write never leaves job.yaml or tracking.json cut."""
        target = self._at(relative)
        self.filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
        if self.local_path is not None:
            write_whole(Path(target), text)
            return
        with self.filesystem.open_output_stream(target) as stream:
            stream.write(text.encode("utf-8"))

    def list_dirs(self, relative: str = "") -> list["StorageDir"]:
        """Immediate subdirectories, sorted by name."""
        if not self.exists(relative):
            return []
        infos = self.filesystem.get_file_info(pafs.FileSelector(self._at(relative)))
        base = self.child(relative)
        return sorted((base.child(i.base_name) for i in infos if i.type == pafs.FileType.Directory), key=lambda d: d.path)

    def files(self) -> dict[str, int]:
        """Every file below this directory: relative path -> size in bytes."""
        if not self.exists():
            return {}
        infos = self.filesystem.get_file_info(pafs.FileSelector(self.path, recursive=True))
        prefix = self.path.rstrip("/") + "/"
        return {i.path[len(prefix):]: i.size for i in infos if i.type == pafs.FileType.File}

    def delete(self, relative: str = "") -> None:
        target = self._at(relative)
        info = self.filesystem.get_file_info(target)
        if info.type == pafs.FileType.Directory:
            self.filesystem.delete_dir(target)
        elif info.type == pafs.FileType.File:
            self.filesystem.delete_file(target)

    def upload(self, local: Path, relative: str) -> None:
        """Replace `relative` (a file or a directory) with the local one."""
        local = Path(local)
        if self.local_path is not None and (self.local_path / relative).resolve() == local.resolve():
            return
        self.delete(relative)
        target = self._at(relative)
        self.filesystem.create_dir(target if local.is_dir() else target.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(local), target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.filesystem)

    def download(self, relative: str, local: Path) -> Path:
        """Copy `relative` (file or directory) to the local path `local`."""
        local = Path(local)
        source = self._at(relative)
        if self.filesystem.get_file_info(source).type == pafs.FileType.Directory:
            local.mkdir(parents=True, exist_ok=True)
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(source, str(local), source_filesystem=self.filesystem, destination_filesystem=pafs.LocalFileSystem())
        return local

    @contextmanager
    def as_local(self) -> Iterator[Path]:
        """This directory on local disk for the duration: itself when local, else a temporary copy."""
        if self.local_path is not None:
            yield self.local_path
            return
        staging = Path(tempfile.mkdtemp(prefix="tunefleet-fetch-"))
        try:
            yield self.download("", staging / self.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A local directory mirroring this one for files written whole and then uploaded."""
        if self.local_path is not None:
            self.local_path.mkdir(parents=True, exist_ok=True)
            yield self.local_path
            return
        staging = Path(tempfile.mkdtemp(prefix="tunefleet-stage-"))
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def as_storage(directory: "StorageDir | str | Path") -> StorageDir:
    """A StorageDir for a local path (kept as is when it already is one)."""
    return directory if isinstance(directory, StorageDir) else StorageDir.local(directory)


STORAGE_URI_SCHEMES = ("s3://", "gs://", "gcs://", "file://")  # a model named so is copied to each node
MODEL_CACHE_ENV = "TUNEFLEET_MODEL_CACHE"  # where models named by a storage URI are copied on each node


def model_cache_dir() -> Path:
    return Path(os.environ.get(MODEL_CACHE_ENV) or Path(tempfile.gettempdir()) / "tunefleet-models")


def local_copy(directory: StorageDir) -> Path:
    """`directory` on this node's disk: itself when local, else a copy in the model cache, made once per node
    and per content (the key is the URI with every file's name and size), whole or not at all."""
    if directory.local_path is not None:
        return directory.local_path
    files = directory.files()
    if not files:
        raise FileNotFoundError(f"{directory.uri}: no files there; give the folder that save_pretrained() wrote")
    key = hashlib.sha256(json.dumps([directory.uri, sorted(files.items())]).encode()).hexdigest()[:16]
    target = model_cache_dir() / f"{directory.name}-{key}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        directory.download("", staging / "copy")
        os.replace(staging / "copy", target)  # two workers of one node: the first whole copy stays
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def model_location(model: Any) -> str:
    """Where `from_pretrained` reads the job's `model`: its path (hub id, local folder), or this node's copy of
    the folder a storage URI names (the spec carries that folder's StorageDir, resolved by cluster/spec.py)."""
    storage = getattr(model, "_storage", None)
    return model.path if storage is None else str(local_copy(storage))
