"""Optional bearer-token auth: the token's source (an environment variable or a mounted secret file)
and the check of a request's `Authorization` header.

    serve:
      auth_token_file: /var/run/secrets/tunefleet/token   # a Kubernetes secret mounted as a file
      # or auth_token_env: TUNEFLEET_TOKEN                  # a variable set in the replicas' environment

Clients send `Authorization: Bearer <token>`. The comparison is constant-time
(`hmac.compare_digest`), so response timing says nothing about how much of a guess was right.
The token is read in the replica, never carried in a deployment's arguments, so it does not land
in Ray's stored configs. A file token is re-read when the file changes (a rotated secret applies
without a redeploy); until the new one is read, the last good token stays in force.
"""

from __future__ import annotations

import hmac
import os
import time
from pathlib import Path

from serving.config import ServeSpec

PUBLIC_PATHS = frozenset({"/healthz"})  # load balancers and probes carry no token
_RECHECK_S = 2.0  # how often a file token's mtime is looked at (a stat per request is wasted work)


class TokenSource:
    """The current token: read once from the environment, or from a file and again when it changes."""

    def __init__(self, env_name: str | None = None, file: str | None = None) -> None:
        if bool(env_name) == bool(file):
            raise ValueError("give exactly one of env_name and file")
        self.env_name = env_name
        self.file = Path(file) if file else None
        self._token = b""
        self._mtime: float | None = None
        self._checked = 0.0
        self._load()

    def _load(self) -> None:
        if self.env_name:
            value = os.environ.get(self.env_name, "").strip()
            if not value:
                raise RuntimeError(
                    f"auth_token_env names {self.env_name}, but it is unset or empty in this replica's environment; "
                    "set it where Ray's workers start (the pod's env, or before `tunefleet serve` starts Ray)"
                )
            self._token = value.encode()
            return
        assert self.file is not None
        try:
            mtime = self.file.stat().st_mtime
            value = self.file.read_text().strip()
        except OSError as exc:
            raise RuntimeError(f"auth_token_file {self.file} cannot be read: {exc.strerror or exc}") from None
        if not value:
            raise RuntimeError(f"auth_token_file {self.file} is empty; put the bearer token in it")
        self._token, self._mtime = value.encode(), mtime

    def token(self) -> bytes:
        if self.file is not None and time.monotonic() - self._checked > _RECHECK_S:
            self._checked = time.monotonic()
            try:
                if self.file.stat().st_mtime != self._mtime:
                    self._load()
            except (OSError, RuntimeError):
                pass  # mid-rotation (Kubernetes swaps a symlink): keep the last good token
        return self._token


def token_source(spec: ServeSpec) -> TokenSource | None:
    """The spec's token source; None when auth is off. Raises RuntimeError when the token cannot be read."""
    if not (spec.auth_token_env or spec.auth_token_file):
        return None
    return TokenSource(env_name=spec.auth_token_env, file=spec.auth_token_file)


def bearer_problem(authorization: bytes | None, expected: bytes) -> str | None:
    """Why this Authorization header does not authorize (None: it does)."""
    if not authorization:
        return "missing bearer token: send 'Authorization: Bearer <token>'"
    scheme, _, credentials = authorization.partition(b" ")
    if scheme.lower() != b"bearer" or not credentials.strip():
        return "the Authorization header must be 'Bearer <token>'"
    if not hmac.compare_digest(credentials.strip(), expected):
        return "invalid bearer token"
    return None
