"""JSON Schema export of every frame, in both directions, generated from the pydantic models."""

from __future__ import annotations

from typing import Any

from protocol.frames import CLIENT_ADAPTER, PROTOCOL_VERSION, SERVER_ADAPTER


def json_schema() -> dict[str, Any]:
    """One document with the client-to-server and server-to-client frame unions."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Persona chat wire protocol",
        "protocol": PROTOCOL_VERSION,
        "client_to_server": CLIENT_ADAPTER.json_schema(mode="validation"),
        "server_to_client": SERVER_ADAPTER.json_schema(mode="serialization"),
    }
