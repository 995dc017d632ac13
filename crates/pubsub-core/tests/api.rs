//! The user API over the in-memory driver: what the conformance suite does
//! not cover because it is specific to this crate.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use pubsub_core::mem::Broker;
use pubsub_core::{
    open_subscription, open_topic, ErrorKind, Message, NackBackoff, SubscriptionOptions,
};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn deleted_topics_and_subscriptions_are_not_found_and_come_back() {
    let b = Broker::new();
    b.create_topic("t").unwrap();
    b.create_subscription("s", "t", Duration::from_secs(30))
        .unwrap();
    let topic = b.topic("t");
    topic.send(Message::new("before")).await.unwrap();
    b.delete_topic("t").unwrap();
    let e = topic.send(Message::new("after delete")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.to_string().contains("\"t\""), "{e}");

    // Re-created, the same handle works again.
    b.create_topic("t").unwrap();
    b.create_subscription("s2", "t", Duration::from_secs(30))
        .unwrap();
    topic.send(Message::new("again")).await.unwrap();
    assert_eq!(b.backlog("s2").unwrap(), 1);
    assert_eq!(
        b.backlog("s").unwrap(),
        1,
        "the old subscription kept its backlog"
    );

    let sub = b.subscription("s");
    b.delete_subscription("s").unwrap();
    let e = tokio::time::timeout(WAIT, sub.receive())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(
        b.create_topic("t").unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    assert_eq!(
        b.create_subscription("x", "missing", Duration::from_secs(1))
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    topic.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_subscription_gets_only_messages_sent_after_it_exists() {
    let b = Broker::new();
    b.create_topic("t").unwrap();
    let topic = b.topic("t");
    topic.send(Message::new("early")).await.unwrap();
    b.create_subscription("s", "t", Duration::from_secs(30))
        .unwrap();
    topic.send(Message::new("late")).await.unwrap();
    let sub = b.subscription("s");
    let m = sub.receive().await.unwrap();
    assert_eq!(m.body().as_ref(), b"late");
    m.ack();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), sub.receive())
            .await
            .is_err()
    );
    topic.shutdown().await.unwrap();
    sub.shutdown().await.unwrap();
}

#[tokio::test]
async fn named_url_subscriptions_share_one_backlog() {
    let a = open_subscription("mem://api-named?subscription=workers&ackdeadline=30s")
        .await
        .unwrap();
    let b = open_subscription("mem://api-named?subscription=workers")
        .await
        .unwrap();
    let topic = open_topic("mem://api-named").await.unwrap();
    for i in 0..10 {
        topic.send(Message::new(format!("{i}"))).await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 10 {
        let m = tokio::select! {
            m = a.receive() => m.unwrap(),
            m = b.receive() => m.unwrap(),
        };
        got.push(m.body().clone());
        m.ack();
    }
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 10, "each message once across both handles");
    for bad in [
        "mem://api-named?ackdeadline=soon",
        "mem://api-named?bogus=1",
        "mem://",
    ] {
        let e = open_subscription(bad).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}");
    }
    topic.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn stream_and_concurrent_handlers() {
    let b = Broker::new();
    b.create_topic("t").unwrap();
    b.create_subscription("s", "t", Duration::from_secs(30))
        .unwrap();
    let topic = b.topic("t");
    let sub = b.subscription("s");
    for i in 0..20 {
        topic.send(Message::new(format!("{i}"))).await.unwrap();
    }
    let mut stream = Box::pin(sub.stream());
    for _ in 0..5 {
        stream.next().await.unwrap().unwrap().ack();
    }

    let handled = Arc::new(AtomicUsize::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let pool = {
        let sub = sub.clone();
        let (handled, running, peak) = (handled.clone(), running.clone(), peak.clone());
        tokio::spawn(async move {
            sub.handle_concurrently(3, move |m| {
                let (handled, running, peak) = (handled.clone(), running.clone(), peak.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    handled.fetch_add(1, Ordering::SeqCst);
                    m.ack();
                }
            })
            .await
        })
    };
    while handled.load(Ordering::SeqCst) < 15 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sub.shutdown().await.unwrap();
    pool.await.unwrap().expect("ends with Ok on shutdown");
    assert!(peak.load(Ordering::SeqCst) <= 3, "at most 3 at once");
    assert!(stream.next().await.is_none(), "the stream ends on shutdown");
    assert_eq!(sub.stats().acked, 20);
    topic.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_received_message_cannot_be_resent_as_is() {
    let b = Broker::new();
    b.create_topic("t").unwrap();
    b.create_subscription("s", "t", Duration::from_secs(30))
        .unwrap();
    let topic = b.topic("t");
    let sub = b.subscription("s");
    topic.send(Message::new("forward me")).await.unwrap();
    let m = sub.receive().await.unwrap();
    topic
        .send(m.clone())
        .await
        .expect("its content can be sent");
    m.ack();
    let copy = sub.receive().await.unwrap();
    let e = topic.send(copy).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("clone"), "{e}");
    // The refused delivery was nacked by the drop rule and comes back.
    let again = tokio::time::timeout(WAIT, sub.receive())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.body().as_ref(), b"forward me");
    again.ack();
    topic.shutdown().await.unwrap();
    sub.shutdown().await.unwrap();
}

