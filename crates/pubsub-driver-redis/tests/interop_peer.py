"""A second, independent Redis client (redis-py) for the interop tests.

publish URL STREAM           XADD an entry with plain fields, as any client would
get URL STREAM GROUP         read the next entry as consumer "py", print it as JSON, XACK it
"""
import json
import sys

import redis


def publish(url, stream):
    r = redis.Redis.from_url(url)
    r.xadd(stream, {"name": "alice", "count": "3", "note": "ünï 値"})


def get(url, stream, group):
    r = redis.Redis.from_url(url)
    reply = r.xreadgroup(group, "py", {stream: ">"}, count=1, block=20000)
    [(_, [(entry_id, fields)])] = reply
    out = {
        "id": entry_id.decode(),
        "fields": {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()},
    }
    r.xack(stream, group, entry_id)
    print(json.dumps(out))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"publish": publish, "get": get}[cmd](*args)
