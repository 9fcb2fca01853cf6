"""epp: an Endpoint Picker (Envoy ext_proc) for LLM inference pools."""

__version__ = "0.1.0"
