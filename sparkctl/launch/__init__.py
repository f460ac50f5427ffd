"""Ray and worker launch: pure command builders plus the laptop-side readiness probes."""
