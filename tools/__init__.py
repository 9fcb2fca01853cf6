"""Development tools shared by tests/ and benchmarks/ (never imported by src/).

``tools.run``: long build commands with progress and a deadline.  ``tools.kube``: a real
etcd + kube-apiserver on 127.0.0.1 and an admin client for it.  ``tools.egctl``: Envoy
Gateway's ``egctl``, built once.  Run from the repository root (``python -m tools.kube.build``);
pytest has the root on its path, benchmarks add it themselves.
"""
