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
        err.contains("registered schemes: kafka, mem, rabbit"),
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
#[cfg(any(feature = "amqp", feature = "kafka"))]
fn send_then_receive_json(
    env: (&str, &str),
    send_url: &str,
    receive_url: &str,
    body: &str,
) -> serde_json::Value {
    pubsub()
        .env(env.0, env.1)
        .args(["send", send_url, "--attr", "k=v", body])
        .assert()
        .success();
    let out = pubsub()
        .env(env.0, env.1)
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
    let line = send_then_receive_json(("RABBIT_SERVER_URL", &url), &target, &target, "hi there");
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
        ("KAFKA_BROKERS", &brokers),
        &format!("kafka://{topic}"),
        &format!("kafka://{topic}-group?topic={topic}&offset=oldest"),
        "hi kafka",
    );
    assert_eq!(line["body"], "hi kafka");
    assert_eq!(line["attributes"]["k"], "v");
}
