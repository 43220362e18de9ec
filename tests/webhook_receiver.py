"""A real HTTP receiver of webhook events, for tests: an aiohttp server in a process of its own.

Every POST to /hook is appended to a JSON-lines file (its headers, and its body
as the bytes arrived, base64) and answered 204, so a test reads exactly what
a replica sent, signature header included, and can stop the receiver (its port
then refuses connections) and start it again on the same port.

    python tests/webhook_receiver.py --listen HOST:PORT --out FILE
"""

from __future__ import annotations

import argparse
import base64
import json
import sys

from aiohttp import web


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    out = open(args.out, "a", buffering=1)

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        out.write(json.dumps({"headers": dict(request.headers), "body": base64.b64encode(body).decode()}) + "\n")
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    web.run_app(app, host=host, port=int(port), print=lambda *_: print("ready", flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
