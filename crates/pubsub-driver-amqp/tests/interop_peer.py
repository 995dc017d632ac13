"""A second, independent AMQP client (pika) for the interop tests.

publish URL EXCHANGE BODY   publish BODY with headers of many AMQP types
get URL QUEUE               print the next message as JSON: body, headers
"""
import datetime
import decimal
import json
import sys
import time

import pika


def connect(url):
    return pika.BlockingConnection(pika.URLParameters(url))


def publish(url, exchange, body):
    conn = connect(url)
    ch = conn.channel()
    ch.confirm_delivery()
    # pika cannot encode floats; their rendering is covered by a unit test.
    headers = {
        "text": "plain text",
        "unicode": "ünïcödé 値",
        "int": 42,
        "negative": -7,
        "big": 2**40,
        "bool": True,
        "decimal": decimal.Decimal("12.34"),
        "timestamp": datetime.datetime(2023, 11, 14, 22, 13, 20),
        "nested": {"x": 1, "y": "z"},
        "list": [1, "a", False],
        "none": None,
    }
    ch.basic_publish(
        exchange=exchange,
        routing_key="",
        body=body.encode(),
        properties=pika.BasicProperties(headers=headers, message_id="from-pika"),
        mandatory=True,
    )
    conn.close()


def get(url, queue):
    conn = connect(url)
    ch = conn.channel()
    deadline = time.time() + 20
    while time.time() < deadline:
        method, props, body = ch.basic_get(queue=queue, auto_ack=True)
        if method is not None:
            headers = {
                k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
                for k, v in (props.headers or {}).items()
            }
            print(json.dumps({
                "body": body.decode("utf-8", "replace"),
                "headers": headers,
                "delivery_mode": props.delivery_mode,
            }))
            conn.close()
            return
        time.sleep(0.1)
    conn.close()
    sys.exit("no message arrived")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "publish":
        publish(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "get":
        get(sys.argv[2], sys.argv[3])
    else:
        sys.exit("unknown command " + cmd)
