"""Effects, and only here: SSH to the hosts (ssh.py), local processes (local.py), HTTP probes (http.py).

Nothing else in sparkctl starts a process or opens a connection; the session (session/session.py) is the only
user that builds a connector, through the `Connect` seam in base.py.
"""
