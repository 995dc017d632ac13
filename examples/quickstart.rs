//! Send a message and receive it, on the in-memory driver.
//!
//! `cargo run -p pubsub-examples --example quickstart`

use pubsub_core::{open_subscription, open_topic, Message};

#[tokio::main]
async fn main() -> pubsub_core::Result<()> {
    // A subscription gets the messages sent after it exists, so open it first.
    let sub = open_subscription("mem://greetings").await?;
    let topic = open_topic("mem://greetings").await?;

    topic
        .send(Message::new("hello, world").with_attribute("from", "quickstart"))
        .await?;

    let msg = sub.receive().await?;
    println!(
        "received {:?} with attributes {:?}",
        String::from_utf8_lossy(msg.body()),
        msg.attributes()
    );
    msg.ack();

    topic.shutdown().await?;
    sub.shutdown().await?;
    Ok(())
}
