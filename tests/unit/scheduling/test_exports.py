"""The package's exports (``epp/scheduling/__init__.py``): the surface a plugin author uses."""

from __future__ import annotations

import inspect

import epp.scheduling
import epp.scheduling.base

# What a plugin author needs: the protocols a plugin implements and the snapshot it reads
# (base.py), and the means to build and run a scheduler from a profile (profile.py,
# scheduler.py). Everything else in the package is internal.
PLUGIN_SURFACE = {
    "Candidates", "Filter", "Scorer", "Picker",
    "EndpointPickerConfig", "SchedulerProfile", "BUILTIN_PROFILES", "builtin_config", "load_config_file",
    "parse_config", "plugin_types",
    "Scheduler", "LoadView", "SchedulingView", "build_scheduler",
}  # fmt: skip


def test_exports_are_sorted_and_complete():
    exported = epp.scheduling.__all__
    assert exported == sorted(exported)
    assert len(set(exported)) == len(exported) and all(hasattr(epp.scheduling, n) for n in exported)
    # exactly the plugin surface: nothing missing, nothing internal (or mutable) on top
    assert set(exported) == PLUGIN_SURFACE
    # every public class of the plugin-surface module is exported
    base_classes = {
        name for name, obj in vars(epp.scheduling.base).items()
        if inspect.isclass(obj) and obj.__module__ == "epp.scheduling.base" and not name.startswith("_")
    }  # fmt: skip
    assert base_classes and base_classes <= set(exported)
    # and the exports are the package's own, not re-exports of other layers
    for name in exported:
        obj = getattr(epp.scheduling, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__.startswith("epp.scheduling."), name
