"""The protocol's identity, shared by client and server for the version handshake."""

from __future__ import annotations

PROTOCOL = "vitscope.v1"
PROTOCOL_REVISION = 2
"""Grows by one with each backward-compatible addition to vitscope.v1. Revision 2 added
GetServerInfo and google.rpc error details on every error."""
REQUIRED_REVISION = 2
"""The oldest server revision this client works with."""
