"""Memory figures of the host and of this instance (`wit/status.wit`), in bytes.

    figures = status.memory()
    figures.instance_used, figures.instance_limit, figures.host_resident, …
"""

from typing import NamedTuple, Optional

from host_capabilities._base import bindings

_wit = bindings("status")


class MemoryFigures(NamedTuple):
    """The figures at the moment of the call (`wit/status.wit` says what each is)."""

    host_resident: int
    host_budget: Optional[int]
    host_limit: int
    worker_resident: int
    instance_used: int
    instance_limit: int


def memory() -> MemoryFigures:
    figures = _wit.memory()
    return MemoryFigures(
        figures.host_resident,
        figures.host_budget,
        figures.host_limit,
        figures.worker_resident,
        figures.instance_used,
        figures.instance_limit,
    )
