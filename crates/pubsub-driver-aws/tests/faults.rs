//! Fault test: messages sent by several tasks to an SNS topic, received
//! from an SQS queue subscribed with raw delivery, while every connection
//! between the driver and the endpoint is cut twice through a proxy. Every
//! message whose `send` returned `Ok` must be received at least once;
//! duplicates are counted and held to the in-flight window.
//!
//! moto sustains about a hundred messages a second, so the run sends 2,000
//! (the figure for moto); its state is in memory, so the fault is
//! the cut, not a restart. A receive cut mid-call leaves its messages in
//! flight on the queue: they come back after the visibility timeout (10 s
//! here), as first deliveries.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pubsub_conformance::faults::{faults_lose_nothing, FaultProxy};
use pubsub_core::{SubscriptionOptions, TopicOptions};
use pubsub_driver_aws::{open_sns_topic, open_subscription, SubscriptionConfig, TopicConfig};

const SENDERS: usize = 5;
const PER_SENDER: usize = 400;
const SETTLE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_twice_lose_nothing() {
    assert!(
        common::live_region().is_none(),
        "the fault test puts a proxy before moto; it does not run against a live account"
    );
    let admin = common::Backend::connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let upstream: SocketAddr = common::MOTO.parse().expect("moto's address");
    let proxy = Arc::new(FaultProxy::start(upstream).await.expect("proxy"));
    let through = common::Backend::connect_with(
        common::params().with_endpoint(format!("http://{}", proxy.addr())),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let name = format!("fault-cut-{:08x}", fastrand::u32(..));
    let arn = admin.create_topic(&name).await.unwrap();
    let queue = admin
        .create_queue(&format!("{name}-q"), Duration::from_secs(10))
        .await
        .unwrap();
    admin.subscribe(&arn, &queue, true).await.unwrap();
    let topic = open_sns_topic(
        through.clients.sns.clone(),
        &arn,
        TopicConfig::default(),
        TopicOptions::default(),
    )
    .unwrap();
    let sub = open_subscription(
        through.clients.sqs.clone(),
        &queue,
        SubscriptionConfig::default().with_raw(true),
        SubscriptionOptions::default(),
    )
    .await
    .unwrap();
    faults_lose_nothing(
        topic,
        sub,
        SENDERS,
        PER_SENDER,
        SETTLE,
        FaultProxy::cutter(&proxy),
    )
    .await;
    assert!(
        proxy.accepted() >= 3,
        "the clients reconnected after each cut"
    );
}
