"""The framework floor: Tornado + CurlAsyncHTTPClient forwarding POST bodies, nothing else.

No auth, no validation, no logging, one process. ``POST /u/<port>/<path>`` goes to
``http://127.0.0.1:<port>/<path>`` with a fixed upstream key; status, content type and body
come back. Event streams are flushed chunk by chunk. Usage: bare_forwarder.py --port N
"""

import argparse
import asyncio

import tornado.web
from tornado.curl_httpclient import CurlAsyncHTTPClient


class ForwardHandler(tornado.web.RequestHandler):
    def initialize(self, client: CurlAsyncHTTPClient, key: str) -> None:
        self.client, self.key, self.streaming = client, key, False

    def on_header(self, line: str) -> None:
        if line.startswith("HTTP/"):
            self.set_status(int(line.split()[1]))
        elif line.lower().startswith("content-type:"):
            value = line.split(":", 1)[1].strip()
            self.set_header("Content-Type", value)
            self.streaming = value.startswith("text/event-stream")

    def on_chunk(self, chunk: bytes) -> None:
        self.write(chunk)
        if self.streaming:
            self.flush()

    async def post(self, port: str, path: str) -> None:
        await self.client.fetch(
            f"http://127.0.0.1:{port}/{path}", method="POST", body=self.request.body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"},
            header_callback=self.on_header, streaming_callback=self.on_chunk,
            raise_error=False, request_timeout=600)


async def serve(port: int, key: str) -> None:
    client = CurlAsyncHTTPClient(force_instance=True, max_clients=1000)
    app = tornado.web.Application([(r"/u/(\d+)/(.*)", ForwardHandler, {"client": client, "key": key})],
                                  log_function=lambda handler: None)
    app.listen(port, "127.0.0.1", backlog=4096, idle_connection_timeout=3600)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-key", default="sk-bench-upstream")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.upstream_key))
