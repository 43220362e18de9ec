"""Moorage: a private OCI container image registry that scales with replicas over etcd."""

__version__ = "0.1.0"
