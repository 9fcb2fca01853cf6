"""Names on the wire: the endpoint-picker protocol's headers and Envoy metadata keys, and the
model servers' admin paths that are never routed.

Defined once, here; the ext_proc transport, routing and the Envoy config renderer all
import them.  A leaf module: it imports nothing from epp.
"""

from __future__ import annotations

# epp → Envoy: where to send the request
DESTINATION_HEADER = "x-gateway-destination-endpoint"  # the primary, one ip:port
LB_NAMESPACE = "envoy.lb"  # dynamic metadata namespace; DESTINATION_HEADER key: primary,fallback,...
MIRROR_HEADER = "x-gateway-mirror-endpoint"  # epp's load-aware pick in the shadow pool
# Envoy → epp: which endpoint actually served (override_host writes it into envoy.lb)
SERVED_KEY = "x-gateway-destination-endpoint-served"
# Envoy → epp: restrict the pick to a subset
SUBSET_HINT_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
# client → epp: request options
MODEL_REWRITE_HEADER = "x-gateway-model-name-rewrite"
OBJECTIVE_HEADER = "x-gateway-inference-objective"
REQUEST_ID_HEADER = "x-request-id"
# Envoy's limit on a request's header count (HCM max_headers_count, default 100); it also
# bounds header mutations, so epp's own headers must fit under it (epp answers 431 if not).
MAX_REQUEST_HEADERS = 100
# GIE conformance test hooks (epp serve --conformance-test-hooks only): client → epp, epp → client
TEST_SELECTION_HEADER = "test-epp-endpoint-selection"
TEST_SERVED_HEADER = "x-conformance-test-served-endpoint"

# Model-server admin paths (vLLM, SGLang): never routed through the gateway by default,
# so a client cannot load adapters, flush caches or read a pod's metrics through it.
ADMIN_PATHS: tuple[str, ...] = (
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/metrics",
    "/reset_prefix_cache",
    "/reset_mm_cache",
    "/sleep",
    "/wake_up",
    "/is_sleeping",
    "/collective_rpc",
    "/start_profile",
    "/stop_profile",
    "/scale_elastic_ep",
    "/server_info",
    "/flush_cache",
    "/update_weights_from_disk",
    "/update_weights_from_tensor",
    "/update_weights_from_distributed",
    "/init_weights_update_group",
    "/release_memory_occupation",
    "/resume_memory_occupation",
    "/configure_logging",
    "/abort_request",
    "/load_lora_adapter",
    "/unload_lora_adapter",
)
