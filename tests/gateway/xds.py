"""egctl's xDS dump → a static Envoy bootstrap whose every address is a loopback one.

Envoy Gateway serves listeners, routes, clusters and endpoints over ADS; the dump holds
exactly those resources.  ``static_bootstrap`` inlines them:

* every listener egctl rendered for the Gateway (EG's own ready/stats listeners are
  left out: they are Envoy Gateway's plumbing, not the user's wiring), with its
  ``rds`` replaced by the route configuration of that name, bound to 127.0.0.1 port 0;
* every cluster, with EDS, STRICT_DNS or STATIC endpoints replaced by the loopback
  addresses the test gives for that cluster name (``ip:port``, or ``unix:///path`` for a
  Unix socket): a cluster with endpoints and no replacement is an error, so no invented
  endpoint (egctl makes up 1.2.3.4) and no hostname survives; ORIGINAL_DST clusters have
  no endpoints and keep none;
* EG's layered runtime and overload manager from its bootstrap; admin on 127.0.0.1:0.

``harness.assert_loopback_only`` then checks the whole result before Envoy starts.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

_EG_INFRA_LISTENER = "envoy-gateway-proxy-"  # EG's own ready/stats listeners


def _resource(any_message: dict[str, Any]) -> dict[str, Any]:
    """A resource out of the dump's Any wrapper (its ``@type`` goes)."""
    out = copy.deepcopy(any_message)
    out.pop("@type", None)
    return out


class Dump:
    """One Gateway's resources from ``egctl x translate --to xds -t all``."""

    def __init__(self, dump: dict[str, Any], gateway: str | None = None) -> None:
        gateways = dump["xds"]
        if gateway is None:
            (gateway,) = gateways
        self.gateway = gateway
        self._configs = {c["@type"].rpartition(".")[2]: c for c in gateways[gateway]["configs"]}

    def _section(self, kind: str) -> dict[str, Any]:
        return dict(self._configs.get(kind, {}))

    @property
    def bootstrap(self) -> dict[str, Any]:
        return dict(self._section("BootstrapConfigDump").get("bootstrap", {}))

    @property
    def listeners(self) -> list[dict[str, Any]]:
        items = self._section("ListenersConfigDump").get("dynamicListeners", [])
        return [_resource(i["activeState"]["listener"]) for i in items]

    @property
    def routes(self) -> dict[str, dict[str, Any]]:
        items = self._section("RoutesConfigDump").get("dynamicRouteConfigs", [])
        return {i["routeConfig"]["name"]: _resource(i["routeConfig"]) for i in items}

    @property
    def clusters(self) -> dict[str, dict[str, Any]]:
        items = self._section("ClustersConfigDump").get("dynamicActiveClusters", [])
        return {i["cluster"]["name"]: _resource(i["cluster"]) for i in items}

    @property
    def endpoints(self) -> dict[str, dict[str, Any]]:
        items = self._section("EndpointsConfigDump").get("dynamicEndpointConfigs", [])
        return {i["endpointConfig"]["clusterName"]: _resource(i["endpointConfig"]) for i in items}

    @property
    def secrets(self) -> list[dict[str, Any]]:
        items = self._section("SecretsConfigDump").get("dynamicActiveSecrets", [])
        return [_resource(i["secret"]) for i in items]

    def listener(self, name: str) -> dict[str, Any]:
        (found,) = [lis for lis in self.listeners if lis["name"] == name]
        return found

    def gateway_listeners(self) -> list[dict[str, Any]]:
        return [lis for lis in self.listeners if not lis["name"].startswith(_EG_INFRA_LISTENER)]


def hcms(listener: dict[str, Any]) -> list[dict[str, Any]]:
    """The HTTP connection managers of a listener (default chain and every filter chain)."""
    chains = list(listener.get("filterChains", []))
    if "defaultFilterChain" in listener:
        chains.append(listener["defaultFilterChain"])
    return [
        f["typedConfig"]
        for chain in chains
        for f in chain.get("filters", [])
        if f.get("name") == "envoy.filters.network.http_connection_manager"
    ]


def _address(target: str) -> dict[str, Any]:
    if target.startswith("unix://"):
        return {"pipe": {"path": target.removeprefix("unix://")}}
    host, _, port = target.rpartition(":")
    return {"socketAddress": {"address": host.strip("[]"), "portValue": int(port)}}


def _load_assignment(name: str, targets: Sequence[str]) -> dict[str, Any]:
    assert targets, f"cluster {name}: no loopback endpoint given"
    return {
        "clusterName": name,
        "endpoints": [{"lbEndpoints": [{"endpoint": {"address": _address(t)}} for t in targets]}],
    }


def _has_endpoints(cluster: dict[str, Any], eds: Mapping[str, Any]) -> bool:
    if cluster.get("type") == "ORIGINAL_DST":
        return False
    return "edsClusterConfig" in cluster or "loadAssignment" in cluster or cluster["name"] in eds


def static_bootstrap(dump: Dump, endpoints: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The dump as one static bootstrap; ``endpoints``: cluster name → loopback targets."""
    routes = dump.routes
    listeners = []
    for listener in dump.gateway_listeners():
        listener["address"] = {"socketAddress": {"address": "127.0.0.1", "portValue": 0}}
        listener["enableReusePort"] = False  # a port clash fails instead of sharing traffic
        for hcm in hcms(listener):
            if "rds" in hcm:
                name = hcm.pop("rds")["routeConfigName"]
                hcm["routeConfig"] = routes[name]
        listeners.append(listener)
    assert listeners, f"egctl rendered no listener for {dump.gateway}"

    eds = dump.endpoints
    clusters = []
    unused = set(endpoints)
    for name, cluster in dump.clusters.items():
        if _has_endpoints(cluster, eds):
            assert name in endpoints, f"cluster {name} has endpoints ({eds.get(name)}) and no loopback replacement"
            unused.discard(name)
            cluster.pop("edsClusterConfig", None)
            cluster["type"] = "STATIC"  # loopback IP literals (or a pipe): nothing to resolve
            cluster.pop("dnsLookupFamily", None)
            cluster.pop("dnsRefreshRate", None)
            cluster.pop("respectDnsTtl", None)
            cluster["loadAssignment"] = _load_assignment(name, endpoints[name])
        clusters.append(cluster)
    assert not unused, f"loopback endpoints for clusters egctl did not render: {sorted(unused)}"

    boot = dump.bootstrap
    out: dict[str, Any] = {
        "admin": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": 0}}},
        "staticResources": {"listeners": listeners, "clusters": clusters},
    }
    if secrets := dump.secrets:
        out["staticResources"]["secrets"] = secrets
    for key in ("layeredRuntime", "overloadManager"):
        if key in boot:
            out[key] = copy.deepcopy(boot[key])
    return out
