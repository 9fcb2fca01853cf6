"""Scheduling: choose endpoints for an :class:`~epp.domain.InferenceRequest`.

Pure and synchronous: never imports grpc, aiohttp, kubernetes or ``epp.extproc``.
The plugin surface is what this module exports; everything else is internal.
"""

from epp.scheduling.base import Candidates, Filter, Picker, Scorer
from epp.scheduling.profile import (
    BUILTIN,
    PLUGINS,
    EndpointPickerConfig,
    SchedulerProfile,
    builtin_config,
    load_config_file,
    parse_config,
)
from epp.scheduling.scheduler import Scheduler, SchedulingView, build_scheduler

__all__ = [
    "BUILTIN",
    "PLUGINS",
    "Candidates",
    "EndpointPickerConfig",
    "Filter",
    "Picker",
    "Scheduler",
    "SchedulerProfile",
    "SchedulingView",
    "Scorer",
    "build_scheduler",
    "builtin_config",
    "load_config_file",
    "parse_config",
]
