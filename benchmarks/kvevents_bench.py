"""KV-event subscriber cost: what one event (and one block) costs epp to decode and index.

Measures, each row one of:

- `apply`: `KVEventIndex.apply` on pre-encoded vLLM messages (one `BlockStored` of
  `blocks_per_event` blocks, chained on the previous one, then the matching `BlockRemoved` a
  cache of `--capacity` blocks would send), in one process: CPU µs per event and per block.
  Both event forms (`map`, vLLM's current one, and the older `array`).
- `zmq`: the same messages published by a separate process (epp-sim's `KVEventPublisher`,
  real ZMQ over 127.0.0.1) and consumed by `KVEventSubscriber` on an asyncio loop: the
  subscriber process's CPU per event, end to end (socket reads, the event loop, decode, apply).
- `keys`: the request side, `BlockKeys.prompt_keys` for a prompt of `prompt_chars` characters
  (block size 16): µs per request and per block.
- `memory`: bytes of Python heap per indexed block (tracemalloc, `--capacity` blocks).
- `spec`: `KVEventIndex.speculate`, one pick's speculative entries (`blocks_per_event` keys):
  µs per pick ("event") and per key; the precise scorer makes one per routed request.
- `tokenize`: `tokenizer: vllm-tokenize`'s fetch, `TokenizeClient` asking an epp-sim pod (a
  separate process on 127.0.0.1, vLLM's `POST /tokenize`) for the ids of a `prompt_chars`
  prompt, one call at a time on a uvloop loop: epp's CPU µs per call (`µs/event`) and the
  median wall time a decision waits for it (`p50 µs`).
- `peer` / `peerfull`: one active-active peer message (`epp.datalayer.peers`): `PeerSync.encode`
  on a replica with requests in flight on `prompt_chars` pods (the column is reused for the pod
  count), one of them changed since the last message, and one speculative entry of 64 keys,
  plus `apply` on the receiving replica: µs per message. `peer` carries the changed address
  only (every message but one a second), `peerfull` every address (once a second).

    python benchmarks/kvevents_bench.py            # ~20 s
    python benchmarks/kvevents_bench.py --json     # rows on stdout, table on stderr
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import statistics
import sys
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

import uvloop

from _cli import ArgumentParser, Output, positive_int
from epp.datalayer.kvevents import KVEventIndex, KVEventSubscriber
from epp.datalayer.ledger import LoadLedger
from epp.datalayer.peers import PeerSync
from epp.datalayer.tokenize import TokenizeClient
from epp.domain import Endpoint, InferenceRequest
from epp.scheduling.blockkeys import BlockKeys
from epp.scheduling.tokenizers import ServerTokenizer
from epp_sim.domain import EngineConfig
from epp_sim.kvevents import BlockRemoved, BlockStored, KVEventPublisher, encode_batch, frames
from epp_sim.profiles import FAST
from epp_sim.server import PodConfig, SimPod

BS = 16
TOPIC = b"kv@10.0.0.1:8000@/model/llama2"
POD = "10.0.0.1:8000"
MODEL = "/model/llama2"  # epp-sim's default served name
KEYS = ("bench", "measure", "form", "blocks_per_event", "prompt_chars", "events", "us_per_event", "us_per_block",
        "events_per_s", "bytes_per_block", "p50_us")  # fmt: skip


def messages(n_events: int, blocks: int, form: str, capacity: int) -> list[list[bytes]]:
    """`n_events` messages: stored runs of `blocks` blocks, removals once `capacity` is full."""
    out: list[list[bytes]] = []
    parent: int | None = None
    stored: list[int] = []
    h = 1
    seq = 0
    while len(out) < n_events:
        hashes = tuple(range(h, h + blocks))
        h += blocks
        tokens = tuple((x * 7 + 3) & 0xFFFF for x in range(blocks * BS))
        events: list[Any] = [BlockStored(hashes, parent, tokens, BS)]
        parent = hashes[-1]
        stored.extend(hashes)
        if len(stored) > capacity:
            gone, stored = stored[: len(stored) - capacity], stored[len(stored) - capacity :]
            events.append(BlockRemoved(tuple(gone)))
        for ev in events:
            out.append(frames(TOPIC, seq, encode_batch(float(seq), [ev], 0, form)))
            seq += 1
    return out[:n_events]


def bench_apply(n: int, blocks: int, form: str, capacity: int) -> dict[str, Any]:
    msgs = messages(n, blocks, form, capacity)
    idx = KVEventIndex(BlockKeys(), default_capacity=capacity * 2)
    t0 = time.process_time()
    for m in msgs:
        idx.apply(POD, m)
    cpu = time.process_time() - t0
    total_blocks = idx.stats.blocks_stored + idx.stats.blocks_removed
    return row("apply", form, blocks, math.nan, idx.stats.events, cpu, total_blocks)


def _publish(endpoint_q: Any, n: int, blocks: int, form: str, capacity: int) -> None:
    async def main() -> None:
        msgs = messages(n, blocks, form, capacity)
        pub = KVEventPublisher("tcp://127.0.0.1:0", TOPIC.decode(), form=form)
        pub.start()
        endpoint_q.put(pub.endpoint)
        await pub.subscribed()
        for i, m in enumerate(msgs):
            await pub._sock.send_multipart(m)  # the pre-encoded frames, as publish() would send them
            if i % 256 == 255:
                await asyncio.sleep(0)
        endpoint_q.get()  # wait for the consumer before closing
        await pub.aclose()

    asyncio.run(main())


def bench_zmq(n: int, blocks: int, form: str, capacity: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    q: Any = ctx.Queue()
    proc = ctx.Process(target=_publish, args=(q, n, blocks, form, capacity))
    proc.start()
    endpoint = q.get(timeout=30)

    async def consume() -> tuple[float, int, int]:
        idx = KVEventIndex(BlockKeys(), default_capacity=capacity * 2)
        sub = KVEventSubscriber(idx, lambda e: endpoint)
        sub.follow([Endpoint(POD, "pod-0")])
        task = asyncio.create_task(sub.run())
        await asyncio.wait_for(sub.received(POD, 1), 30)
        t0 = time.process_time()
        await asyncio.wait_for(sub.received(POD, n), 120)
        cpu = time.process_time() - t0
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sub.close()
        return cpu, idx.stats.events - 1, idx.stats.blocks_stored + idx.stats.blocks_removed

    cpu, events, total_blocks = asyncio.run(consume())
    q.put("done")
    proc.join(30)
    return row("zmq", form, blocks, math.nan, events, cpu, total_blocks)


def bench_keys(chars: int, reps: int = 2000) -> dict[str, Any]:
    keys = BlockKeys(max_blocks=1 << 20)
    text = ("abcdefghij" * (chars // 10 + 1))[:chars]
    n = len(keys.prompt_keys(text, "m", BS))
    t0 = time.process_time()
    for _ in range(reps):
        keys.prompt_keys(text, "m", BS)
    cpu = time.process_time() - t0
    return row("keys", "", math.nan, chars, reps, cpu, n * reps)


def _serve_pod(q: Any) -> None:
    async def main() -> None:
        pod = SimPod(PodConfig(engine=EngineConfig(profile=FAST)))
        q.put(await pod.start())
        await asyncio.get_running_loop().run_in_executor(None, q.get)  # until the bench is done
        await pod.aclose()

    asyncio.run(main())


def bench_tokenize(chars_list: Sequence[int], reps: int = 500) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    q: Any = ctx.Queue()
    proc = ctx.Process(target=_serve_pod, args=(q,))
    proc.start()
    url = f"http://127.0.0.1:{q.get(timeout=30)}"

    async def measure(chars: int) -> dict[str, Any]:
        client = TokenizeClient(lambda: None)
        tok = ServerTokenizer(url=url, timeout=5.0, cache_size=1)
        text = ("abcdefghij" * (chars // 10 + 1))[:chars]
        walls = []
        cpu = 0.0
        for i in range(reps + 20):  # the first 20 warm the connection up
            need = tok.need(InferenceRequest(request_id="b", model=MODEL, target_model=MODEL, prompt=f"{i:08d}{text}"))
            assert need is not None
            t0, c0 = time.perf_counter(), time.process_time()
            await client(need)
            if i >= 20:
                walls.append(time.perf_counter() - t0)
                cpu += time.process_time() - c0
        assert len(tok) == 1, "the server's answers did not arrive"
        await client.aclose()
        r = row("tokenize", "", math.nan, chars, reps, cpu, 0)
        r["p50_us"] = statistics.median(walls) * 1e6
        return r

    async def run() -> list[dict[str, Any]]:
        return [await measure(chars) for chars in chars_list]

    try:
        return uvloop.run(run())
    finally:
        q.put("done")
        proc.join(30)


def bench_memory(capacity: int) -> dict[str, Any]:
    msgs = messages(capacity // 16, 16, "map", capacity)
    idx = KVEventIndex(BlockKeys(), default_capacity=capacity * 2)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for m in msgs:
        idx.apply(POD, m)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    r = row("memory", "map", 16, math.nan, idx.stats.events, math.nan, len(idx))
    r["bytes_per_block"] = (after - before) / len(idx)
    return r


def _published(pods: int) -> KVEventIndex:
    """An index that has heard one event from each of `pods` pods (so it knows their block size)."""
    idx = KVEventIndex(BlockKeys())
    for i in range(pods):
        idx.apply(f"10.0.{i // 250}.{i % 250}:8000", frames(TOPIC, 0, encode_batch(0.0, [BlockStored((i + 1,), None,
                  tuple(range(BS)), BS)], 0, "map")))  # fmt: skip
    return idx


def bench_spec(keys: int, reps: int = 20_000) -> dict[str, Any]:
    idx = _published(1)
    chain = list(range(1, keys + 1))
    t0 = time.process_time()
    for i in range(reps):
        chain[0] = i  # a different prompt each time (new entries, as a stream of distinct prefixes)
        idx.speculate("10.0.0.0:8000", chain, 2.0)
    cpu = time.process_time() - t0
    return row("spec", "", keys, math.nan, reps, cpu, keys * reps)


def bench_peer(pods: int, full: bool, reps: int = 5_000) -> dict[str, Any]:
    ledger = LoadLedger()
    sender_index, receiver_index = _published(pods), _published(pods)
    sender, receiver = PeerSync(ledger, sender_index), PeerSync(LoadLedger(), receiver_index)
    endpoints = [Endpoint(f"10.0.{i // 250}.{i % 250}:8000", f"pod-{i}") for i in range(pods)]
    for e in endpoints:
        ledger.acquire(e, 1000)
    receiver.apply(sender.encode())
    keys = list(range(1, 65))
    t0 = time.process_time()
    for i in range(reps):
        ledger.acquire(endpoints[i % pods], 1000).release()  # one address changed since the last message
        sender_index.speculate("10.0.0.0:8000", keys, 2.0)  # and one pick's speculative entries
        receiver.apply(sender.encode(full=full))
    cpu = time.process_time() - t0
    assert receiver.load.total_requests() == pods
    return row("peerfull" if full else "peer", "", math.nan, pods, reps, cpu, 0)


def row(measure: str, form: str, blocks: float, chars: float, events: int, cpu: float, total_blocks: int
        ) -> dict[str, Any]:  # fmt: skip
    return {
        "bench": "kvevents_bench",
        "measure": measure,
        "form": form,
        "blocks_per_event": blocks,
        "prompt_chars": chars,
        "events": events,
        "us_per_event": cpu / events * 1e6 if events else math.nan,
        "us_per_block": cpu / total_blocks * 1e6 if total_blocks else math.nan,
        "events_per_s": events / cpu if cpu else math.nan,
        "bytes_per_block": math.nan,
        "p50_us": math.nan,
    }


def fmt(v: Any, spec: str) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "-".rjust(int(spec[1:].split(".", maxsplit=1)[0].replace(",", "")))
    return format(v, spec)


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = f"{'measure':<9}{'form':<7}{'blocks/ev':>10}{'chars':>8}{'events':>9}{'µs/event':>10}{'µs/block':>10}" \
           f"{'events/s':>11}{'B/block':>9}{'p50 µs':>9}"  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['measure']:<9}{r['form']:<7}{fmt(r['blocks_per_event'], '>10.0f')}"
                     f"{fmt(r['prompt_chars'], '>8.0f')}{r['events']:>9}{fmt(r['us_per_event'], '>10.2f')}"
                     f"{fmt(r['us_per_block'], '>10.3f')}{fmt(r['events_per_s'], '>11,.0f')}"
                     f"{fmt(r['bytes_per_block'], '>9.0f')}{fmt(r['p50_us'], '>9.0f')}")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="one JSON object per row on stdout; table to stderr")
    p.add_argument("--events", type=positive_int, default=20_000, help="messages per apply/zmq measurement")
    p.add_argument("--capacity", type=positive_int, default=27_793, help="blocks per pod (the index bound)")
    args = p.parse_args(argv)
    out = Output(args.json)
    rows = []
    for form in ("map", "array"):
        for blocks in (1, 16, 128):
            rows.append(bench_apply(args.events, blocks, form, args.capacity))
    for blocks in (1, 16):
        rows.append(bench_zmq(args.events, blocks, "map", args.capacity))
    for chars in (1_000, 8_000, 32_000):
        rows.append(bench_keys(chars))
    rows.append(bench_memory(args.capacity))
    rows.append(bench_spec(256))
    rows += bench_tokenize((1_000, 8_000, 32_000))
    for full in (False, True):
        for pods in (8, 100, 1000):
            rows.append(bench_peer(pods, full, reps=5_000 if not full or pods < 1000 else 500))
    for r in rows:
        assert tuple(r) == KEYS
        out.row(r)
    out.say(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
