from __future__ import annotations

import io
import logging

from epp.observability.logging import MAX_FIELD, request_id_var, setup_logging


def test_client_values_in_log_lines_are_clipped():
    setup_logging("info", "text")  # the autouse fixture restores the epp logger afterwards
    stream = io.StringIO()
    logging.getLogger("epp").handlers[0].setStream(stream)  # type: ignore[attr-defined]
    token = request_id_var.set("r" * 1_000_000)
    try:
        logging.getLogger("epp.test").info("done model=%s status=%s", "m" * 1_000_000, 200)
    finally:
        request_id_var.reset(token)
    line = stream.getvalue()
    assert len(line) < 4 * MAX_FIELD and "status=200" in line and line.count("chars)") == 2
