"""Where a served export comes from: a local path or a storage URI (file://, s3://, gs://).

Serving reads exports only; it never writes to storage. A URI export is copied once per
node into a local cache (`TUNEFLEET_MODEL_CACHE`, default a temp dir) and loaded from
there; the copy is keyed by the URI and the digest of its tunefleet.json, so a re-export
under the same URI is fetched again. Credentials and endpoints come from the environment
as pyarrow reads them (AWS_* / AWS_ENDPOINT_URL, Google application-default credentials).

    source = "s3://bucket/runs/sst2/20261102-1200"   # an export, or a run directory holding export/
    info = read_info(source)                          # tunefleet.json, without fetching the weights
    local = fetch(source)                             # a local export directory
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from training.layout import EXPORT_DIR, EXPORT_INFO_FILE, ExportInfo, resolve_export_dir

CACHE_ENV = "TUNEFLEET_MODEL_CACHE"
_fetch_lock = threading.Lock()  # one download per process at a time; replicas fetch rarely


def is_uri(source: str | Path) -> bool:
    return "://" in str(source)


def _filesystem(uri: str):
    import pyarrow.fs as pafs

    if uri.startswith("file://"):
        return pafs.LocalFileSystem(), "/" + uri.removeprefix("file://").lstrip("/")
    return pafs.FileSystem.from_uri(uri)


def _read(filesystem, path: str) -> bytes | None:
    import pyarrow.fs as pafs

    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def _export_root(source: str) -> tuple[Any, str, bytes]:
    """(filesystem, path of the export on it, tunefleet.json bytes) for a URI export or run directory."""
    try:
        filesystem, path = _filesystem(source)
    except Exception as exc:  # pyarrow: unknown scheme, missing credentials, bad bucket
        raise FileNotFoundError(f"{source}: cannot open this storage URI ({exc})") from None
    path = path.rstrip("/")
    for candidate in (path, f"{path}/{EXPORT_DIR}"):
        data = _read(filesystem, f"{candidate}/{EXPORT_INFO_FILE}")
        if data is not None:
            return filesystem, candidate, data
    raise FileNotFoundError(f"{source}: neither an export (no {EXPORT_INFO_FILE}) nor a run directory with {EXPORT_DIR}/")


def read_info(source: str | Path) -> tuple[ExportInfo, str]:
    """The export's tunefleet.json and its version (digest of the file), without fetching weights."""
    if is_uri(source):
        _, _, data = _export_root(str(source))
    else:
        data = (resolve_export_dir(source) / EXPORT_INFO_FILE).read_bytes()
    return ExportInfo.model_validate_json(data), version_of(data)


def read_file(source: str | Path, name: str) -> bytes | None:
    """One small file of the export (adapter_config.json), or None when it has none."""
    if is_uri(source):
        filesystem, path, _ = _export_root(str(source))
        return _read(filesystem, f"{path}/{name}")
    path = resolve_export_dir(source) / name
    return path.read_bytes() if path.is_file() else None


def read_json(source: str | Path, name: str) -> dict[str, Any] | None:
    data = read_file(source, name)
    return None if data is None else json.loads(data)


def version_of(info_bytes: bytes) -> str:
    return hashlib.sha256(info_bytes).hexdigest()[:12]


def normalize(source: str | Path) -> str:
    """What to record and pass to replicas: a URI as given, a local path made absolute (export/ resolved)."""
    return str(source) if is_uri(source) else str(resolve_export_dir(source).resolve())


def fetch_model(source: str) -> str:
    """An adapter export's base model as `from_pretrained` reads it: a storage URI's folder copied to this node
    (training's model cache, shared with the workers that trained on it); a hub id or local path as it is."""
    from training.storage import STORAGE_URI_SCHEMES, StorageDir, local_copy

    if not source.startswith(STORAGE_URI_SCHEMES):
        return source

    try:
        filesystem, path = _filesystem(source)
    except Exception as exc:  # pyarrow: unknown scheme, missing credentials, bad bucket
        raise FileNotFoundError(f"{source}: cannot open this storage URI ({exc})") from None
    return str(local_copy(StorageDir(filesystem, path.rstrip("/"), source)))


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "tunefleet-models")


def fetch(source: str | Path) -> Path:
    """A local export directory for `source`: itself when local, else a cached copy of the URI's export."""
    if not is_uri(source):
        return resolve_export_dir(source).resolve()
    import pyarrow.fs as pafs

    filesystem, path, data = _export_root(str(source))
    key = hashlib.sha256(f"{source}\n{version_of(data)}".encode()).hexdigest()[:20]
    target = cache_dir() / key
    with _fetch_lock:
        if (target / EXPORT_INFO_FILE).is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{key}.partial-", dir=target.parent))
        try:
            pafs.copy_files(path, str(staging), source_filesystem=filesystem,
                            destination_filesystem=pafs.LocalFileSystem())
            os.replace(staging, target)  # a reader sees the whole export or none of it
        except OSError:
            if not (target / EXPORT_INFO_FILE).is_file():  # not another process winning the race
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
