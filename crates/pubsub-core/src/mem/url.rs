//! Opening `mem://` URLs.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;

use super::{Broker, DEFAULT_ACK_DEADLINE};
use crate::error::{Error, Result};
use crate::registry::{query_pairs, resource_name, Opener};
use crate::subscription::Subscription;
use crate::topic::Topic;

/// Opens `mem://` URLs on [`Broker::global`].
#[derive(Debug, Default, Clone, Copy)]
pub struct MemOpener;

#[async_trait]
impl Opener for MemOpener {
    fn url_forms(&self, _scheme: &str) -> &'static [&'static str] {
        &[
            "mem://TOPIC  (topic)",
            "mem://TOPIC?subscription=NAME[&ackdeadline=30s]  (subscription, created on first open)",
            "mem://TOPIC  (as a subscription: an anonymous one, gone when closed)",
        ]
    }

    async fn open_topic(&self, url: &url::Url) -> Result<Topic> {
        let name = name_of(url)?;
        if let Some((k, _)) = query_pairs(url).into_iter().next() {
            return Err(Error::invalid_argument(format!(
                "unknown mem:// topic URL parameter {k:?}"
            )));
        }
        let broker = Broker::global();
        broker.ensure_topic(&name);
        Ok(broker.topic(&name))
    }

    async fn open_subscription(&self, url: &url::Url) -> Result<Subscription> {
        let topic = name_of(url)?;
        let mut ack_deadline = DEFAULT_ACK_DEADLINE;
        let mut sub_name = None;
        for (k, v) in query_pairs(url) {
            match k.as_str() {
                "ackdeadline" => ack_deadline = parse_duration(&v)?,
                "subscription" => sub_name = Some(v),
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "unknown mem:// subscription URL parameter {k:?}; known: ackdeadline, subscription"
                    )))
                }
            }
        }
        let broker = Broker::global();
        broker.ensure_topic(&topic);
        let name = match sub_name {
            Some(n) => {
                if broker.sub_state(&n).is_err() {
                    match broker.create_subscription(&n, &topic, ack_deadline) {
                        Ok(()) => {}
                        // Another opener won the race; use theirs.
                        Err(e) if e.kind() == crate::error::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(e),
                    }
                }
                n
            }
            None => {
                let n = format!(
                    "{topic}/anonymous-{}",
                    broker.inner.anonymous.fetch_add(1, Ordering::Relaxed)
                );
                broker.create_subscription(&n, &topic, ack_deadline)?;
                // Nobody else can name it, so it goes when its opener is done.
                let driver = broker.subscription_driver(&n).delete_when_closed();
                return Ok(Subscription::new(driver));
            }
        };
        Ok(broker.subscription(&name))
    }
}

fn name_of(url: &url::Url) -> Result<String> {
    resource_name(url).ok_or_else(|| {
        Error::invalid_argument("a mem:// URL needs a topic name, as in mem://orders")
    })
}

/// Parses a Go-style duration such as `30s`, `1m30s`, `500ms` or `2h`.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let bad = || {
        Error::invalid_argument(format!(
            "invalid duration {s:?}: use a number with a unit, as in 500ms, 30s, 1m30s"
        ))
    };
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        let part = Duration::try_from_secs_f64(value * unit).map_err(|_| bad())?;
        total = total.checked_add(part).ok_or_else(bad)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ErrorKind, Message};

    fn anonymous_subs_of(topic: &str) -> usize {
        let prefix = format!("{topic}/anonymous-");
        super::super::lock(&Broker::global().inner.subs)
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .count()
    }

    /// An anonymous subscription is the opener's alone: once it is shut
    /// down, nothing keeps collecting the topic's messages.
    #[tokio::test]
    async fn an_anonymous_subscription_detaches_when_shut_down() {
        let url = url::Url::parse("mem://anonymous-detach").unwrap();
        let sub = MemOpener.open_subscription(&url).await.unwrap();
        let other = MemOpener.open_subscription(&url).await.unwrap();
        assert_eq!(anonymous_subs_of("anonymous-detach"), 2);
        sub.shutdown().await.unwrap();
        other.shutdown().await.unwrap();
        let topic = MemOpener.open_topic(&url).await.unwrap();
        topic.send(Message::new("after")).await.unwrap();
        assert_eq!(
            anonymous_subs_of("anonymous-detach"),
            0,
            "closed anonymous subscriptions still collect messages"
        );
        topic.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn a_zero_ack_deadline_is_refused() {
        let url = url::Url::parse("mem://zero-deadline?ackdeadline=0s").unwrap();
        let e = MemOpener.open_subscription(&url).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        let broker = Broker::global();
        broker.ensure_topic("zero-deadline");
        let e = broker
            .create_subscription("zero-deadline-sub", "zero-deadline", Duration::ZERO)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        for bad in ["", "10", "s", "10x", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} must be refused");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any duration text parses or is InvalidArgument, never a
            /// panic, huge values and sums included.
            #[test]
            fn any_duration_parses_or_is_refused(
                s in "([0-9]{0,22}(\\.[0-9]{0,3})?(ns|us|µs|ms|s|m|h|x)?){0,4}|\\PC{0,12}"
            ) {
                if let Err(e) = parse_duration(&s) {
                    prop_assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
                }
            }
        }

        #[test]
        fn a_sum_past_the_largest_duration_is_refused() {
            let e = parse_duration("10000000000000000000s10000000000000000000s").unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
        }
    }
}
