"""Runs against live hosts: the one door to them (`open_session`), the engine that applies a Plan, the run of a
runbook (lock, secrets, facts, re-plan per stage, preflight, sudo, journal, interrupts), discovery, and the
read views of a cluster (status, watch, access, reports)."""
