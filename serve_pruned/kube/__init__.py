"""Kubernetes objects built as data from one typed spec (torch-free: `deploy render` needs no torch)."""

from serve_pruned.kube.build import build, dump
from serve_pruned.kube.checks import check
from serve_pruned.kube.spec import DeploySpec, from_plan

__all__ = ["DeploySpec", "build", "check", "dump", "from_plan"]
