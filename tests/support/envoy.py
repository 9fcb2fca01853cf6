"""Changes tests make to a rendered Envoy bootstrap (a dict) before starting Envoy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def hcm(config: dict[str, Any]) -> dict[str, Any]:
    """The HTTP connection manager of the bootstrap's first listener."""
    found: dict[str, Any] = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return found


def ext_proc_config(config: dict[str, Any]) -> dict[str, Any]:
    """The ``ExternalProcessor`` config of the bootstrap's ext_proc filter (unwrapped from the
    matcher epp's own wiring puts around it)."""
    (found,) = [f for f in hcm(config)["http_filters"] if f["name"] == "envoy.filters.http.ext_proc"]
    typed: dict[str, Any] = found["typed_config"]
    return typed["extension_config"]["typed_config"] if "extension_config" in typed else typed


def insert_subset_hint(config: dict[str, Any], addresses: list[str]) -> None:
    """A ``set_metadata`` filter first in the chain, writing ``envoy.lb.subset_hint`` for epp."""
    hcm(config)["http_filters"].insert(0, {
        "name": "envoy.filters.http.set_metadata",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
            "metadata": [{"metadata_namespace": "envoy.lb.subset_hint",
                          "value": {"x-gateway-destination-endpoint-subset": addresses}}],
        },
    })  # fmt: skip


def subset_hint_filter(addresses: list[str]) -> Callable[[dict[str, Any]], None]:
    """``insert_subset_hint`` as a bootstrap mutator."""
    return lambda config: insert_subset_hint(config, addresses)
