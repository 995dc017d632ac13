//! The `pubsub` binary, end to end.

use assert_cmd::Command;

fn pubsub() -> Command {
    Command::cargo_bin("pubsub").expect("binary built")
}

/// Fails the test with the command's standard error unless it succeeded.
fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
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
    assert_success(&out);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("2000 messages of 100 bytes"), "{stdout}");
    assert!(
        stdout.contains("throughput:") && stdout.contains("p99"),
        "{stdout}"
    );
}

#[test]
fn bench_json_end_to_end_and_sends_only() {
    let run = |args: &[&str]| -> serde_json::Value {
        let out = pubsub()
            .args(["bench", "--topic", "mem://cli-bench-json", "--json"])
            .args(["--messages", "1000", "--senders", "4"])
            .args(args)
            .timeout(std::time::Duration::from_secs(60))
            .output()
            .unwrap();
        assert_success(&out);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let both = run(&["--subscription", "mem://cli-bench-json", "--receivers", "2"]);
    assert_eq!(both["messages"], 1000);
    assert_eq!(both["receivers"], 2);
    assert!(both["msg_per_s"].as_f64().unwrap() > 0.0);
    assert!(
        both["latency_us"]["p99"].as_f64().unwrap() >= both["latency_us"]["p50"].as_f64().unwrap()
    );
    let sends = run(&["--sends-only"]);
    assert_eq!(sends["messages"], 1000);
    assert!(sends["msg_per_s"].as_f64().unwrap() > 0.0);
    assert!(sends.get("latency_us").is_none(), "{sends}");
}

/// A subscription its topic does not feed: the bench used to wait for
/// ever; now it ends after `--stall` with exit 7.
#[test]
fn bench_with_an_unfed_subscription_ends_after_the_stall() {
    let out = pubsub()
        .args([
            "bench",
            "--topic",
            "mem://cli-bench-a",
            "--subscription",
            "mem://cli-bench-b",
        ])
        .args(["--messages", "100", "--stall", "500ms"])
        .timeout(std::time::Duration::from_secs(30))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("0 of 100 messages arrived"), "{err}");
    assert!(
        err.contains("is the subscription fed by the topic?"),
        "{err}"
    );
}

