"""Small helpers shared by the tests: pool and datastore builders."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from epp.datalayer import Datastore
from epp.domain import Endpoint, ModelPolicies, ModelPolicy, Pool


def pool(endpoints: Iterable[Endpoint], name: str = "p", **kw: object) -> Pool:
    return Pool(name=name, endpoints=tuple(endpoints), **kw)  # type: ignore[arg-type]


def datastore(
    endpoints: Iterable[Endpoint] = (),
    *,
    models: Mapping[str, ModelPolicy] | None = None,
    objectives: Mapping[str, int] | None = None,
    mirror: Iterable[Endpoint] | None = None,
    clock: Callable[[], float] | None = None,
    staleness: float = 2.0,
) -> Datastore:
    """A datastore holding pool ``p`` (and mirror pool ``p-shadow`` when given)."""
    store = Datastore(staleness=staleness, clock=clock) if clock else Datastore(staleness=staleness)
    store.apply(
        pool(endpoints),
        pool(mirror, name="p-shadow") if mirror is not None else None,
        ModelPolicies.of(models, objectives),
    )
    return store
