//! The `pubsub` binary, end to end.

use assert_cmd::Command;

fn pubsub() -> Command {
    Command::cargo_bin("pubsub").expect("binary built")
}

#[test]
fn bench_over_mem_reports_throughput_and_latency() {
    let out = pubsub()
        .args([
            "bench",
            "--topic",
            "mem://cli-bench",
            "--subscription",
            "mem://cli-bench",
            "--messages",
            "2000",
            "--senders",
            "4",
            "--receivers",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("2000 messages of 100 bytes"), "{stdout}");
    assert!(
        stdout.contains("throughput:") && stdout.contains("p99"),
        "{stdout}"
    );
}

#[test]
fn send_to_mem_succeeds_and_reads_stdin() {
    pubsub()
        .args(["send", "mem://cli-send", "--attr", "k=v", "hello"])
        .assert()
        .success();
    pubsub()
        .args(["send", "mem://cli-send", "-"])
        .write_stdin("from stdin")
        .assert()
        .success();
}

#[test]
fn receive_with_idle_timeout_ends_cleanly() {
    let out = pubsub()
        .args(["receive", "mem://cli-recv", "--idle", "0.2", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
}

#[test]
fn unknown_scheme_fails_with_the_registered_ones() {
    let out = pubsub()
        .args(["send", "nope://x", "body"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("\"nope\""), "{err}");
    assert!(
        err.contains(
            "registered schemes: awssns, awssqs, gcppubsub, kafka, mem, nats, rabbit, redis"
        ),
        "{err}"
    );
}

#[test]
fn malformed_attribute_is_a_usage_error() {
    let out = pubsub()
        .args(["send", "mem://x", "--attr", "novalue", "b"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr).unwrap().contains("KEY=VALUE"));
}

#[test]
fn missing_arguments_exit_with_usage() {
    let out = pubsub().args(["bench"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// A round trip through RabbitMQ: the CLI sends, then receives as JSON.
/// Sends `body` with the attribute `k=v` through the CLI, then receives one
/// message as JSON and returns it. `env` points the CLI at the broker.
#[cfg(any(
    feature = "amqp",
    feature = "kafka",
    feature = "nats",
    feature = "redis",
    feature = "gcp"
))]
fn send_then_receive_json(
    env: &[(&str, &str)],
    send_url: &str,
    receive_url: &str,
    body: &str,
) -> serde_json::Value {
    pubsub()
        .envs(env.iter().copied())
        .args(["send", send_url, "--attr", "k=v", body])
        .assert()
        .success();
    let out = pubsub()
        .envs(env.iter().copied())
        .args(["receive", receive_url, "--count", "1", "--json"])
        .timeout(std::time::Duration::from_secs(60))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[cfg(feature = "amqp")]
#[test]
fn rabbit_send_then_receive_json() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = std::env::var("RABBIT_SERVER_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let name = format!("cli-{:08x}", std::process::id());
    // The auto-delete queue lives while this connection does.
    let _conn = rt.block_on(async {
        use pubsub_driver_amqp::lapin::{options::*, types::*, *};
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .expect("RabbitMQ must be running: scripts/backends up");
        let ch = conn.create_channel().await.unwrap();
        ch.exchange_declare(
            name.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_bind(
            name.as_str().into(),
            name.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        conn
    });
    let target = format!("rabbit://{name}");
    let line = send_then_receive_json(&[("RABBIT_SERVER_URL", &url)], &target, &target, "hi there");
    assert_eq!(line["body"], "hi there");
    assert_eq!(line["attributes"]["k"], "v");
    assert!(line["id"].as_str().is_some_and(|s| !s.is_empty()));
}

/// A round trip through the Kafka-protocol broker: the CLI sends, then a
/// new consumer group reads from the oldest offset.
#[cfg(feature = "kafka")]
#[test]
fn kafka_send_then_receive_json() {
    use pubsub_driver_kafka::rdkafka::admin::{
        AdminClient, AdminOptions, NewTopic, TopicReplication,
    };
    use pubsub_driver_kafka::rdkafka::client::DefaultClientContext;
    use pubsub_driver_kafka::rdkafka::ClientConfig;

    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    let topic = format!("cli-{:08x}", std::process::id());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap();
        let t = NewTopic::new(&topic, 1, TopicReplication::Fixed(1));
        for r in admin
            .create_topics([&t], &AdminOptions::new())
            .await
            .expect("a Kafka-protocol broker must be running: scripts/backends up")
        {
            r.unwrap();
        }
    });
    let line = send_then_receive_json(
        &[("KAFKA_BROKERS", &brokers)],
        &format!("kafka://{topic}"),
        &format!("kafka://{topic}-group?topic={topic}&offset=oldest"),
        "hi kafka",
    );
    assert_eq!(line["body"], "hi kafka");
    assert_eq!(line["attributes"]["k"], "v");
}

/// A round trip through Redis: a stream and a group made here, the CLI
/// sends to the stream and reads it in the group.
#[cfg(feature = "redis")]
#[test]
fn redis_send_then_receive_json() {
    use pubsub_driver_redis::redis;
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let stream = format!("cli-{:08x}", std::process::id());
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .expect("Redis must be running: scripts/backends up");
    redis::pipe()
        .cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("g")
        .arg("$")
        .arg("MKSTREAM")
        .ignore()
        .cmd("EXPIRE")
        .arg(&stream)
        .arg(600)
        .ignore()
        .query::<()>(&mut conn)
        .unwrap();
    let line = send_then_receive_json(
        &[("REDIS_URL", &url)],
        &format!("redis://{stream}"),
        &format!("redis://{stream}?group=g"),
        "hi redis",
    );
    assert_eq!(line["body"], "hi redis");
    assert_eq!(line["attributes"]["k"], "v");
}

/// A round trip through Google's Pub/Sub emulator: a topic and a
/// subscription made here, the CLI publishes to one and reads the other.
#[cfg(feature = "gcp")]
#[test]
fn gcp_send_then_receive_json() {
    use pubsub_driver_gcp::Endpoint;
    let host =
        std::env::var("PUBSUB_EMULATOR_HOST").unwrap_or_else(|_| "127.0.0.1:8085".to_owned());
    let endpoint = Endpoint::Emulator(host.clone());
    let name = format!("cli-{:08x}", std::process::id());
    let (topic, sub) = (
        format!("projects/pubsub-rs-test/topics/{name}"),
        format!("projects/pubsub-rs-test/subscriptions/{name}"),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let topics = pubsub_driver_gcp::topic_admin(&endpoint).await.unwrap();
        topics
            .create_topic()
            .set_name(&topic)
            .send()
            .await
            .expect("the Pub/Sub emulator must be running: scripts/backends up");
        let subs = pubsub_driver_gcp::subscription_admin(&endpoint)
            .await
            .unwrap();
        subs.create_subscription()
            .set_name(&sub)
            .set_topic(&topic)
            .send()
            .await
            .unwrap();
    });
    let line = send_then_receive_json(
        &[("PUBSUB_EMULATOR_HOST", &host)],
        &format!("gcppubsub://{topic}"),
        &format!("gcppubsub://pubsub-rs-test/{name}"),
        "hi pubsub",
    );
    assert_eq!(line["body"], "hi pubsub");
    assert_eq!(line["attributes"]["k"], "v");
}

/// A round trip through moto's SQS: a queue made here, the CLI sends to it
/// and receives from it, with the test credentials moto takes.
#[cfg(feature = "aws")]
#[test]
fn aws_send_then_receive_json() {
    let name = format!("cli-{:08x}", std::process::id());
    let params = "endpoint=http://127.0.0.1:5000&region=us-east-1";
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let config = pubsub_driver_aws::AwsParams::default()
            .with_endpoint("http://127.0.0.1:5000")
            .with_region("us-east-1")
            .load(None)
            .await
            .to_builder()
            .credentials_provider(
                pubsub_driver_aws::aws_sdk_sqs::config::SharedCredentialsProvider::new(
                    pubsub_driver_aws::aws_sdk_sqs::config::Credentials::new(
                        "testing", "testing", None, None, "test",
                    ),
                ),
            )
            .build();
        let clients = pubsub_driver_aws::Clients::from_config(&config);
        clients
            .sqs
            .create_queue()
            .queue_name(&name)
            .send()
            .await
            .expect("moto must be running on 127.0.0.1:5000: scripts/backends up");
    });
    let url = format!("awssqs://127.0.0.1:5000/123456789012/{name}?{params}");
    let line = send_then_receive_json(
        &[
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
        &url,
        &url,
        "hi sqs",
    );
    assert_eq!(line["body"], "hi sqs");
    assert_eq!(line["attributes"]["k"], "v");
}

/// A round trip through NATS JetStream: a stream and a durable consumer
/// made here, the CLI publishes to the subject and pulls from the consumer.
#[cfg(feature = "nats")]
#[test]
fn nats_send_then_receive_json() {
    use pubsub_driver_nats::async_nats::jetstream::{self, consumer, stream};
    let url =
        std::env::var("NATS_SERVER_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let name = format!("cli-{:08x}", std::process::id());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = pubsub_driver_nats::async_nats::connect(&url)
            .await
            .expect("NATS must be running: scripts/backends up");
        let js = jetstream::new(client);
        let s = js
            .create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![name.clone()],
                storage: stream::StorageType::Memory,
                max_age: std::time::Duration::from_secs(600),
                ..Default::default()
            })
            .await
            .unwrap();
        s.create_consumer(consumer::pull::Config {
            durable_name: Some("c".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    });
    let line = send_then_receive_json(
        &[("NATS_SERVER_URL", &url)],
        &format!("nats://{name}"),
        &format!("nats://{name}?consumer=c"),
        "hi nats",
    );
    assert_eq!(line["body"], "hi nats");
    assert_eq!(line["attributes"]["k"], "v");
}
