"""Tests against a real kube-apiserver + etcd on 127.0.0.1 (see conftest.py)."""
