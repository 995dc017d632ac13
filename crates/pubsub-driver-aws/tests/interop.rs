//! Interoperation with an independent client: boto3 (installed with moto
//! by `scripts/backends up`), with its own implementation of the Go CDK's
//! encoding in `interop_peer.py`. Bodies, escaped attribute keys, escaped
//! values and base64 bodies cross intact both ways, through SNS (with the
//! notification envelope) and straight through SQS.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use pubsub_core::{Message, SubscriptionOptions, TopicOptions};
use pubsub_driver_aws::{
    open_sns_topic, open_sqs_topic, open_subscription, SubscriptionConfig, TopicConfig,
};

async fn peer(args: &[&str]) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop_peer.py");
    let region = common::live_region().unwrap_or_else(|| "us-east-1".into());
    let mut env = vec![("AWS_DEFAULT_REGION", region.as_str())];
    let endpoint = format!("http://{}", common::MOTO);
    if common::live_region().is_none() {
        env.extend([
            ("AWS_ENDPOINT_URL", endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
        ]);
    }
    let out = pubsub_conformance::peer::run_with_env("boto3", script, args, &env).await;
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("json from the peer ({e}): {out}"))
}

fn expected_attributes() -> BTreeMap<String, String> {
    [
        ("kind", "greeting"),
        ("note", "ünï 値"),
        ("with space", "a b"),
        ("slash/key", "x/y?z"),
        (".leading", "dots.."),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

const PEER_BODY: &[u8] = b"\x00\xffbinary from python\xc3\x28";

async fn backend() -> common::Backend {
    common::Backend::connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn name(what: &str) -> String {
    format!("interop-{what}-{:08x}", fastrand::u32(..))
}

/// One message from `queue`, acked: its content and its id.
async fn receive_one(
    b: &common::Backend,
    queue: &str,
    config: SubscriptionConfig,
) -> (Message, Option<String>) {
    let s = open_subscription(
        b.clients.sqs.clone(),
        queue,
        config,
        SubscriptionOptions::default(),
    )
    .await
    .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(30), s.receive())
        .await
        .expect("a message arrives")
        .expect("receive");
    let (copy, id) = (m.clone(), m.id().map(str::to_owned));
    m.ack();
    s.shutdown().await.unwrap();
    (copy, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_boto3_publishes_to_sns_and_sqs_are_received_intact() {
    let b = backend().await;
    let topic = name("sns-in");
    let arn = b.create_topic(&topic).await.unwrap();
    let enveloped = b
        .create_queue(&format!("{topic}-q"), Duration::from_secs(30))
        .await
        .unwrap();
    b.subscribe(&arn, &enveloped, false).await.unwrap();
    let direct = b
        .create_queue(&name("sqs-in"), Duration::from_secs(30))
        .await
        .unwrap();

    let sent = peer(&["publish-sns", &arn]).await;
    let (m, id) = receive_one(
        &b,
        &enveloped,
        SubscriptionConfig::default().with_sns_topic_arn(&arn),
    )
    .await;
    assert_eq!(m.body().as_ref(), PEER_BODY, "unwrapped and decoded");
    assert_eq!(m.attributes(), &expected_attributes());
    assert!(id.is_some());
    let _ = sent;

    let sent = peer(&["send-sqs", &direct]).await;
    let (m, id) = receive_one(&b, &direct, SubscriptionConfig::default()).await;
    assert_eq!(
        id.as_deref(),
        sent["id"].as_str(),
        "the id SQS gave the sender"
    );
    assert_eq!(m.body().as_ref(), PEER_BODY);
    assert_eq!(m.attributes(), &expected_attributes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_this_driver_sends_are_read_by_boto3() {
    use base64::Engine as _;
    let b = backend().await;
    let body: &[u8] = b"\x01 bytes from rust \xff";
    let message = || {
        Message::new(body.to_vec())
            .with_attributes(expected_attributes())
            .with_attribute("ключ", "値 ✓")
    };
    let mut want = expected_attributes();
    want.insert("ключ".into(), "値 ✓".into());

    // Through SNS, enveloped.
    let topic = name("sns-out");
    let arn = b.create_topic(&topic).await.unwrap();
    let queue = b
        .create_queue(&format!("{topic}-q"), Duration::from_secs(30))
        .await
        .unwrap();
    b.subscribe(&arn, &queue, false).await.unwrap();
    let t = open_sns_topic(
        b.clients.sns.clone(),
        &arn,
        TopicConfig::default(),
        TopicOptions::default(),
    )
    .unwrap();
    t.send(message()).await.unwrap();
    t.shutdown().await.unwrap();
    let got = peer(&["get", &queue]).await;
    assert_eq!(got["enveloped"], true);
    let data = base64::engine::general_purpose::STANDARD
        .decode(got["data"].as_str().unwrap())
        .unwrap();
    assert_eq!(data, body);
    let attrs: BTreeMap<String, String> =
        serde_json::from_value(got["attributes"].clone()).unwrap();
    assert_eq!(attrs, want);
    let names: Vec<&str> = got["raw_attribute_names"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    assert!(names.contains(&"slash__0x2f__key"), "{names:?}");
    assert!(names.contains(&"__0x2e__leading"), "{names:?}");

    // Straight to SQS.
    let queue = b
        .create_queue(&name("sqs-out"), Duration::from_secs(30))
        .await
        .unwrap();
    let t = open_sqs_topic(
        b.clients.sqs.clone(),
        &queue,
        TopicConfig::default(),
        TopicOptions::default(),
    )
    .unwrap();
    t.send(message()).await.unwrap();
    t.shutdown().await.unwrap();
    let got = peer(&["get", &queue]).await;
    assert_eq!(got["enveloped"], false);
    let data = base64::engine::general_purpose::STANDARD
        .decode(got["data"].as_str().unwrap())
        .unwrap();
    assert_eq!(data, body);
    let attrs: BTreeMap<String, String> =
        serde_json::from_value(got["attributes"].clone()).unwrap();
    assert_eq!(attrs, want);
}