/// A send the backend refuses ends the bench with its error and exit
/// code, not a panic.
#[test]
fn bench_send_failure_is_an_error_not_a_panic() {
    let out = pubsub()
        .args(["bench", "--topic", "mem://cli-bench-big", "--sends-only"])
        .args(["--messages", "10", "--size", "20000000"])
        .timeout(std::time::Duration::from_secs(30))
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(!err.contains("panicked"), "{err}");
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
    assert_eq!(out.status.code(), Some(5));
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
fn schemes_lists_every_driver_with_its_url_forms() {
    let out = pubsub().arg("schemes").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let schemes = [
        "awssns",
        "awssqs",
        "gcppubsub",
        "kafka",
        "mem",
        "nats",
        "rabbit",
        "redis",
    ];
    for scheme in schemes {
        assert!(
            text.lines().any(|l| l == scheme),
            "{scheme} missing:\n{text}"
        );
        let form = format!("    {scheme}://");
        assert!(
            text.lines().any(|l| l.starts_with(&form)),
            "no URL form for {scheme}:\n{text}"
        );
    }
    assert!(!text.contains("describes no URL forms"), "{text}");
}

#[test]
fn a_bad_json_line_is_refused_naming_its_line() {
    let out = pubsub()
        .args(["send", "mem://cli-json", "--json-lines"])
        .write_stdin("{\"body\": \"ok\"}\n{\"body\": 1}\n")
        .timeout(std::time::Duration::from_secs(10))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn a_failed_send_keeps_its_line_in_the_ids_printed() {
    // The second message is refused (an empty attribute key); the third
    // was read before that was known and is still sent.
    let out = pubsub()
        .args(["send", "mem://cli-failed-line", "--json-lines"])
        .write_stdin(concat!(
            "{\"body\": \"one\"}\n",
            "{\"body\": \"two\", \"attributes\": {\"\": \"v\"}}\n",
            "{\"body\": \"three\"}\n",
        ))
        .timeout(std::time::Duration::from_secs(10))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("line 2"), "{err}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let printed: Vec<&str> = stdout.lines().collect();
    assert!(
        printed.len() >= 2,
        "a line for the sent message and one for the failed one: {printed:?}"
    );
    assert!(
        printed[0] != "!" && !printed[0].is_empty(),
        "the first message's id: {printed:?}"
    );
    assert_eq!(printed[1], "!", "the failed message's line: {printed:?}");
    assert!(
        printed[2..].iter().all(|l| *l != "!"),
        "only the second message failed: {printed:?}"
    );
}

#[test]
fn malformed_attribute_is_a_usage_error() {
    let out = pubsub()
        .args(["send", "mem://x", "--attr", "novalue", "b"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr).unwrap().contains("KEY=VALUE"));
}

#[test]
fn durations_are_checked_before_anything_runs() {
    for bad in ["nan", "inf", "1e300", "-1", "abc", "5 parsecs"] {
        let out = pubsub()
            .args(["receive", "mem://x", &format!("--idle={bad}")])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "--idle {bad}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains("--idle"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    for good in ["0.1", "100ms"] {
        pubsub()
            .args(["receive", "mem://x", "--idle", good])
            .timeout(std::time::Duration::from_secs(10))
            .assert()
            .success();
    }
}

#[test]
fn receive_timeout_ends_cleanly_unless_a_count_was_not_met() {
    let started = std::time::Instant::now();
    pubsub()
        .args(["receive", "mem://cli-timeout", "--timeout", "300ms"])
        .timeout(std::time::Duration::from_secs(10))
        .assert()
        .success();
    let out = pubsub()
        .args([
            "receive",
            "mem://cli-timeout",
            "--count",
            "1",
            "--timeout",
            "0.3",
        ])
        .timeout(std::time::Duration::from_secs(10))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("received 0 of --count 1"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(8));
}

/// A server that accepts connections and never answers: the AMQP
/// handshake waits for ever, and `--timeout` must end it, without the
/// URL's password in the message.
#[cfg(feature = "amqp")]
#[test]
fn send_timeout_ends_a_send_to_a_silent_server() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("amqp://guest:s3cret@{}/%2f", silent.local_addr().unwrap());
    let started = std::time::Instant::now();
    let out = pubsub()
        .env("RABBIT_SERVER_URL", &url)
        .args(["send", "rabbit://nowhere", "--timeout", "1s", "body"])
        .timeout(std::time::Duration::from_secs(30))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("did not finish within --timeout 1s"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
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
    let sent = pubsub()
        .envs(env.iter().copied())
        .args(["send", send_url, "--attr", "k=v", body])
        .output()
        .unwrap();
    assert_success(&sent);
    let sent_id = String::from_utf8(sent.stdout).unwrap();
    let out = pubsub()
        .envs(env.iter().copied())
        .args(["receive", receive_url, "--count", "1", "--json"])
        .timeout(std::time::Duration::from_secs(60))
        .output()
        .unwrap();
    assert_success(&out);
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        line["id"].as_str().map(|id| format!("{id}\n")),
        Some(sent_id),
        "send printed the id the receiver sees"
    );
    let traceparent = line["attributes"]["traceparent"].as_str().unwrap_or("");
    assert!(
        is_traceparent(traceparent),
        "send carries its producer span's W3C context: {line}"
    );
    line
}

/// Whether `s` is a W3C `traceparent` of a sampled span:
/// `00-<32 hex>-<16 hex>-01`.
fn is_traceparent(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && parts[3] == "01"
}

/// RabbitMQ's URL, and a fresh fanout exchange with a queue bound to it,
/// both named `cli-PID-TAG`, removed by the broker a minute after use.
#[cfg(feature = "amqp")]
fn rabbit_queue(
    rt: &tokio::runtime::Runtime,
    tag: &str,
) -> (String, String, pubsub_driver_amqp::lapin::Connection) {
    let url = std::env::var("RABBIT_SERVER_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let name = format!("cli-{:08x}-{tag}", std::process::id());
    let conn = rt.block_on(async {
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
        // Not auto-delete, which would go with the CLI's consumer: the
        // broker deletes it once unused for a minute.
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongInt(60_000));
        ch.queue_declare(name.as_str().into(), QueueDeclareOptions::default(), args)
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
    (url, name, conn)
}

#[cfg(feature = "amqp")]
#[test]
fn rabbit_send_then_receive_json() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (url, name, _conn) = rabbit_queue(&rt, "json");
    let target = format!("rabbit://{name}");
    let line = send_then_receive_json(&[("RABBIT_SERVER_URL", &url)], &target, &target, "hi there");
    assert_eq!(line["body"], "hi there");
    assert_eq!(line["attributes"]["k"], "v");
    assert!(line["id"].as_str().is_some_and(|s| !s.is_empty()));
}

#[cfg(feature = "amqp")]
#[test]
fn rabbit_send_no_trace_sends_no_context() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (url, name, _conn) = rabbit_queue(&rt, "notrace");
    let target = format!("rabbit://{name}");
    let sent = pubsub()
        .env("RABBIT_SERVER_URL", &url)
        .args(["send", &target, "--no-trace", "--attr", "k=v", "quiet"])
        .output()
        .unwrap();
    assert_success(&sent);
    let out = pubsub()
        .env("RABBIT_SERVER_URL", &url)
        .args(["receive", &target, "--count", "1", "--json"])
        .timeout(std::time::Duration::from_secs(60))
        .output()
        .unwrap();
    assert_success(&out);
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        line["attributes"],
        serde_json::json!({"k": "v"}),
        "only the application's attributes"
    );
}

