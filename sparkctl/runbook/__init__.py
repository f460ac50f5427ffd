"""The runbook language: a runbook's models, loading (built-in and user-written), the action library, and the
pure planner that turns a runbook, an inventory and the hosts' facts into a Plan."""
