//! Shared by the NATS tests: the server and the JetStream admin calls the
//! tests make.
#![allow(dead_code)]

use std::time::Duration;

use pubsub_driver_nats::async_nats::jetstream::{self, consumer, stream};
use pubsub_driver_nats::async_nats::{self, jetstream::consumer::DeliverPolicy};

/// The server the tests use.
pub fn server() -> String {
    std::env::var("NATS_SERVER_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// How to start the server, for the message of a test that cannot reach it.
pub const HOW: &str = "start NATS with JetStream (scripts/backends up, or \
     `nats-server -a 127.0.0.1 -p 4222 -js`) or set NATS_SERVER_URL";

/// A JetStream context on the test server.
pub async fn jetstream() -> Result<jetstream::Context, String> {
    let client = tokio::time::timeout(
        Duration::from_secs(5),
        async_nats::ConnectOptions::new().connect(server()),
    )
    .await
    .map_err(|_| format!("connecting to {} timed out; {HOW}", server()))?
    .map_err(|e| format!("cannot connect to {}: {e}; {HOW}", server()))?;
    let js = jetstream::new(client);
    // A stream lookup is answered "not found" by JetStream, and by nobody
    // on a server without it.
    match js.get_stream("pubsub-rs-probe").await {
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(_)
            ) =>
        {
            Ok(js)
        }
        Ok(_) => Ok(js),
        Err(e) => Err(format!("{} has no JetStream ({e}); {HOW}", server())),
    }
}

/// A stream capturing the one subject `name`, in memory, that expires its
/// messages after an hour so test runs do not pile up.
pub async fn create_stream(js: &jetstream::Context, name: &str) -> Result<(), async_nats::Error> {
    js.create_stream(stream::Config {
        name: name.to_owned(),
        subjects: vec![name.to_owned()],
        storage: stream::StorageType::Memory,
        max_age: Duration::from_secs(3600),
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// A durable pull consumer of `stream` that gets what is sent from now on.
pub async fn create_consumer(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
    ack_wait: Duration,
) -> Result<(), async_nats::Error> {
    js.get_stream(stream)
        .await?
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            ack_wait,
            deliver_policy: DeliverPolicy::New,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await?;
    Ok(())
}
