"""Registering an export with a running endpoint from outside it (`tunefleet serve add`, and
`tunefleet train` when the job's `serve.register_with` names an endpoint)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class RegistrationError(RuntimeError):
    """The endpoint could not be reached or refused the export; the message says which and why."""


def register_export(endpoint: str, export: str | Path, name: str | None = None, token: str | None = None,
                    timeout_s: float = 300) -> dict[str, Any]:
    """POST /v1/registrations; returns the endpoint's answer once every replica can serve the export.

    A local export path is sent absolute: the endpoint reads the same path (this machine or a shared
    volume). Storage URIs are sent as they are."""
    import httpx

    export = str(export)
    if "://" not in export:
        from training.layout import resolve_export_dir

        try:
            export = str(resolve_export_dir(export).resolve())
        except FileNotFoundError as err:
            raise RegistrationError(str(err)) from None
    url = endpoint.rstrip("/") + "/v1/registrations"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        answer = httpx.post(url, json={"export": export, **({"name": name} if name else {})}, headers=headers,
                            timeout=timeout_s)
    except httpx.HTTPError as err:
        raise RegistrationError(f"cannot reach {url}: {err}") from None
    try:
        payload = answer.json()
    except ValueError:
        payload = {"error": answer.text[:500]}
    if answer.status_code != 201:
        raise RegistrationError(f"{url} answered {answer.status_code}: {payload.get('error', payload)}")
    return payload
