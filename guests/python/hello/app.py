"""A Python wasi:http guest for the host's tests: hello, a count of the requests its instance
has served (what it sees of instances kept between requests), a trap, memory held for good,
and a loop that never ends."""

from componentize_py_types import Ok
from wit_world import exports
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
    stream.blocking_write_and_flush(body)
    stream.__exit__(None, None, None)
    OutgoingBody.finish(outgoing, None)


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        global SERVED
        SERVED += 1
        path = (request.path_with_query() or "/").split("?")[0]
        if path == "/":
            respond(response_out, 200, b"Hello from Python\n")
        elif path == "/served":
            respond(response_out, 200, f"{SERVED}\n".encode())
        elif path == "/raise":
            raise RuntimeError("the /raise route fails on purpose")
        elif path == "/keep":
            # 4 MiB held by the instance for good.
            KEPT.append(bytearray(4 << 20))
            respond(response_out, 200, f"keeping {4 * len(KEPT)} MiB\n".encode())
        elif path == "/spin":
            while True:
                pass
        else:
            respond(response_out, 404, b"not found\n")
