"""InferenceModel / InferenceObjective → model policies; CRDs absent, then installed."""

from __future__ import annotations

from tools.kube.admin import LLMD, V1, V1ALPHA2, Admin

from epp.discovery.kubernetes import V1ALPHA2_GROUP
from epp.domain import Criticality, ModelPolicy, TargetModel

from .kube_support import RecordingSink, Sources, v1_pool

ALPHA_REF = {"name": "pool"}  # InferenceModel's poolRef group defaults to inference.networking.x-k8s.io
V1_REF = {"name": "pool", "group": "inference.networking.k8s.io"}


def models_of(sink: RecordingSink) -> dict[str, ModelPolicy] | None:
    models = sink.policies.models
    return None if models is None else dict(models)


async def test_inference_models_feed_policies(admin: Admin, namespace: str, sources: Sources) -> None:
    ns, sink = namespace, sources.sink
    await admin.create(V1ALPHA2, "inferencepools", ns, "pool", {"selector": {"app": "x"}, "targetPortNumber": 8000})
    await admin.create(V1ALPHA2, "inferencemodels", ns, "chat", {
        "modelName": "chat", "criticality": "Critical", "poolRef": ALPHA_REF,
        "targetModels": [{"name": "chat-v1", "weight": 90}, {"name": "chat-v2", "weight": 10}],
    })
    await admin.create(V1ALPHA2, "inferencemodels", ns, "elsewhere",
                       {"modelName": "elsewhere", "poolRef": {"name": "another-pool"}})
    await admin.create(V1ALPHA2, "inferencemodels", ns, "wrong-group", {"modelName": "wrong-group", "poolRef": V1_REF})
    await sources.start(group=V1ALPHA2_GROUP)
    assert models_of(sink) == {"chat": ModelPolicy("chat", Criticality.CRITICAL,
                                                   (TargetModel("chat-v1", 90), TargetModel("chat-v2", 10)))}

    # Add: unset criticality means Standard, no targets means "sent as named".
    await admin.create(V1ALPHA2, "inferencemodels", ns, "batch", {"modelName": "batch", "poolRef": ALPHA_REF})
    await sink.wait_for(lambda s: "batch" in (models_of(s) or {}), what="batch added")
    assert models_of(sink)["batch"] == ModelPolicy("batch", Criticality.STANDARD, ())
    # A second object claiming a modelName already served loses to the older one.
    await admin.create(V1ALPHA2, "inferencemodels", ns, "chat-dup",
                       {"modelName": "chat", "criticality": "Sheddable", "poolRef": ALPHA_REF})
    # Change.
    await admin.patch(V1ALPHA2, "inferencemodels", ns, "batch", {"criticality": "Sheddable"})
    await sink.wait_for(lambda s: (models_of(s) or {}).get("batch", ModelPolicy("")).criticality
                        is Criticality.SHEDDABLE, what="batch sheddable")
    assert models_of(sink)["chat"].criticality is Criticality.CRITICAL
    # Delete: the duplicate takes over the name; deleting every model drops the allowlist.
    await admin.delete(V1ALPHA2, "inferencemodels", ns, "chat")
    await sink.wait_for(lambda s: (models_of(s) or {}).get("chat", ModelPolicy("")).criticality
                        is Criticality.SHEDDABLE, what="duplicate takes over")
    await admin.delete(V1ALPHA2, "inferencemodels", ns, "chat-dup")
    await admin.delete(V1ALPHA2, "inferencemodels", ns, "batch")
    await sink.wait_for(lambda s: s.policies.models is None, what="no allowlist")


async def test_objectives_for_this_pool_only(admin: Admin, namespace: str, sources: Sources) -> None:
    ns, sink = namespace, sources.sink
    await admin.create(V1, "inferencepools", ns, "pool", v1_pool({"app": "x"}, [8000]))
    await admin.create(V1ALPHA2, "inferenceobjectives", ns, "premium", {"priority": 10, "poolRef": {"name": "pool"}})
    await admin.create(V1ALPHA2, "inferenceobjectives", ns, "batch", {"priority": -5, "poolRef": {"name": "pool"}})
    await admin.create(V1ALPHA2, "inferenceobjectives", ns, "default", {"poolRef": V1_REF})
    await admin.create(V1ALPHA2, "inferenceobjectives", ns, "theirs", {"priority": 3, "poolRef": {"name": "other"}})
    await admin.create(V1ALPHA2, "inferenceobjectives", ns, "alpha-pool",
                       {"priority": 3, "poolRef": {"name": "pool", "group": "inference.networking.x-k8s.io"}})
    await sources.start()
    assert dict(sink.policies.objectives) == {"premium": 10, "batch": -5, "default": 0}
    assert sink.policies.models is None  # no InferenceModel: no allowlist
    await admin.patch(V1ALPHA2, "inferenceobjectives", ns, "batch", {"priority": 1})
    await sink.wait_for(lambda s: s.policies.objectives.get("batch") == 1, what="priority change")
    await admin.delete(V1ALPHA2, "inferenceobjectives", ns, "premium")
    await sink.wait_for(lambda s: "premium" not in s.policies.objectives, what="objective deleted")


async def test_crd_absent_then_installed_then_removed(admin: Admin, namespace: str, sources: Sources) -> None:
    """llm-d.ai's InferenceObjective CRD is not installed at first: feature off, no crash, then picked up."""
    ns, sink = namespace, sources.sink
    await admin.create(V1, "inferencepools", ns, "pool", v1_pool({"app": "x"}, [8000]))
    await admin.create(V1ALPHA2, "inferenceobjectives", ns, "legacy", {"priority": 1, "poolRef": {"name": "pool"}})
    source = await sources.start()
    llmd = source._objectives["llm-d.ai"]
    assert llmd.available is False and llmd.synced
    assert dict(sink.policies.objectives) == {"legacy": 1}
    assert sink.pool is not None  # the pool is served meanwhile
    try:
        await admin.install_crd("inferenceobjectives.llm-d.ai")
        await admin.create(LLMD, "inferenceobjectives", ns, "current", {"priority": 7, "poolRef": {"name": "pool"}})
        # When both groups exist, llm-d.ai's objectives supersede the legacy ones.
        await sink.wait_for(lambda s: dict(s.policies.objectives) == {"current": 7}, what="llm-d.ai objectives")
        assert llmd.available is True
    finally:
        await admin.delete_crd("inferenceobjectives.llm-d.ai")
    await sink.wait_for(lambda s: dict(s.policies.objectives) == {"legacy": 1}, what="back to legacy")
    assert not any(t.done() for t in sources._tasks)  # still running: no crash loop
