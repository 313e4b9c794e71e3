"""The floor: a bare WebSocket server that receives bot audio and appends it to a file.

It does what any ingest server must do at minimum (WebSocket framing and unmasking by
the same ``websockets`` library and settings the gateway uses, one file append per
binary message) and nothing else: no decoding, no ring, no VAD, no sessions, no
metrics. Its CPU per stream-second is what the gateway's is compared against.

Run::

    python benchmarks/floor.py --port 0 --dir /tmp/floor

It logs ``listening on HOST:PORT`` once bound and exits cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal
import sys
from pathlib import Path

from websockets.asyncio.server import ServerConnection, serve


async def main(host: str, port: int, directory: Path) -> None:
    numbers = itertools.count()

    async def receive(ws: ServerConnection) -> None:
        path = directory / f"{next(numbers)}.pcm"
        with open(path, "ab") as out, contextlib.suppress(Exception):
            async for message in ws:
                if isinstance(message, bytes):
                    out.write(message)

    # The same limits and choices as the gateway's server, so only the work differs.
    async with serve(
        receive, host, port, max_size=1 << 20, compression=None, server_header=None
    ) as server:
        bound = next(iter(server.sockets)).getsockname()
        print(f"listening on {bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dir", type=Path, required=True, help="where the files go")
    parser.add_argument("--no-uvloop", action="store_true", help="use the stock asyncio loop")
    args = parser.parse_args()
    if not args.no_uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    args.dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(main(args.host, args.port, args.dir))


if __name__ == "__main__":
    run()
