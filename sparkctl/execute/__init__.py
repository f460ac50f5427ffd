"""Effects: the only place sparkctl talks to hosts (ssh.py) or starts local processes (local.py)."""
