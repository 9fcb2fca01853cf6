"""A real kube-apiserver for tests and benchmarks: built once, run on 127.0.0.1, driven as admin.

* ``tools.kube.build``: ``ensure_kube_apiserver()`` (built with Go at a pinned version,
  cached under ``~/.cache/epp/kube``) and ``ensure_etcd()`` (Debian's ``etcd-server``).
  ``python -m tools.kube.build`` does both once and prints the two paths.
* ``tools.kube.cluster``: ``KubeCluster``, etcd + kube-apiserver with RBAC and
  service-account signing, in a work directory; restartable in place.
* ``tools.kube.admin``: ``Admin``, what a test or benchmark does to the API server as its
  admin (namespaces, pods and their status, custom objects, CRDs from ``crds/``, RBAC,
  ServiceAccount tokens).  Pod IPs are loopback addresses only.
"""