#[tokio::test]
async fn prefetched_messages_are_nacked_on_shutdown() {
    let b = Broker::new();
    b.create_topic("t").unwrap();
    b.create_subscription("s", "t", Duration::from_secs(300))
        .unwrap();
    let topic = b.topic("t");
    for i in 0..50 {
        topic.send(Message::new(format!("{i}"))).await.unwrap();
    }
    let sub = b.subscription("s");
    // Receive enough for the batch size to grow and prefetch to kick in.
    for _ in 0..10 {
        sub.receive().await.unwrap().ack();
    }
    sub.shutdown().await.unwrap();
    // Everything not acked is available again at once, not after 300 s.
    let again = b.subscription("s");
    for _ in 0..40 {
        tokio::time::timeout(WAIT, again.receive())
            .await
            .expect("prefetched messages were nacked")
            .unwrap()
            .ack();
    }
    again.shutdown().await.unwrap();
    topic.shutdown().await.unwrap();
}

/// Each nack of one message waits longer, by its delivery attempt, and the
/// broker (not the subscription) keeps it for that long: a second
/// subscription on the same backlog does not get it sooner either.
#[tokio::test]
async fn nack_backoff_grows_with_the_delivery_attempt() {
    let b = Broker::new();
    b.create_topic("t").unwrap();
    b.create_subscription("s", "t", Duration::from_secs(60))
        .unwrap();
    let topic = b.topic("t");
    topic.send(Message::new("again")).await.unwrap();
    let backoff = NackBackoff::exponential(Duration::from_millis(200), Duration::from_secs(5));
    let sub = b.subscription_with_options(
        "s",
        SubscriptionOptions::default().with_nack_backoff(backoff),
    );
    let other = b.subscription("s");
    let mut m = sub.receive().await.unwrap();
    for attempt in 1..=3u32 {
        assert_eq!(m.delivery_attempt(), Some(attempt));
        let nacked = std::time::Instant::now();
        m.nack();
        let first = tokio::select! {
            m = sub.receive() => m,
            m = other.receive() => m,
        };
        m = first.unwrap();
        let waited = nacked.elapsed();
        let due = backoff.delay(Some(attempt));
        assert_eq!(due, Duration::from_millis(200 << (attempt - 1)));
        assert!(
            waited >= due,
            "attempt {attempt}: back after {waited:?}, due {due:?}"
        );
        assert!(
            waited < due + Duration::from_secs(2),
            "attempt {attempt}: {waited:?}"
        );
    }
    m.ack();
    sub.shutdown().await.unwrap();
    other.shutdown().await.unwrap();
    topic.shutdown().await.unwrap();
}

/// An ack after shutdown is not sent (the backend redelivers the message),
/// so it is counted as late, not as acked.
#[tokio::test]
async fn late_acks_are_counted_as_late_not_acked() {
    let b = Broker::new();
    b.create_topic("t").unwrap();
    b.create_subscription("s", "t", Duration::from_secs(30))
        .unwrap();
    let topic = b.topic("t");
    topic.send(Message::new("one")).await.unwrap();
    topic.send(Message::new("two")).await.unwrap();
    let sub = b.subscription("s");
    let first = tokio::time::timeout(WAIT, sub.receive())
        .await
        .unwrap()
        .unwrap();
    let second = tokio::time::timeout(WAIT, sub.receive())
        .await
        .unwrap()
        .unwrap();
    first.ack();
    sub.shutdown().await.unwrap();
    second.ack();
    let stats = sub.stats();
    assert_eq!(stats.acked, 1, "{stats:?}");
    assert_eq!(stats.late_settlements, 1, "{stats:?}");
    topic.shutdown().await.unwrap();
}

/// Shutting down while `handle_concurrently` runs lets the running handlers
/// finish and sends their acks: work already done is not redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_running_handlers_finish_and_sends_their_acks() {
    let b = Broker::new();
    b.create_topic("t").unwrap();
    b.create_subscription("s", "t", Duration::from_secs(30))
        .unwrap();
    let topic = b.topic("t");
    for n in 0..50 {
        topic.send(Message::new(format!("m{n}"))).await.unwrap();
    }
    let sub = b.subscription("s");
    let started = Arc::new(AtomicUsize::new(0));
    let handled = Arc::new(AtomicUsize::new(0));
    let pool = {
        let (sub, started, handled) = (sub.clone(), started.clone(), handled.clone());
        tokio::spawn(async move {
            sub.handle_concurrently(4, move |m| {
                let (started, handled) = (started.clone(), handled.clone());
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    m.ack();
                    handled.fetch_add(1, Ordering::SeqCst);
                }
            })
            .await
        })
    };
    while started.load(Ordering::SeqCst) < 4 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sub.shutdown().await.unwrap();
    assert_eq!(
        handled.load(Ordering::SeqCst),
        started.load(Ordering::SeqCst),
        "shutdown returned before the running handlers finished"
    );
    pool.await.unwrap().expect("ends with Ok on shutdown");
    let handled = handled.load(Ordering::SeqCst);
    let stats = sub.stats();
    assert_eq!(stats.late_settlements, 0, "{stats:?}");
    assert_eq!(stats.acked as usize, handled, "{stats:?}");
    assert_eq!(
        b.backlog("s").unwrap(),
        50 - handled,
        "only what was not handled is left"
    );
    topic.shutdown().await.unwrap();
}

