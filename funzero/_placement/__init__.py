"""Placement: on which memory each part of the state lives. Offload is nothing more than this.

One module per kind (``_device.py``, ``_host.py`` with the host update every offloaded kind
uses, ``_nvme.py``), one interface (``_kind.Kind``), one parser and resolver (``_rules.py``).
"""

from funzero._placement._host import HostUpdate, update_offloaded
from funzero._placement._kind import Kind
from funzero._placement._nvme import filename, is_file_backed
from funzero._placement._rules import (
    KINDS,
    PARTS,
    Placement,
    conflict,
    group_of_path,
    kinds_named,
    parse_placement,
    parse_where,
)

__all__ = [
    "HostUpdate",
    "KINDS",
    "Kind",
    "PARTS",
    "Placement",
    "conflict",
    "filename",
    "group_of_path",
    "is_file_backed",
    "kinds_named",
    "parse_placement",
    "parse_where",
    "update_offloaded",
]
