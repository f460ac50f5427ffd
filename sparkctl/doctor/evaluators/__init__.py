"""Evaluators: one function per kind of test in the rule table; each returns findings for its rule.

`core` holds what they share (`CheckContext`, the `@evaluator` registry `EVALUATORS`, the finding helpers); the
evaluators live by subject: `host` (reachability, GPU, driver, CUDA, kernel, memory, identity), `fabric` (the twins,
subnets, jumbo paths), `nccl` (NCCL's version and build, RDMA devices, GID index), `runtime` (Ray, ports, the
runtime and its image) and `workload` (health, memory fit, vLLM flags). Importing this package imports them all, so
every `@evaluator` is registered.
"""

from __future__ import annotations

from sparkctl.doctor.evaluators import fabric, host, nccl, runtime, workload
from sparkctl.doctor.evaluators.core import EVALUATORS, CheckContext, Evaluator, evaluator

__all__ = ["EVALUATORS", "CheckContext", "Evaluator", "evaluator", "fabric", "host", "nccl", "runtime", "workload"]
