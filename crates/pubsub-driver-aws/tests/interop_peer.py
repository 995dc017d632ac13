"""A second, independent SNS/SQS client (boto3) for the interop tests, with
its own implementation of the Go CDK's awssnssqs encoding: attribute keys
hex-escaped as __0x<hex>__, values escaped as Go's url.PathEscape, bodies
that are not UTF-8 base64-encoded and marked with "base64encoded".
boto3 reads AWS_ENDPOINT_URL, AWS_DEFAULT_REGION and the credentials from
the environment, as the driver does.

publish-sns TOPIC_ARN     publish the test message to SNS
send-sqs QUEUE_URL        send the test message straight to SQS
get QUEUE_URL             receive one message (raw or SNS-enveloped),
                          decode it by the Go CDK's rules, print it as JSON
"""
import base64
import json
import re
import sys
import urllib.parse

import boto3

BODY = b"\x00\xffbinary from python\xc3\x28"
ATTRIBUTES = {
    "kind": "greeting",
    "note": "ünï 値",
    "with space": "a b",
    "slash/key": "x/y?z",
    ".leading": "dots..",
}


def escape_key(k):
    out = []
    for i, c in enumerate(k):
        ok = (c.isascii() and c.isalnum()) or c in "_-" or (c == "." and i > 0 and k[i - 1] != ".")
        out.append(c if ok else "__0x%x__" % ord(c))
    return "".join(out)


def unescape_key(k):
    return re.sub(r"__0x([0-9a-fA-F]+)__", lambda m: chr(int(m.group(1), 16)), k)


def escape_value(v):
    return urllib.parse.quote(v, safe="$&+:=@-_.~")


def encoded():
    attrs = {escape_key(k): escape_value(v) for k, v in ATTRIBUTES.items()}
    attrs["base64encoded"] = "true"
    return base64.b64encode(BODY).decode(), attrs


def publish_sns(arn):
    body, attrs = encoded()
    out = boto3.client("sns").publish(
        TopicArn=arn,
        Message=body,
        MessageAttributes={k: {"DataType": "String", "StringValue": v} for k, v in attrs.items()},
    )
    print(json.dumps({"id": out["MessageId"]}))


def send_sqs(url):
    body, attrs = encoded()
    out = boto3.client("sqs").send_message(
        QueueUrl=url,
        MessageBody=body,
        MessageAttributes={k: {"DataType": "String", "StringValue": v} for k, v in attrs.items()},
    )
    print(json.dumps({"id": out["MessageId"]}))


def get(url):
    sqs = boto3.client("sqs")
    for _ in range(20):
        reply = sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=1, WaitTimeSeconds=1, MessageAttributeNames=["All"]
        )
        if reply.get("Messages"):
            break
    [m] = reply["Messages"]
    body = m["Body"]
    attrs = {k: v.get("StringValue", "") for k, v in m.get("MessageAttributes", {}).items()}
    enveloped = False
    if not attrs:
        try:
            env = json.loads(body)
        except ValueError:
            env = None
        if isinstance(env, dict) and env.get("Type") == "Notification" and env.get("TopicArn"):
            enveloped = True
            body = env["Message"]
            attrs = {k: v["Value"] for k, v in env.get("MessageAttributes", {}).items()}
    data = body.encode()
    if "base64encoded" in attrs:
        data = base64.b64decode(body)
        del attrs["base64encoded"]
    decoded = {unescape_key(k): urllib.parse.unquote(v) for k, v in attrs.items()}
    print(
        json.dumps(
            {
                "data": base64.b64encode(data).decode(),
                "attributes": decoded,
                "raw_attribute_names": sorted(attrs),
                "enveloped": enveloped,
            }
        )
    )
    sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"publish-sns": publish_sns, "send-sqs": send_sqs, "get": get}[cmd](*args)
