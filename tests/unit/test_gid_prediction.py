"""The RoCE v2 GID index predicted for a twin whose address is not (fully) in the table yet."""

from __future__ import annotations

import ipaddress

from sparkctl.facts.models import GidEntry, HostFacts
from sparkctl.inventory.models import FabricInterface
from sparkctl.plan.env import detect_gid_index

TWIN = FabricInterface(
    interface="enp1s0f1np1", address=ipaddress.IPv4Interface("192.168.100.10/24"), rdma_device="rocep1s0f1"
)
LINK_LOCAL = "fe80:0000:0000:0000:4ebb:47ff:fe2a:20c1"
MAPPED = "0000:0000:0000:0000:0000:ffff:c0a8:640a"  # ::ffff:192.168.100.10


def facts(*entries: tuple[int, str, str]) -> HostFacts:
    gids = [GidEntry(device="rocep1s0f1", port=1, index=i, gid=g, type=t, ndev="enp1s0f1np1") for i, g, t in entries]
    return HostFacts(host="spark-a", gids=gids)


BASE = ((0, LINK_LOCAL, "IB/RoCE v1"), (1, LINK_LOCAL, "RoCE v2"))


def test_no_address_yet_predicts_the_second_free_slot() -> None:
    assert detect_gid_index(facts(*BASE), TWIN) == (3, True)


def test_address_in_the_table_is_read_not_predicted() -> None:
    assert detect_gid_index(facts(*BASE, (2, MAPPED, "IB/RoCE v1"), (3, MAPPED, "RoCE v2")), TWIN) == (3, False)


def test_table_read_while_the_kernel_adds_the_entries_predicts_the_same_slot() -> None:
    # the v1 entry is there, the v2 entry not yet: its slot is still 3, not the next free one (4)
    assert detect_gid_index(facts(*BASE, (2, MAPPED, "IB/RoCE v1")), TWIN) == (3, True)
