"""The engine table (``epp/datalayer/engines.py``): which dialect a pod speaks."""

from __future__ import annotations

from epp.datalayer.engines import engine_for


def test_engine_selection_pod_label_wins():
    assert engine_for("vllm", {"inference.networking.k8s.io/engine-type": "sglang"}).engine == "sglang"
    assert engine_for("sglang", {}).engine == "sglang"
    assert engine_for("tgi", None).engine == "vllm"
