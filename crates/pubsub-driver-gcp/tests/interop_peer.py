"""A second, independent Pub/Sub client (Google's Python client) for the
interop tests. It reads PUBSUB_EMULATOR_HOST as Google's clients do.

publish TOPIC_PATH            publish a message with a binary body and attributes
get SUBSCRIPTION_PATH         pull one message, print it as JSON, ack it
"""
import base64
import json
import sys

from google.cloud import pubsub_v1


def publish(topic):
    publisher = pubsub_v1.PublisherClient()
    future = publisher.publish(
        topic,
        b"\x00\xffbinary from python\xc3\x28",
        kind="greeting",
        note="ünï 値",
        **{"with space": "a b", "slash/key": "x/y"},
    )
    print(json.dumps({"id": future.result(timeout=30)}))


def get(subscription):
    subscriber = pubsub_v1.SubscriberClient()
    reply = subscriber.pull(
        request={"subscription": subscription, "max_messages": 1}, timeout=30
    )
    for _ in range(20):
        if reply.received_messages:
            break
        reply = subscriber.pull(
            request={"subscription": subscription, "max_messages": 1}, timeout=30
        )
    [received] = reply.received_messages
    m = received.message
    print(
        json.dumps(
            {
                "id": m.message_id,
                "data": base64.b64encode(m.data).decode(),
                "attributes": dict(m.attributes),
                "ordering_key": m.ordering_key,
            }
        )
    )
    subscriber.acknowledge(
        request={"subscription": subscription, "ack_ids": [received.ack_id]}
    )


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"publish": publish, "get": get}[cmd](*args)
