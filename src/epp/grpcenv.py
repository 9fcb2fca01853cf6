"""gRPC core settings that must be in place before ``grpc`` is imported.

grpc reads ``GRPC_EXPERIMENTS`` once, when its extension loads.  Since grpcio 1.80 the server
side of Python's grpc runs on the EventEngine listener (``event_engine_listener``): each
accepted connection is read and written on EventEngine threads, which then hand every event
to grpc.aio's poller and on to the event loop.  Switched off (``-event_engine_listener``, the
rollback grpc documents for that experiment), the connection is read by the poller itself.
Measured on ext_proc streams under ghz (benchmarks/README.md, "ghz"): about 2.5 times fewer
context switches, 30 % fewer system calls and 15 to 25 % less CPU per stream, in epp and in the
bare grpc.aio floor alike.

``apply()`` sets that default unless the environment already names ``GRPC_EXPERIMENTS``
(even empty: ``GRPC_EXPERIMENTS=`` gives grpc's own defaults back).  ``epp``'s command line
calls it first thing; it must run before anything imports ``grpc``, and says when it is too
late.  A grpc release that drops the experiment logs "Unknown experiment" once at start and
runs its own default.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

GRPC_EXPERIMENTS = "-event_engine_listener"


def apply(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set epp's gRPC core defaults; False when grpc is already imported (too late to matter)."""
    if "grpc" in sys.modules:
        return False
    environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    return True
