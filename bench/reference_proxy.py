"""Relay chat completions with nothing else: the baseline the performance issue names.

    python bench/reference_proxy.py --upstream URL [--port 0] [--key KEY]

Issue 6 states the gateway's CPU targets as ratios to "a 70-line Tornado
proxy, curl client", measured in the same run; this is that proxy. One handler
takes POST on any path and sends the body to the stand-in's chat-completions
URL (`--upstream`, the full URL) through Tornado's `CurlAsyncHTTPClient`, whose
libcurl handles keep their upstream connections alive. A body with
`"stream": true` (a byte search, not a parse) is relayed chunk by chunk as it
arrives, each written and flushed at once (always with status 200: the relay
starts before the upstream's status is looked at); any other answer goes back
whole, with the upstream's status and content type. No validation, no logging,
no metrics, no error mapping; the loop is uvloop's, as in server.py.

Two settings match the gateway's, so that the comparison is of the work done
per request and not of configuration: the same number of curl handles (a
smaller pool would queue requests), and `TCP_NODELAY` on streamed answers.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys

import uvloop
from tornado.curl_httpclient import CurlAsyncHTTPClient
from tornado.httpclient import HTTPRequest
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

MAX_CLIENTS = 1000  # the gateway's default MAX_CLIENTS
STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')


class RelayHandler(RequestHandler):
    def initialize(self, client: CurlAsyncHTTPClient, upstream: str, key: str) -> None:
        self.client = client
        self.upstream = upstream
        self.key = key

    async def post(self) -> None:
        headers = {"Content-Type": "application/json", "api-key": self.key}
        if STREAM_TRUE.search(self.request.body) is None:
            request = HTTPRequest(self.upstream, "POST", headers, self.request.body)
            response = await self.client.fetch(request, raise_error=False)
            self.set_status(response.code)
            self.set_header(
                "Content-Type", response.headers.get("Content-Type", "application/json")
            )
            self.finish(response.body)
            return
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.request.connection.stream.set_nodelay(True)
        request = HTTPRequest(
            self.upstream, "POST", headers, self.request.body, streaming_callback=self.relay
        )
        await self.client.fetch(request, raise_error=False)
        self.finish()

    def relay(self, chunk: bytes) -> None:
        self.write(chunk)
        self.flush()


async def serve(args: argparse.Namespace) -> None:
    client = CurlAsyncHTTPClient(force_instance=True, max_clients=MAX_CLIENTS)
    settings = {"client": client, "upstream": args.upstream, "key": args.key}
    app = Application([(r"/.*", RelayHandler, settings)], log_function=lambda handler: None)
    sockets = bind_sockets(args.port, "127.0.0.1")
    server = HTTPServer(app)
    server.add_sockets(sockets)
    print(
        f"reference_proxy listening on http://127.0.0.1:{sockets[0].getsockname()[1]}", flush=True
    )
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    # No client.close(): with transfers still running it would leave libcurl
    # timers firing on a closed client. The process ends here anyway.
    server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="the stand-in's chat-completions URL")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--key", default="", help="sent upstream as api-key")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
