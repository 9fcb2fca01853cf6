"""Envoy in front of epp: render the bootstrap config and run the ``envoy`` binary."""

from epp.envoy.ai_gateway import render_ai_gateway_bootstrap
from epp.envoy.config import BodyMode, LbMode, cluster_name, dump_bootstrap, render_bootstrap
from epp.envoy.process import EnvoyProcess, find_envoy, validate

__all__ = [
    "BodyMode",
    "EnvoyProcess",
    "LbMode",
    "cluster_name",
    "dump_bootstrap",
    "find_envoy",
    "render_ai_gateway_bootstrap",
    "render_bootstrap",
    "validate",
]
