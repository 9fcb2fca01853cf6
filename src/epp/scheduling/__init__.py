"""Scheduling: choose endpoints for an :class:`~epp.domain.InferenceRequest`.

Pure and synchronous: never imports grpc, aiohttp, kubernetes or ``epp.extproc``.
The plugin surface is what this module exports; everything else is internal.
"""

from epp.scheduling.base import Candidates, Filter, Picker, Scorer
from epp.scheduling.profile import (
    BUILTIN_PROFILES,
    EndpointPickerConfig,
    SchedulerProfile,
    builtin_config,
    load_config_file,
    parse_config,
    plugin_types,
)
from epp.scheduling.scheduler import LoadView, Scheduler, SchedulingView, build_scheduler

__all__ = [
    "BUILTIN_PROFILES",
    "Candidates",
    "EndpointPickerConfig",
    "Filter",
    "LoadView",
    "Picker",
    "Scheduler",
    "SchedulerProfile",
    "SchedulingView",
    "Scorer",
    "build_scheduler",
    "builtin_config",
    "load_config_file",
    "parse_config",
    "plugin_types",
]
