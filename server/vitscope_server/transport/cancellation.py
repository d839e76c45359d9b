"""The bridge from an RPC's end (cancel, deadline, shutdown) to the core's CancelToken."""

from __future__ import annotations

import grpc

from vitscope_server.core.runtime.cancel import CancelToken


def cancel_token(context: grpc.ServicerContext) -> CancelToken:
    """A token set when the RPC ends early: client cancel, deadline, or server shutdown."""
    token = CancelToken()
    if not context.add_callback(token.cancel):
        token.cancel()
    return token
