//! Send throughput through the driver against raw `lapin` doing the same
//! work in the same run: publisher confirms, mandatory, persistent, a
//! message id, 100-byte bodies, the same number of concurrent senders, one
//! connection.
//!
//! `cargo bench -p pubsub-driver-amqp --bench amqp` (RabbitMQ must be
//! running: `scripts/backends up`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use pubsub_conformance::bench::{ratio_header, ratio_row, write_chart};
use pubsub_core::Message;
use pubsub_driver_amqp::{lapin, open_topic, Connector, TopicConfig};

const BODY: usize = 100;
/// Alternating tries of each side a row.
const TRIES: usize = 5;

fn url() -> String {
    std::env::var("RABBIT_SERVER_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

async fn declare(ch: &Channel, x: &str, q: &str) {
    ch.exchange_declare(
        x.into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        q.into(),
        // Transient: confirms then wait on no disk write, so the figures
        // show the client's own cost rather than the broker's fsync noise.
        QueueDeclareOptions {
            durable: false,
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        q.into(),
        x.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

async fn raw(conn: &Connection, x: &str, senders: usize, total: usize) -> f64 {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let per = total / senders;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..senders {
        let ch = ch.clone();
        let x = ShortString::from(x);
        tasks.spawn(async move {
            let body = vec![b'x'; BODY];
            for _ in 0..per {
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(ShortString::from(format!("{:032x}", fastrand::u128(..))));
                let confirm = ch
                    .basic_publish(
                        x.clone(),
                        "".into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &body,
                        props,
                    )
                    .await
                    .unwrap();
                assert!(matches!(confirm.await.unwrap(), Confirmation::Ack(None)));
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let rate = (per * senders) as f64 / started.elapsed().as_secs_f64();
    ch.close(200, "done".into()).await.unwrap();
    rate
}

async fn driver(connector: &Connector, x: &str, senders: usize, total: usize) -> f64 {
    let topic =
        Arc::new(open_topic(connector, x, TopicConfig::default(), Default::default()).unwrap());
    let per = total / senders;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..senders {
        let topic = topic.clone();
        tasks.spawn(async move {
            let body = bytes::Bytes::from(vec![b'x'; BODY]);
            for _ in 0..per {
                topic.send(Message::new(body.clone())).await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let rate = (per * senders) as f64 / started.elapsed().as_secs_f64();
    topic.shutdown().await.unwrap();
    rate
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = Connection::connect(&url(), ConnectionProperties::default())
            .await
            .expect("RabbitMQ must be running: scripts/backends up");
        let admin = conn.create_channel().await.unwrap();
        let x = "bench-amqp-x";
        let q = "bench-amqp-transient-q";
        declare(&admin, x, q).await;
        let connector = Connector::new(&url()).unwrap();

        println!("Sends with publisher confirms, {BODY}-byte persistent bodies, one connection");
        ratio_header("senders", "lapin", TRIES);
        // `cargo bench ... -- 10` runs only that many senders.
        let only: Vec<usize> = std::env::args()
            .skip(1)
            .filter_map(|a| a.parse().ok())
            .collect();
        for (senders, total) in [(1, 5_000), (10, 30_000), (100, 60_000)] {
            if !only.is_empty() && !only.contains(&senders) {
                continue;
            }
            // Warm both paths, then alternate, so drift in the broker (disk,
            // queue length) hits both alike; each try is one run of each.
            let _ = raw(&conn, x, senders, total / 10).await;
            let _ = driver(&connector, x, senders, total / 10).await;
            let (mut raws, mut libs) = (Vec::new(), Vec::new());
            for _ in 0..TRIES {
                admin
                    .queue_purge(q.into(), QueuePurgeOptions::default())
                    .await
                    .unwrap();
                raws.push(raw(&conn, x, senders, total).await);
                admin
                    .queue_purge(q.into(), QueuePurgeOptions::default())
                    .await
                    .unwrap();
                libs.push(driver(&connector, x, senders, total).await);
            }
            ratio_row(&format!("{senders:>3}"), &raws, &libs);
        }
        admin
            .queue_purge(q.into(), QueuePurgeOptions::default())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    });
    write_chart(
        "amqp",
        "RabbitMQ: pubsub against lapin, sends with publisher confirms",
        "raw lapin",
    );
}
