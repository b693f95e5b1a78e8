"""`output.storage` → a StorageDir training can write to: a local path, a shared volume, s3://, gs://.

Credentials and endpoints come from the environment, as every AWS / Google client reads them:

- s3://bucket/prefix: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN), AWS_REGION /
  AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for an S3-compatible server
  (MinIO, SeaweedFS, Ceph): `http://host:port` or `https://...`.
- gs://bucket/prefix: Google application-default credentials (GOOGLE_APPLICATION_CREDENTIALS).

The Ray Train workers receive the same pyarrow filesystem, so the cluster's nodes need the same
variables (`tunefleet submit --env`, or the KubeRay pod environment).
"""

from __future__ import annotations

import os
import secrets
from urllib.parse import urlparse

import pyarrow.fs as pafs

from training.storage import StorageDir


class StorageError(ValueError):
    """A storage URI that cannot be used; the message names the cause and the fix."""


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    # Keys read here travel with the filesystem object to the Ray Train workers (as Ray's own
    # storage_filesystem does); without them, every node uses its own AWS credential chain (IAM role).
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        options.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                       session_token=os.environ.get("AWS_SESSION_TOKEN"))
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
        # S3-compatible servers address buckets by path, not by virtual host.
        options["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**options)


def resolve_storage(uri: str) -> StorageDir:
    """A local path (absolute or relative to the working directory), file://, s3:// or gs://."""
    if "://" not in uri:
        return StorageDir.local(uri)
    scheme, _, rest = uri.partition("://")
    path = rest.strip("/")
    if scheme == "file":
        return StorageDir.local("/" + path)
    if scheme == "s3":
        filesystem = s3_filesystem()
    elif scheme in ("gs", "gcs"):
        filesystem = pafs.GcsFileSystem()
    else:
        raise StorageError(f"output.storage: unsupported scheme {scheme}:// in {uri}; use a local path, s3:// or gs://")
    if not path:
        raise StorageError(f"output.storage: {uri} names no bucket; write {scheme}://BUCKET/PREFIX")
    return StorageDir(filesystem, path, f"{scheme}://{path}")


def check_writable(storage: StorageDir) -> None:
    """Write and delete a probe file, so a wrong bucket or credential fails before any cluster time."""
    probe = f".tunefleet-probe-{secrets.token_hex(4)}"
    bucket = storage.path.split("/", 1)[0]
    try:
        if storage.local_path is None and storage.filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise StorageError(f"output.storage: bucket {bucket} does not exist at {storage.uri}; create it first")
        storage.write_text(probe, "ok")
        storage.delete(probe)
    except StorageError:
        raise
    except OSError as err:
        hint = ("check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL, and that the store "
                "accepts writes (a timeout can mean it is full or read-only)"
                if storage.uri.startswith("s3://") else
                "check GOOGLE_APPLICATION_CREDENTIALS" if storage.uri.startswith(("gs://", "gcs://")) else
                "check the path and its permissions")
        raise StorageError(f"output.storage: cannot write to {storage.uri}: {err}; {hint}") from None
