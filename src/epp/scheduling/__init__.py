"""Scheduling: choose endpoints for an :class:`~epp.domain.InferenceRequest`.

Pure and synchronous: never imports grpc, aiohttp, kubernetes or ``epp.extproc``.
"""

from epp.scheduling.scheduler import LeastInflightScheduler, LoadView, Scheduler, build_scheduler

__all__ = ["LeastInflightScheduler", "LoadView", "Scheduler", "build_scheduler"]
