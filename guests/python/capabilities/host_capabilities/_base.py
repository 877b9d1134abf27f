"""What every capability module shares: the common exception, the turning of a WIT error
variant into it, and the import of a capability's bindings with an error that says how to
build them in."""

import importlib
from contextlib import contextmanager

from componentize_py_types import Err


class HostCapabilityError(Exception):
    """An error a host capability answered with (a case of its WIT error variant). Each
    capability has a subclass of its own (`sql.SqlError`, `objects.ObjectError`, …), and each
    case a subclass of that, carrying the case's fields."""


def bindings(capability: str):
    """The componentize-py bindings of `capability` (`sql`, `hmac_registry`, …). They exist only
    when the component imports the capability, which `guests/python/build --capabilities`
    decides; the app is imported while it is built, so this error fails the build."""
    try:
        return importlib.import_module(f"wit_world.imports.{capability}")
    except ModuleNotFoundError:
        raise ImportError(
            f"host_capabilities.{capability}: this component is built without the "
            f"{capability.replace('_', '-')} capability; build it with "
            f"guests/python/build --capabilities naming {capability.replace('_', '-')} "
            f"(or --capabilities all)"
        ) from None


@contextmanager
def raising(cases: dict):
    """Turns an `Err` of a WIT call into the exception `cases` makes of its variant case
    (`cases` maps each case's binding class to a function of the case)."""
    try:
        yield
    except Err as error:
        make = cases.get(type(error.value))
        if make is None:
            raise
        raise make(error.value) from None