/// Runs `pubsub receive URL` until it has printed one message a body (a
/// header line and the body), interrupts it as Ctrl-C does, and checks it
/// exits 0 within 30 s. Returns what it printed.
#[cfg(any(feature = "amqp", feature = "kafka"))]
fn receive_until_ctrl_c(env: &[(&str, &str)], url: &str, bodies: &[&str]) -> Vec<String> {
    use std::io::BufRead;
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("pubsub"))
        .envs(env.iter().copied())
        .args(["receive", url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut lines: Vec<String> = Vec::new();
    while lines.len() < 2 * bodies.len() {
        match rx.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(line) => lines.push(line),
            Err(e) => panic!("receive printed {lines:?} and then nothing ({e})"),
        }
    }
    let interrupted = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("receive did not exit within 30 s of Ctrl-C");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    let printed: Vec<&str> = lines
        .iter()
        .skip(1)
        .step_by(2)
        .map(String::as_str)
        .collect();
    assert_eq!(printed, bodies, "{lines:?}");
    lines
}

/// Ctrl-C on `receive`: it stops, sends the acks of what it printed and
/// exits 0, so none of it comes back (RabbitMQ requeues at once what a
/// closed channel left unacked). Plain output shows ids and attributes.
#[cfg(feature = "amqp")]
#[test]
fn rabbit_ctrl_c_acks_what_was_received() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (url, name, _conn) = rabbit_queue(&rt, "sigint");
    let target = format!("rabbit://{name}");
    for i in 0..3 {
        pubsub()
            .env("RABBIT_SERVER_URL", &url)
            .args(["send", &target, "--attr", "k=v w", &format!("body {i}")])
            .assert()
            .success();
    }
    let lines = receive_until_ctrl_c(
        &[("RABBIT_SERVER_URL", &url)],
        &target,
        &["body 0", "body 1", "body 2"],
    );
    for header in lines.iter().step_by(2) {
        assert!(header.starts_with("id="), "{header}");
        assert!(header.contains(r#" k="v w""#), "{header}");
        assert!(header.contains(" traceparent=\"00-"), "{header}");
    }
    let again = pubsub()
        .env("RABBIT_SERVER_URL", &url)
        .args(["receive", &target, "--idle", "2s", "--json"])
        .timeout(std::time::Duration::from_secs(30))
        .output()
        .unwrap();
    assert_success(&again);
    assert!(
        again.stdout.is_empty(),
        "acked messages came back: {}",
        String::from_utf8_lossy(&again.stdout)
    );
}

/// `send --lines` and `--json-lines` (the form `receive --json` prints):
/// a message a non-empty line, flags filling in what a line lacks.
#[cfg(feature = "amqp")]
#[test]
fn rabbit_send_lines_and_json_lines() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (url, name, _conn) = rabbit_queue(&rt, "lines");
    let target = format!("rabbit://{name}");
    let sent_ids = |out: std::process::Output| -> Vec<String> {
        assert_success(&out);
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let mut ids = sent_ids(
        pubsub()
            .env("RABBIT_SERVER_URL", &url)
            .args(["send", &target, "--lines", "--attr", "src=cli"])
            .write_stdin("a\n\nb\n")
            .timeout(std::time::Duration::from_secs(30))
            .output()
            .unwrap(),
    );
    ids.extend(sent_ids(
        pubsub()
            .env("RABBIT_SERVER_URL", &url)
            .args(["send", &target, "--json-lines", "--attr", "src=json"])
            .write_stdin(
                "{\"id\": \"ignored\", \"body\": \"c\", \"attributes\": {\"src\": \"line\"}}\n\
                 {\"body_base64\": \"//4=\"}\n",
            )
            .timeout(std::time::Duration::from_secs(30))
            .output()
            .unwrap(),
    ));
    assert_eq!(ids.len(), 4, "one id a sent message: {ids:?}");
    let out = pubsub()
        .env("RABBIT_SERVER_URL", &url)
        .args([
            "receive",
            &target,
            "--count",
            "4",
            "--json",
            "--timeout",
            "30s",
        ])
        .timeout(std::time::Duration::from_secs(60))
        .output()
        .unwrap();
    assert_success(&out);
    let mut received_ids = Vec::new();
    let mut got: Vec<(String, String)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            received_ids.push(v["id"].as_str().unwrap().to_owned());
            let body = v["body"]
                .as_str()
                .map(|b| format!("body {b}"))
                .unwrap_or_else(|| format!("base64 {}", v["body_base64"].as_str().unwrap()));
            (body, v["attributes"]["src"].as_str().unwrap().to_owned())
        })
        .collect();
    got.sort();
    let want = [
        ("base64 //4=", "json"),
        ("body a", "cli"),
        ("body b", "cli"),
        ("body c", "line"),
    ];
    assert_eq!(got, want.map(|(b, s)| (b.to_owned(), s.to_owned())));
    ids.sort();
    received_ids.sort();
    assert_eq!(ids, received_ids, "send printed the ids receivers see");
    let rest = pubsub()
        .env("RABBIT_SERVER_URL", &url)
        .args(["receive", &target, "--idle", "1s"])
        .timeout(std::time::Duration::from_secs(30))
        .output()
        .unwrap();
    assert!(rest.stdout.is_empty(), "the empty line was sent");
}

