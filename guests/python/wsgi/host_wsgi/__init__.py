"""A WSGI (PEP 3333) server inside a wasi:http component: `guests/python/build MODULE:CALLABLE`
generates an entry module that calls `handler_for("MODULE:CALLABLE")`, and componentize-py
exports the class it returns as the component's `wasi:http/incoming-handler`.

The app is imported when the component is built (componentize-py runs the entry module then and
keeps the interpreter's memory as the component's initial state), so a request starts with the
app already loaded; a module the app first imports while it serves a request is not there (see
`preload`). It is also served a few requests then (`host_wsgi.warm_up`), so that an instance
starts with the app warm, not only loaded.

One request, as gunicorn's sync worker serves it:

- `environ` is made from the request (`host_wsgi.environ`), with `wsgi.input` streaming the body;
- the app's iterable is written to the client as it yields (`host_wsgi.response`), so the
  bridge never holds a large download whole; the status and headers go out with the first
  non-empty chunk (or at the end), so until then the app may still call `start_response` again
  with `exc_info`;
- a `wsgi.file_wrapper` the app returns whose file holds host streams (host_capabilities'
  `Stream`) is spliced to the client inside the host, its bytes never in Python
  (`host_wsgi.response.FileWrapper`);
- `close()` of the iterable is called whatever happens;
- an exception the app lets out is not answered by the bridge: componentize-py prints its
  traceback to stderr, which the host logs under the request id, and the instance traps, which
  the host answers 500 (or, once the response has begun, cuts it so the client sees it cut).
"""

import gc
import importlib
import sys

from componentize_py_types import Ok
from host_capabilities._base import allow_calls, refuse_calls
from wit_world import exports
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)

from host_wsgi.environ import BadRequest, make_environ
from host_wsgi.response import FileWrapper, Response, close_if_closable
from host_wsgi.preload import preload
from host_wsgi.warm_up import warm_up


def handler_for(target: str, warm_up_path: "str | None" = None) -> type:
    """The `wasi:http/incoming-handler` class serving the WSGI callable named by `target`
    (`module:callable`, the callable possibly a dotted attribute, as gunicorn takes it), warmed
    up with requests for `warm_up_path` (`host_wsgi.warm_up`) unless it is None."""
    # No host answers while the component is built: a capability called before the snapshot
    # raises instead of trapping.
    refuse_calls()
    app = load(target)
    preload()
    if warm_up_path is not None:
        warm_up(app, warm_up_path)
    allow_calls()
    # What the app and its imports made lives as long as the instance: out of the collector's
    # reach, a collection while serving neither walks it nor writes to (and so copies) the pages
    # of the initial memory that hold it, as gunicorn users do with --preload.
    gc.collect()
    gc.freeze()

    class IncomingHandler(exports.IncomingHandler):
        def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
            serve(app, request, response_out)

    return IncomingHandler


def load(target: str):
    module_name, colon, attribute = target.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"{target!r} is not MODULE:CALLABLE (e.g. app:app)")
    app = importlib.import_module(module_name)
    for name in attribute.split("."):
        try:
            app = getattr(app, name)
        except AttributeError:
            raise ValueError(f"{target}: module {module_name!r} has no {attribute!r}") from None
    if not callable(app):
        raise ValueError(f"{target}: {attribute!r} is not callable (a WSGI app is)")
    return app


def serve(app, request: IncomingRequest, response_out: ResponseOutparam) -> None:
    try:
        environ, body = make_environ(request)
    except BadRequest as refusal:
        answer(response_out, 400, f"bad request: {refusal}\n".encode())
        return
    response = Response(response_out, head_only=environ["REQUEST_METHOD"] == "HEAD")
    try:
        result = app(environ, response.start_response)
        try:
            sources = result.input_streams() if isinstance(result, FileWrapper) else None
            if sources is not None:
                response.splice(sources)
            else:
                for chunk in result:
                    response.write(chunk)
            response.finish()
        finally:
            close_if_closable(result)
    finally:
        # What the app wrote to wsgi.errors or printed is logged under this request's id,
        # not under the next one a kept instance serves.
        sys.stderr.flush()
        sys.stdout.flush()
        body.release()


def answer(response_out: ResponseOutparam, status: int, text: bytes) -> None:
    """A short plain-text answer of the bridge's own."""
    response = OutgoingResponse(
        Fields.from_list(
            [
                ("content-type", b"text/plain; charset=utf-8"),
                ("content-length", b"%d" % len(text)),
            ]
        )
    )
    response.set_status_code(status)
    body = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    with body.write() as stream:
        stream.blocking_write_and_flush(text)
    OutgoingBody.finish(body, None)
