"""Integration testbed for sparkctl: fake DGX Sparks in Linux namespaces with real daemons.

Each host is a network + mount + PID + UTS + IPC namespace running dbus, udev, NetworkManager and
sshd, with SIMULATED GPU/RDMA tools and RoCE GID table. See docs/testbed.md.
"""

from ._proc import CommandError, TestbedError
from .faults import PortHandle
from .layout import LOGIN_USER, MGMT_IFNAME, SUDO_PASSWORD, TWINS, HostSpec, Twin
from .testbed import Testbed, running_testbed

__all__ = [
    "LOGIN_USER",
    "MGMT_IFNAME",
    "SUDO_PASSWORD",
    "TWINS",
    "CommandError",
    "HostSpec",
    "PortHandle",
    "Testbed",
    "TestbedError",
    "Twin",
    "running_testbed",
]
