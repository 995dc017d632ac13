//! A pool of concurrent workers on one subscription: at most 8 messages are
//! handled at once, failures are nacked and retried, and shutdown drains.
//!
//! `cargo run -p pubsub-examples --example worker_pool`

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pubsub_core::{open_subscription, open_topic, Message};

#[tokio::main]
async fn main() -> pubsub_core::Result<()> {
    let sub = open_subscription("mem://jobs?subscription=workers&ackdeadline=30s").await?;
    let topic = open_topic("mem://jobs").await?;

    let jobs = 100;
    for i in 0..jobs {
        topic.send(Message::new(format!("job {i}"))).await?;
    }

    let done = Arc::new(AtomicUsize::new(0));
    let workers = {
        let sub = sub.clone();
        let done = done.clone();
        tokio::spawn(async move {
            sub.handle_concurrently(8, move |msg| {
                let done = done.clone();
                async move {
                    // Pretend to work; every 10th job fails once and is
                    // redelivered promptly thanks to nack.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    let first_try = msg.delivery_attempt() == Some(1);
                    if first_try && msg.body().ends_with(b"0") {
                        msg.nack();
                    } else {
                        done.fetch_add(1, Ordering::Relaxed);
                        msg.ack();
                    }
                }
            })
            .await
        })
    };

    while done.load(Ordering::Relaxed) < jobs {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Shutting the subscription down ends `handle_concurrently` with Ok.
    sub.shutdown().await?;
    workers.await.expect("workers task")?;
    topic.shutdown().await?;
    println!("{jobs} jobs done");
    Ok(())
}
