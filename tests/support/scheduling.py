"""Building blocks for scheduling tests: endpoints, scraped metrics, requests, candidates."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from epp.datalayer import Datastore
from epp.domain import Criticality, Endpoint, EndpointMetrics, InferenceRequest, ModelPolicy
from epp.scheduling import Candidates

from support import datastore

EPS = [Endpoint(f"127.0.0.{i + 1}:8000", f"pod-{i}") for i in range(4)]
NOW = 100.0  # the clock of every store built here: metrics stamped NOW are fresh


def req(model: str = "base", prompt: str = "", crit: Criticality = Criticality.STANDARD, **kw) -> InferenceRequest:
    return InferenceRequest(request_id="r", model=model, target_model=model, prompt=prompt, criticality=crit, **kw)


def m(waiting=0, running=0, kv=0.0, active=(), pending=(), max_lora=4, blocks=1000) -> EndpointMetrics:
    """Fresh scraped metrics (updated at ``NOW``)."""
    return EndpointMetrics(waiting=waiting, running=running, kv_usage=kv, active_adapters=frozenset(active),
                           waiting_adapters=frozenset(pending), max_lora=max_lora, block_size=16,
                           num_blocks=blocks, updated_at=NOW)


def cands(metrics: Sequence[EndpointMetrics | None], inflight=None, tokens=None, prefix=None,
          unseen=None) -> Candidates:
    """Candidates over the first ``len(metrics)`` of ``EPS`` (``None``: no fresh scrape)."""
    n = len(metrics)
    return Candidates(EPS[:n], metrics, inflight or [0] * n, tokens or [0] * n, prefix or [0.0] * n,
                      unseen or [0] * n, [0] * n)


def store_with(metrics: Iterable[EndpointMetrics | None], models: Mapping[str, ModelPolicy] | None = None
               ) -> Datastore:
    """A store over the first ``len(metrics)`` of ``EPS`` holding those metrics (``None``: never scraped),
    objectives ``batch`` (sheddable, priority -1) and ``chat`` (5), its clock stopped at ``NOW``."""
    metrics = list(metrics)
    s = datastore(EPS[: len(metrics)], models=models, objectives={"batch": -1, "chat": 5}, clock=lambda: NOW)
    for e, mm in zip(EPS, metrics, strict=False):
        if mm is not None:
            s.set_metrics(e.address, mm)
    return s
