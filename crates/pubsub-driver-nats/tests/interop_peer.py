"""A second, independent NATS client (nats-py) for the interop tests.

Headers are written and read as the Go CDK's natsv2 mode does: names and
values query-escaped (urllib's quote_plus matches Go's url.QueryEscape).

publish URL SUBJECT BODY         publish BODY through JetStream with headers
get URL STREAM CONSUMER          print the next message as JSON and ack it
"""
import asyncio
import json
import sys
from urllib.parse import quote_plus, unquote_plus

import nats


async def publish(url, subject, body):
    nc = await nats.connect(url)
    js = nc.jetstream()
    headers = {
        quote_plus(k): quote_plus(v)
        for k, v in {
            "kind": "greeting",
            "with space": "a/b c=d&e",
            "ünï": "値 🎉",
            "empty": "",
        }.items()
    }
    # Written by a client that does not escape: kept as it came.
    headers["raw"] = "50%"
    await js.publish(subject, body.encode(), headers=headers)
    await nc.drain()


async def get(url, stream, consumer):
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(consumer, stream)
    [msg] = await sub.fetch(1, timeout=20)
    headers = msg.headers or {}
    out = {
        "body": msg.data.decode(),
        "headers": {unquote_plus(k): unquote_plus(v) for k, v in headers.items()},
        "raw_headers": headers,
    }
    await msg.ack_sync()
    print(json.dumps(out))
    await nc.drain()


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    asyncio.run({"publish": publish, "get": get}[cmd](*args))
