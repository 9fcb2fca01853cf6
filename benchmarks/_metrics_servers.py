"""N vLLM /metrics servers in one process, for scrape_bench.py (run as a separate process).

    python benchmarks/_metrics_servers.py N

Listens on N free loopback ports (port 0 each), prints them on one stdout line, then serves
until killed. A request with `?name[]=` filtering gets only the families epp asks for (as
vLLM does), any other request the full page from `_vllm_page.py`.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop
from aiohttp import web

from epp_sim.vllm_page import vllm_exposition

KEEP = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:lora_requests_info",
    "vllm:cache_config_info",
)


def filtered(page: str, keep: tuple[str, ...] = KEEP) -> str:
    """The families of `page` named in `keep` (a family runs from its # HELP line to the next)."""
    lines, on = [], False
    for line in page.splitlines(True):
        if line.startswith("# HELP "):
            on = line.split()[2] in keep
        if on:
            lines.append(line)
    return "".join(lines)


async def serve(count: int) -> None:
    full = vllm_exposition()
    small = filtered(full).encode()
    big = full.encode()

    async def metrics(request: web.Request) -> web.Response:
        body = small if request.query.getall("name[]", []) else big
        return web.Response(body=body, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ports = []
    for _ in range(count):
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    print(" ".join(map(str, ports)), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
