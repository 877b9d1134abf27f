"""A Python wasi:http guest for the host's tests: hello, a count of the requests its instance
has served (what it sees of instances kept between requests), an echo of the request body,
an exception before and after the response began, memory held for good, and a loop that never
ends."""

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports.streams import StreamError_Closed
from wit_world.imports.types import (
    Fields,
    IncomingRequest,
    OutgoingBody,
    OutgoingResponse,
    ResponseOutparam,
)

SERVED = 0
KEPT = []


def respond(response_out: ResponseOutparam, status: int, body: bytes) -> None:
    headers = Fields.from_list(
        [("content-type", b"text/plain"), ("content-length", str(len(body)).encode())]
    )
    response = OutgoingResponse(headers)
    response.set_status_code(status)
    outgoing = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    stream = outgoing.write()
    write_all(stream, body)
    stream.__exit__(None, None, None)
    OutgoingBody.finish(outgoing, None)


def write_all(sink, data: bytes) -> None:
    """Writes `data` in the pieces a blocking write takes (at most 4096 bytes)."""
    for start in range(0, len(data), 4096):
        sink.blocking_write_and_flush(data[start : start + 4096])


def echo(request: IncomingRequest, response_out: ResponseOutparam) -> None:
    """Streams the request body back, 64 KiB at a time."""
    response = OutgoingResponse(Fields.from_list([("content-type", b"application/octet-stream")]))
    outgoing = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    incoming = request.consume()
    source = incoming.stream()
    sink = outgoing.write()
    while True:
        try:
            chunk = source.blocking_read(64 * 1024)
        except Err as error:
            if isinstance(error.value, StreamError_Closed):
                break
            raise
        write_all(sink, chunk)
    source.__exit__(None, None, None)
    sink.__exit__(None, None, None)
    OutgoingBody.finish(outgoing, None)


def fail_mid_response(response_out: ResponseOutparam) -> None:
    """A 200 whose body is cut: 1 MiB, then an exception."""
    response = OutgoingResponse(Fields.from_list([("content-type", b"text/plain")]))
    outgoing = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    sink = outgoing.write()
    write_all(sink, b"x" * (1 << 20))
    raise RuntimeError("the /raise-mid-response route fails on purpose")


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        global SERVED
        SERVED += 1
        path = (request.path_with_query() or "/").split("?")[0]
        if path == "/":
            respond(response_out, 200, b"Hello from Python\n")
        elif path == "/served":
            respond(response_out, 200, f"{SERVED}\n".encode())
        elif path == "/echo":
            echo(request, response_out)
        elif path == "/raise-mid-response":
            fail_mid_response(response_out)
        elif path == "/raise":
            raise RuntimeError("the /raise route fails on purpose")
        elif path == "/try-grow":
            # A refused grow, handled: the instance goes on, and its memory with it.
            try:
                bytearray(256 << 20)
                respond(response_out, 200, b"grew\n")
            except MemoryError:
                respond(response_out, 200, b"refused, and carried on\n")
        elif path == "/keep":
            # 4 MiB held by the instance for good.
            KEPT.append(bytearray(4 << 20))
            respond(response_out, 200, f"keeping {4 * len(KEPT)} MiB\n".encode())
        elif path == "/spin":
            while True:
                pass
        else:
            respond(response_out, 404, b"not found\n")
