"""What every capability module shares: the common exception, the turning of a WIT error
variant into it, and the import of a capability's bindings with an error that says how to
build them in."""

import importlib
import inspect
from contextlib import contextmanager

from componentize_py_types import Err


class HostCapabilityError(Exception):
    """An error a host capability answered with (a case of its WIT error variant). Each
    capability has a subclass of its own (`sql.SqlError`, `objects.ObjectError`, …), and each
    case a subclass of that, carrying the case's fields."""


class CalledWhileBuilding(HostCapabilityError):
    """A capability was called while the component was being built: the app is imported (and
    warmed up) then, with no host to answer. Call capabilities while serving a request."""


def bindings(capability: str):
    """The componentize-py bindings of `capability` (`sql`, `hmac_registry`, …). They exist only
    when the component imports the capability, which `guests/python/build --capabilities`
    decides; the app is imported while it is built, so this error fails the build."""
    try:
        module = importlib.import_module(f"wit_world.imports.{capability}")
    except ModuleNotFoundError:
        raise ImportError(
            f"host_capabilities.{capability}: this component is built without the "
            f"{capability.replace('_', '-')} capability; build it with "
            f"guests/python/build --capabilities naming {capability.replace('_', '-')} "
            f"(or --capabilities all)"
        ) from None
    _bound.append(module)
    if _refused is not None:
        _refuse(module)
    return module


# While the component is built there is no host: a call of an import traps, which fails the
# build with nothing but the trap's stack. Between refuse_calls() and allow_calls() the bindings'
# functions raise CalledWhileBuilding instead, which the app's own error handling sees.
_bound = []
# The functions replaced, with their modules, while calls are refused; None otherwise.
_refused = None


def refuse_calls() -> None:
    global _refused
    _refused = []
    for module in _bound:
        _refuse(module)


def allow_calls() -> None:
    global _refused
    for module, name, function in _refused or ():
        setattr(module, name, function)
    _refused = None


def _refuse(module) -> None:
    package = module.__name__.rpartition(".")[2].replace("_", "-")
    for name, value in list(vars(module).items()):
        if inspect.isfunction(value) and value.__module__ == module.__name__:
            _refused.append((module, name, value))
            setattr(module, name, _refusal(f"host:capabilities/{package} {name}"))


def _refusal(what: str):
    def refused(*args, **kwargs):
        raise CalledWhileBuilding(
            f"{what} was called while the component was being built (the app is imported and "
            f"warmed up then, with no host to answer): call capabilities while serving a request"
        )

    return refused


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
