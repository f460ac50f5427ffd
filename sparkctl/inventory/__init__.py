"""Inventory: the cluster sparkctl manages, validated before anything runs."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from sparkctl.inventory.checks import check_inventory
from sparkctl.inventory.load import load_model, read_text
from sparkctl.inventory.models import FabricInterface, Host, Inventory, Workload

__all__ = ["FabricInterface", "Host", "Inventory", "Workload", "load_inventory", "parse_inventory"]


def parse_inventory(text: str, name: str = "<inventory>") -> Inventory:
    """Validate inventory YAML text; raises InventoryError listing every problem."""
    return load_model(text, name, Inventory, check_inventory)


def load_inventory(path: str | Path) -> Inventory:
    """Load and validate an inventory file."""
    return parse_inventory(read_text(path), str(path))


def example_inventory_text() -> str:
    """The bundled example pair inventory (used when no -i is given and ./inventories has none)."""
    return resources.files("sparkctl").joinpath("data/example-pair.yaml").read_text()
