"""Envoy Gateway's ``egctl``, for rendering the project's manifests into xDS offline.

``tools.egctl.build``: ``ensure_egctl()`` installs a pinned ``egctl`` with Go once and caches
it under ``~/.cache/epp/egctl/<version>/``; ``python -m tools.egctl.build`` does it and
prints the path (``make test`` runs it before pytest, so the cold build is not charged to a
test's timeout).
"""
