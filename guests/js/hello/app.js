// A JavaScript wasi:http guest for the host's tests (componentize-js's fetch-event style): hello,
// and a count of the requests its instance has served.
let served = 0;

addEventListener("fetch", (event) => {
  served += 1;
  const path = new URL(event.request.url).pathname;
  if (path === "/served") {
    event.respondWith(new Response(`${served}\n`));
  } else {
    event.respondWith(new Response("Hello from JavaScript\n"));
  }
});
