// A JavaScript wasi:http guest for the host's tests (componentize-js's fetch-event style): hello,
// a count of the requests its instance has served, an echo of the request body, a body that
// fails after its first bytes, memory taken until refused, and a loop that never ends.
let served = 0;

addEventListener("fetch", (event) => {
  served += 1;
  event.respondWith(answer(event.request));
});

async function answer(request) {
  const path = new URL(request.url).pathname;
  switch (path) {
    case "/served":
      return new Response(`${served}\n`);
    case "/echo":
      return new Response(await request.arrayBuffer());
    case "/throw-mid-response": {
      const chunk = new Uint8Array(64 * 1024).fill(120);
      let sent = false;
      const body = new ReadableStream({
        pull(controller) {
          if (!sent) {
            sent = true;
            controller.enqueue(chunk);
          } else {
            controller.error(new Error("failed mid-response on purpose"));
          }
        },
      });
      return new Response(body, { headers: { "content-length": String(1024 * 1024) } });
    }
    case "/grow": {
      const held = [];
      for (;;) {
        held.push(new Uint8Array(1024 * 1024).fill(1));
      }
    }
    case "/spin":
      for (;;) {}
    default:
      return new Response("Hello from JavaScript\n");
  }
}
