"""The Envoy-facing transport: ext_proc gRPC server, per-stream state machine, response builders."""