/// A handler may shut its subscription down (say, after a last message):
/// shutdown then waits for the other handlers, not for the caller itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_can_shut_its_subscription_down() {
    let b = Broker::new();
    b.create_topic("t").unwrap();
    b.create_subscription("s", "t", Duration::from_secs(30))
        .unwrap();
    let topic = b.topic("t");
    topic.send(Message::new("stop")).await.unwrap();
    let sub = b.subscription("s");
    let inner = sub.clone();
    let pool = sub.handle_concurrently(2, move |m| {
        let sub = inner.clone();
        async move {
            m.ack();
            sub.shutdown().await.unwrap();
        }
    });
    tokio::time::timeout(Duration::from_secs(5), pool)
        .await
        .expect("shutdown from a handler does not wait for that handler")
        .unwrap();
    assert_eq!(sub.stats().acked, 1);
    assert_eq!(b.backlog("s").unwrap(), 0, "its ack was sent");
    topic.shutdown().await.unwrap();
}

/// The most operations in a row during which another task got no turn,
/// from the count of its turns seen after each operation.
struct Runs {
    seen: usize,
    run: usize,
    longest: usize,
}

impl Runs {
    fn after(turns: usize) -> Self {
        Runs {
            seen: turns,
            run: 0,
            longest: 0,
        }
    }

    fn op_done(&mut self, turns: usize) {
        self.run = if turns == self.seen { self.run + 1 } else { 1 };
        self.seen = turns;
        self.longest = self.longest.max(self.run);
    }
}

/// Sends the in-memory broker takes at once, and receives of messages
/// already queued, still let the worker's other tasks run: on a one-thread
/// runtime a task that yields in a loop gets turns all through a send loop
/// and a receive loop, not only when they wait.
#[tokio::test(flavor = "current_thread")]
async fn send_and_receive_loops_let_other_tasks_run() {
    let b = Broker::new();
    b.create_topic("t").unwrap();
    b.create_subscription("s", "t", Duration::from_secs(30))
        .unwrap();
    let (topic, sub) = (b.topic("t"), b.subscription("s"));
    const N: usize = 50_000;
    let turns = Arc::new(AtomicUsize::new(0));
    let ticker = tokio::spawn({
        let turns = turns.clone();
        async move {
            loop {
                turns.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }
    });
    let mut sends = Runs::after(turns.load(Ordering::Relaxed));
    for i in 0..N {
        topic.send(Message::new(format!("m{i}"))).await.unwrap();
        sends.op_done(turns.load(Ordering::Relaxed));
    }
    // Tokio's budget is 128 operations a turn.
    assert!(
        sends.longest <= 256,
        "{} sends in a row kept the other task waiting",
        sends.longest
    );

    let mut receives = Runs::after(turns.load(Ordering::Relaxed));
    for _ in 0..N {
        sub.receive().await.unwrap().ack();
        receives.op_done(turns.load(Ordering::Relaxed));
    }
    assert!(
        receives.longest <= 256,
        "{} receives in a row kept the other task waiting",
        receives.longest
    );
    ticker.abort();
    topic.shutdown().await.unwrap();
    sub.shutdown().await.unwrap();
}

/// A before-send hook runs before the in-memory broker takes its locks: one
/// that opens a subscription on the topic it is sent to does not deadlock.
#[test]
fn a_before_send_hook_may_open_a_subscription() {
    let (done, finished) = std::sync::mpsc::channel();
    // Its own thread, so a deadlock fails the test instead of hanging it.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let b = Broker::new();
            b.create_topic("t").unwrap();
            b.create_subscription("s", "t", Duration::from_secs(30))
                .unwrap();
            let topic = b.topic("t");
            let opener = b.clone();
            let m = Message::new("m").with_before_send(move |_| {
                opener.create_subscription("late", "t", Duration::from_secs(30))
            });
            topic.send(m).await.unwrap();
            topic.shutdown().await.unwrap();
            assert_eq!(b.backlog("s").unwrap(), 1);
        });
        let _ = done.send(());
    });
    finished
        .recv_timeout(WAIT)
        .expect("a send whose before-send hook opens a subscription never returned");
}
