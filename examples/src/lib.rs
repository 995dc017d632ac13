//! Runnable examples live beside this crate; see `cargo run -p pubsub-examples --example quickstart`.
