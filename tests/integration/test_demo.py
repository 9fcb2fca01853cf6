"""`epp demo` end to end, as `make demo` runs it (smaller burst)."""

from __future__ import annotations

import asyncio
import re
import sys


async def test_demo_verifies_mirroring_and_cleans_up():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "epp", "demo", "--requests", "6", "--concurrency", "3",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "✔ mirroring verified" in text
    assert "production pool served 7/7; shadow pool received 7/7" in text
    served = [int(n) for n in re.findall(r"\): served (\d+) requests", text)]
    assert len(served) == 5 and sum(served[:3]) == 7 and sum(served[3:]) == 7
    assert re.search(r"TTFT p50\s+[\d.]+ ms\s+[\d.]+ ms", text)
