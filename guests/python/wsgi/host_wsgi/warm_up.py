"""Requests the app serves while the component is built, before the interpreter's memory becomes
the component's initial state, so that every instance starts warm.

What an app does the first times it serves a request, it would otherwise do on every fresh
instance: CPython specializes the bytecode it runs (in place, in the code objects), and
libraries fill caches on first use (Werkzeug compiles its URL map on the first match, `re`
caches patterns, Flask sets up its request machinery). Serving a few requests at build time
keeps all of that in the snapshot: measured on Flask's hello, a fresh instance then costs about
a third less CPU (the README's Python apps section has the figures).

The requests are `GET` of one path of the app's (`guests/python/build --warm-up`, `/` by
default) as a client would send it, with no body and no headers but the peer's; what they
answer is thrown away, and whether they fail does not matter (what ran until then is warm).
The host is not there while the component is built: a capability called then raises
host_capabilities' `CalledWhileBuilding`, which the app's own error handling sees (Flask
answers it 500). What the app writes then is not shown: componentize-py keeps a building
guest's output to itself.
"""

import io

from host_wsgi.environ import wsgi_environ
from host_wsgi.response import close_if_closable

# Enough for CPython to specialize what the requests run (it does after a couple of runs) and
# for every cache to be filled; each takes milliseconds at build time only.
RUNS = 8


def warm_up(app, path: str) -> None:
    """Serves `GET path` to `app` RUNS times, as the bridge would serve it, and throws the
    answers away."""
    for _ in range(RUNS):
        serve_discarding(app, path)


def serve_discarding(app, path: str) -> None:
    environ = wsgi_environ("GET", "http", "localhost", path, {"x-forwarded-for": ["127.0.0.1"]},
                           None, io.BytesIO())
    try:
        result = app(environ, lambda status, headers, exc_info=None: lambda data: None)
        try:
            for _chunk in result:
                pass
        finally:
            close_if_closable(result)
    except Exception:
        # The app's failure is its own answer: a fresh instance would give it too.
        pass
