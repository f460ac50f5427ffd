"""Runbooks: built-in (`up`, `down`) and user-written, planned and applied by one engine."""
