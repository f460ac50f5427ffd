"""Workloads that sparkctl runs on the hosts; each module is self-contained and shipped as one file."""