/// A round trip through the Kafka-protocol broker: the CLI sends, then a
/// new consumer group reads from the oldest offset.
#[cfg(feature = "kafka")]
#[test]
fn kafka_send_then_receive_json() {
    let (brokers, topic) = kafka_topic("json");
    let line = send_then_receive_json(
        &[("KAFKA_BROKERS", &brokers)],
        &format!("kafka://{topic}"),
        &format!("kafka://{topic}-group?topic={topic}&offset=oldest"),
        "hi kafka",
    );
    assert_eq!(line["body"], "hi kafka");
    assert_eq!(line["attributes"]["k"], "v");
}

/// Ctrl-C on a Kafka `receive`: it exits 0 after committing what it
/// acked, so the group's next reader starts after those messages.
#[cfg(feature = "kafka")]
#[test]
fn kafka_ctrl_c_commits_what_was_received() {
    let (brokers, topic) = kafka_topic("sigint");
    let env = [("KAFKA_BROKERS", brokers.as_str())];
    let target = format!("kafka://{topic}");
    let group = format!("kafka://{topic}-group?topic={topic}&offset=oldest");
    let send = |body: &str| {
        let out = pubsub()
            .envs(env)
            .args(["send", &target, body])
            .output()
            .unwrap();
        assert_success(&out);
    };
    for body in ["k0", "k1", "k2"] {
        send(body);
    }
    receive_until_ctrl_c(&env, &group, &["k0", "k1", "k2"]);
    send("after");
    let out = pubsub()
        .envs(env)
        .args([
            "receive",
            &group,
            "--count",
            "1",
            "--json",
            "--timeout",
            "60s",
        ])
        .timeout(std::time::Duration::from_secs(90))
        .output()
        .unwrap();
    assert_success(&out);
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["body"], "after", "the group read acked messages again");
}

/// The brokers, and a fresh one-partition topic `cli-PID-TAG` on them.
#[cfg(feature = "kafka")]
fn kafka_topic(tag: &str) -> (String, String) {
    use pubsub_driver_kafka::rdkafka::admin::{
        AdminClient, AdminOptions, NewTopic, TopicReplication,
    };
    use pubsub_driver_kafka::rdkafka::client::DefaultClientContext;
    use pubsub_driver_kafka::rdkafka::ClientConfig;

    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    let topic = format!("cli-{:08x}-{tag}", std::process::id());
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
    (brokers, topic)
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

/// A trace collector for the tests: an HTTP/1.1 server taking OTLP
/// `http/protobuf` exports on `/v1/traces`, as a collector's port 4318
/// does, keeping every span with its resource's `service.name`.
struct Collector {
    endpoint: String,
    spans: std::sync::Arc<std::sync::Mutex<Vec<(String, Span)>>>,
}

use opentelemetry_proto::tonic::trace::v1::Span;

impl Collector {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let spans = std::sync::Arc::<std::sync::Mutex<Vec<(String, Span)>>>::default();
        let kept = spans.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let kept = kept.clone();
                std::thread::spawn(move || Self::serve(conn, &kept));
            }
        });
        Collector { endpoint, spans }
    }

    /// One connection's requests, until the client closes it.
    fn serve(conn: std::net::TcpStream, kept: &std::sync::Mutex<Vec<(String, Span)>>) {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message as _;
        use std::io::{BufRead, Read, Write};
        let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
        let mut conn = conn;
        loop {
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                return;
            }
            let mut length = 0usize;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                let header = header.trim_end();
                if header.is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().unwrap();
                    }
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let status = if request_line.starts_with("POST /v1/traces ") {
                let request = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
                let mut kept = kept.lock().unwrap();
                for rs in request.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|kv| kv.key == "service.name")
                        .map(|kv| any_value_text(kv.value.as_ref()))
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        kept.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
                    }
                }
                "200 OK"
            } else {
                "404 Not Found"
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"
            );
            if conn.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
    }

    /// The spans collected so far, as (service name, span).
    fn spans(&self) -> Vec<(String, Span)> {
        self.spans.lock().unwrap().clone()
    }
}

