//! The same code on any backend: the URLs come from the environment.
//!
//! ```text
//! cargo run -p pubsub-examples --example switch_backend
//! TOPIC_URL=rabbit://orders SUBSCRIPTION_URL=rabbit://orders-queue \
//!     cargo run -p pubsub-examples --example switch_backend
//! ```
//! Drivers other than `mem://` must be registered with the registry first;
//! each driver crate documents its one-line `register` call.

use pubsub_core::{open_subscription, open_topic, Message};

#[tokio::main]
async fn main() -> pubsub_core::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let topic_url = std::env::var("TOPIC_URL").unwrap_or_else(|_| "mem://orders".into());
    let sub_url = std::env::var("SUBSCRIPTION_URL").unwrap_or_else(|_| "mem://orders".into());

    let sub = open_subscription(&sub_url).await?;
    let topic = open_topic(&topic_url).await?;

    for i in 0..3 {
        topic
            .send(Message::new(format!("order {i}")).with_attribute("n", i.to_string()))
            .await?;
    }
    for _ in 0..3 {
        let m = sub.receive().await?;
        println!(
            "{} -> {}",
            m.attribute("n").unwrap_or("?"),
            String::from_utf8_lossy(m.body())
        );
        m.ack();
    }
    topic.shutdown().await?;
    sub.shutdown().await?;
    Ok(())
}