fn any_value_text(v: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    match v.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// A span's attribute, as text.
fn span_attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| any_value_text(kv.value.as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `send` and `receive` export their spans to the collector
/// `OTEL_EXPORTER_OTLP_ENDPOINT` names: one trace from the producer's span,
/// whose context the message carried through RabbitMQ, to the consumer's.
#[cfg(feature = "amqp")]
#[test]
fn rabbit_send_and_receive_export_one_trace_over_otlp() {
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (url, name, _conn) = rabbit_queue(&rt, "otlp");
    let target = format!("rabbit://{name}");
    let collector = Collector::start();
    let env = [
        ("RABBIT_SERVER_URL", url.as_str()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint.as_str()),
    ];
    let line = send_then_receive_json(&env, &target, &target, "traced");
    let id = line["id"].as_str().unwrap().to_owned();
    let traceparent = line["attributes"]["traceparent"].as_str().unwrap();
    let parts: Vec<&str> = traceparent.split('-').collect();
    let (trace_id, producer_id) = (parts[1], parts[2]);

    // Each command flushed its spans before exiting.
    let spans = collector.spans();
    let of_kind = |kind: SpanKind| -> Vec<&(String, Span)> {
        spans
            .iter()
            .filter(|(_, s)| s.kind == kind as i32)
            .collect()
    };
    let (producers, consumers) = (of_kind(SpanKind::Producer), of_kind(SpanKind::Consumer));
    assert_eq!(producers.len(), 1, "{spans:#?}");
    assert_eq!(consumers.len(), 1, "{spans:#?}");
    let (service, producer) = producers[0];
    assert_eq!(service, "pubsub");
    assert_eq!(producer.name, format!("send {name}"));
    assert_eq!(
        hex(&producer.trace_id),
        trace_id,
        "the context sent is the span's"
    );
    assert_eq!(hex(&producer.span_id), producer_id);
    assert_eq!(
        span_attribute(producer, "messaging.system").as_deref(),
        Some("rabbitmq")
    );
    assert_eq!(
        span_attribute(producer, "messaging.message.id"),
        Some(id.clone())
    );

    let (service, consumer) = consumers[0];
    assert_eq!(service, "pubsub");
    assert_eq!(consumer.name, format!("process {name}"));
    assert_eq!(
        hex(&consumer.trace_id),
        trace_id,
        "one trace across the broker"
    );
    assert_eq!(hex(&consumer.parent_span_id), producer_id);
    assert!(
        consumer
            .links
            .iter()
            .any(|l| hex(&l.span_id) == producer_id),
        "linked to the producer: {consumer:#?}"
    );
    assert_eq!(span_attribute(consumer, "messaging.message.id"), Some(id));
    assert_eq!(
        span_attribute(consumer, "pubsub.settlement").as_deref(),
        Some("ack")
    );
}

/// An OTLP protocol the binary does not speak is a configuration error
/// (exit 2) that says what it takes, before anything is sent.
#[test]
fn an_otlp_protocol_other_than_http_protobuf_is_refused() {
    let collector = Collector::start();
    let out = pubsub()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.endpoint)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .args(["send", "mem://otlp-grpc", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("http/protobuf"), "{stderr}");
    // The traces variable overrides the general one, as the SDKs read it.
    let out = pubsub()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.endpoint)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
        .args(["send", "mem://otlp-grpc", "x"])
        .output()
        .unwrap();
    assert_success(&out);
    assert_eq!(collector.spans().len(), 1, "the send's producer span");
}

/// A collector that is not there costs the command a warning, not its
/// exit code: the message was sent.
#[test]
fn an_unreachable_collector_is_a_warning() {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = pubsub()
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        )
        .args(["send", "mem://otlp-nowhere", "x"])
        .timeout(std::time::Duration::from_secs(60))
        .output()
        .unwrap();
    assert_success(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("spans not exported over OTLP"), "{stderr}");
}
