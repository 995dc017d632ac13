//! Google Cloud Pub/Sub driver for [`pubsub_core`], on Google's official
//! `google-cloud-pubsub` crate.
//!
//! URLs take the Go CDK's forms:
//! - topic `gcppubsub://projects/P/topics/T` or `gcppubsub://P/T`, with
//!   `max_send_batch_size` (1–1000) and `ordering` (this driver's: allow
//!   ordering keys);
//! - subscription `gcppubsub://projects/P/subscriptions/S` or
//!   `gcppubsub://P/S`, with `max_recv_batch_size` (1–1000) and `nacklazy`.
//!
//! An unknown parameter is `InvalidArgument`. Topics and subscriptions are
//! an operator's to create (the `gcloud` CLI, Terraform, or
//! [`google_cloud_pubsub::client::TopicAdmin`] and
//! [`google_cloud_pubsub::client::SubscriptionAdmin`]).
//!
//! The endpoint and credentials come from the environment, as with
//! Google's other clients: with `PUBSUB_EMULATOR_HOST=host:port` set, the
//! emulator at that address, without credentials; otherwise Pub/Sub itself
//! with Application Default Credentials (`GOOGLE_APPLICATION_CREDENTIALS`,
//! `gcloud auth application-default login`, or the metadata server).
//! [`GcpOpener::with_clients`] and the `open_*` functions take clients
//! built by the application instead.
//!
//! ```no_run
//! # #[tokio::main]
//! # async fn main() -> pubsub_core::Result<()> {
//! use pubsub_core::{registry, Message};
//!
//! // Once at start-up: make gcppubsub:// URLs open through this driver.
//! pubsub_driver_gcp::register(registry());
//!
//! let topic = pubsub_core::open_topic("gcppubsub://my-project/orders").await?;
//! topic.send(Message::new("hello").with_attribute("kind", "greeting")).await?;
//!
//! let sub = pubsub_core::open_subscription("gcppubsub://my-project/billing").await?;
//! let msg = sub.receive().await?;
//! msg.ack();
//! # topic.shutdown().await?; sub.shutdown().await
//! # }
//! ```
//!
//! # Behaviour
//! - `send` returns once Pub/Sub accepted the message and gave it an id.
//!   Batching is the core's alone: each batch it hands over leaves as one
//!   Publish request (up to 1,000 messages and 8 MB; one request an
//!   ordering key, as Pub/Sub publishes a key in order), through a
//!   `Publisher` sized to that batch (a long-lived one for each size; one
//!   made for the batch alone where it has ordering keys) whose thresholds
//!   never split it or hold it on a timer. A batch without before-send
//!   hooks hands each record over as it is made. Failures
//!   come back for each message; the core retries the temporary ones, and
//!   the client's own retries are off so the two do not stack.
//! - Refused before any I/O, with `InvalidArgument`: a name Pub/Sub would
//!   refuse (3–255 characters, starting with a letter, of letters, digits
//!   and `-_.~+%`, not starting with `goog`), a path of any other shape, a
//!   message over [`MAX_MESSAGE_BYTES`], more than 100 attributes, an
//!   attribute name over 256 bytes or value over 1,024, a message with
//!   neither data nor attributes, and an ordering key on a topic opened
//!   without ordering (Google's clients refuse it likewise).
//! - Ordering keys become Pub/Sub's ordering key; a subscription with
//!   message ordering enabled delivers one key's messages in order. A
//!   failed publish of a key is an error for that message; the next batch
//!   has a publisher of its own, so the key is never left paused.
//! - Receiving is the client's streaming pull. Ack and nack go to the
//!   client, which batches them into Acknowledge and ModifyAckDeadline
//!   calls of its own (so the core treats them as local bookkeeping);
//!   nack is a redelivery (deadline 0) once the core's
//!   [`NackBackoff`](pubsub_core::NackBackoff) delay is over (the core
//!   holds the message and the client keeps its lease meanwhile, since the
//!   client's handler cannot nack with a deadline; immediate with
//!   `NackBackoff::none()`), or with `nacklazy` the message is left to its
//!   deadline. On a subscription with exactly-once
//!   delivery an ack completes when Pub/Sub confirms it, and fails (its
//!   message to be redelivered) when the lease had expired.
//! - Leases: the client keeps the lease of each message it delivered, and
//!   this driver holds it to the core's lease keeper (see
//!   [`GcpSubscription`]): a held message's lease is extended until
//!   `SubscriptionOptions::max_lease_extension`, `Message::extend_lease`
//!   works, and a message the core stops keeping is let go after its
//!   deadline and delivered again. The deadline is the subscription's ack
//!   deadline, read at open ([`SubscriptionConfig::ack_deadline`]).
//! - Errors: gRPC and HTTP status mapped in one function; Unavailable,
//!   DeadlineExceeded, ResourceExhausted, Aborted and Internal are
//!   temporary. A missing topic or subscription is `NotFound` on first
//!   use. The client's error is the source: for sends
//!   [`google_cloud_pubsub::error::PublishError`], for the rest
//!   [`google_cloud_pubsub::Error`].
//! - Attributes travel verbatim and the body as the message's data, as
//!   the Go CDK's driver puts them, so Go and Rust services share topics.
//! - Connection loss: the client reopens its streaming pull and the
//!   driver reads it from one task, so a receive the core gives up never
//!   abandons a stream being opened. Acks and lease extensions the client
//!   could not send while a connection was down are dropped by it (it
//!   tries each once a subchannel), so their messages come back: expect
//!   duplicates after a network fault. Against an emulator without its
//!   fix, a cut connection can also leave some messages late (see below);
//!   `tests/faults.rs` says what was measured.
//!
//! # Against the emulator
//! The emulator's jar (0.8.20, in Google Cloud CLI 528) mixes two gRPC
//! versions: when a client resets a stream or its connection drops, the
//! emulator's gRPC server fails (`NoSuchMethodError:
//! io.grpc.InternalStatus.asRuntimeException` in its log) before the
//! emulator learns the stream is gone. A StreamingPull its client closed
//! then goes on taking messages, which reach no one and come back only
//! after their ack deadline and a redelivery backoff (20 to 50 s later in
//! trials with a 10 s deadline); Google's Python client sees the same.
//! `scripts/backends up` starts the emulator with the missing method added
//! (`scripts/pubsub-emulator-fix`), and messages sent after a close then
//! reach the open stream at once. Against an emulator started otherwise, a
//! subscription closed and opened again, or a stream the client reopened
//! after a cut connection, can leave the first messages sent afterwards
//! late; nothing is lost. Pub/Sub itself ends a stream when its client
//! does.
//!
//! # Compared with the Go CDK
//! - The Go CDK receives with unary Pull and sends its own
//!   ModifyAckDeadline calls; the Rust crate offers only streaming pull,
//!   whose lease management this driver drives as above. Redelivery after
//!   the deadline and nack behave the same.
//! - Unavailable is temporary here (the Go CDK maps it to Unknown).
//! - `ordering` is this driver's parameter; the Go CDK sends no ordering
//!   keys.
//!
//! # Running the tests against a live project
//! The conformance suite runs against Google's emulator (`scripts/backends
//! up` starts it on 127.0.0.1:8085). The same suite runs against a real
//! project, creating and deleting uniquely named topics and
//! subscriptions, when `PUBSUB_CONFORMANCE_GCP_PROJECT` names it and
//! `PUBSUB_EMULATOR_HOST` is unset, with Application Default Credentials
//! allowed to administer Pub/Sub:
//! ```text
//! env -u PUBSUB_EMULATOR_HOST PUBSUB_CONFORMANCE_GCP_PROJECT=my-project \
//!     cargo test -p pubsub-driver-gcp --test conformance
//! ```
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]

mod error;
mod path;
mod subscription;
mod topic;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use google_cloud_gax::retry_policy::NeverRetry;
use google_cloud_pubsub::client::{BasePublisher, Subscriber, SubscriptionAdmin, TopicAdmin};
use pubsub_core::{
    parse_bool, query_pairs, Error, ErrorKind, Opener, Registry, Result, Subscription,
    SubscriptionOptions, Topic, TopicOptions, Url,
};
use tokio::sync::OnceCell;

pub use google_cloud_pubsub;
pub use subscription::{GcpSubscription, SubscriptionConfig, DEFAULT_ACK_DEADLINE, MAX_RECV_BATCH};
pub use topic::{GcpTopic, TopicConfig, MAX_MESSAGE_BYTES, MAX_SEND_BATCH};

/// The URL scheme of this driver.
pub const SCHEME: &str = "gcppubsub";

pub(crate) const DRIVER: &str = "gcppubsub";
/// OpenTelemetry's `messaging.system` for Pub/Sub.
pub(crate) const MESSAGING_SYSTEM: &str = "gcp_pubsub";

/// Where the clients connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Pub/Sub itself, with Application Default Credentials.
    Google,
    /// An emulator at `host:port`, without credentials.
    Emulator(String),
}

impl Endpoint {
    /// `PUBSUB_EMULATOR_HOST` when set, otherwise Pub/Sub itself.
    pub fn from_env() -> Self {
        match std::env::var("PUBSUB_EMULATOR_HOST") {
            Ok(host) if !host.trim().is_empty() => Endpoint::Emulator(host.trim().to_owned()),
            _ => Endpoint::Google,
        }
    }
}

/// The clients a driver uses: a publisher client for topics, a subscriber
/// client for subscriptions, and a subscription admin client that reads
/// ack deadlines.
#[derive(Clone, Debug)]
pub struct Clients {
    /// Makes the publishers of topics.
    pub publisher: BasePublisher,
    /// Opens the streaming pulls of subscriptions.
    pub subscriber: Subscriber,
    /// Reads a subscription's ack deadline at open, if given.
    pub admin: Option<SubscriptionAdmin>,
}

fn setup(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(
        ErrorKind::FailedPrecondition,
        format!(
            "cannot set up the Pub/Sub {what} client: {e}; set PUBSUB_EMULATOR_HOST for an \
             emulator, or provide Application Default Credentials"
        ),
    )
    .with_context("driver", DRIVER)
    .with_source(e)
}

macro_rules! build {
    ($builder:expr, $endpoint:expr) => {{
        let b = $builder;
        match $endpoint {
            Endpoint::Google => b,
            Endpoint::Emulator(host) => b.with_endpoint(format!("http://{host}")).with_credentials(
                google_cloud_auth::credentials::anonymous::Builder::new().build(),
            ),
        }
    }};
}

/// Builds the clients for `endpoint`. The publisher does not retry: the
/// core does.
pub async fn connect(endpoint: &Endpoint) -> Result<Clients> {
    let publisher = build!(BasePublisher::builder(), endpoint)
        .with_retry_policy(NeverRetry)
        .build()
        .await
        .map_err(|e| setup("publisher", e))?;
    let subscriber = build!(Subscriber::builder(), endpoint)
        .build()
        .await
        .map_err(|e| setup("subscriber", e))?;
    let admin = build!(SubscriptionAdmin::builder(), endpoint)
        .build()
        .await
        .map_err(|e| setup("subscription admin", e))?;
    Ok(Clients {
        publisher,
        subscriber,
        admin: Some(admin),
    })
}

/// Builds a topic admin client for `endpoint`, for tools and tests that
/// create topics.
pub async fn topic_admin(endpoint: &Endpoint) -> Result<TopicAdmin> {
    build!(TopicAdmin::builder(), endpoint)
        .build()
        .await
        .map_err(|e| setup("topic admin", e))
}

/// Builds a subscription admin client for `endpoint`.
pub async fn subscription_admin(endpoint: &Endpoint) -> Result<SubscriptionAdmin> {
    build!(SubscriptionAdmin::builder(), endpoint)
        .build()
        .await
        .map_err(|e| setup("subscription admin", e))
}

/// Opens the topic `name` (`projects/P/topics/T` or `P/T`).
pub fn open_topic(
    clients: &Clients,
    name: &str,
    config: TopicConfig,
    options: TopicOptions,
) -> Result<Topic> {
    let driver = GcpTopic::new(clients.publisher.clone(), name, config)?;
    Ok(Topic::with_options(Arc::new(driver), options))
}

/// Opens the subscription `name` (`projects/P/subscriptions/S` or `P/S`).
pub async fn open_subscription(
    clients: &Clients,
    name: &str,
    config: SubscriptionConfig,
    options: SubscriptionOptions,
) -> Result<Subscription> {
    let driver = GcpSubscription::new(
        clients.subscriber.clone(),
        clients.admin.as_ref(),
        name,
        config,
    )
    .await?;
    Ok(Subscription::with_options(Arc::new(driver), options))
}

/// Opens `gcppubsub://` URLs, with clients for [`Endpoint::from_env`]
/// built on first use and shared by everything it opens.
#[derive(Default)]
pub struct GcpOpener {
    clients: OnceCell<Clients>,
}

impl fmt::Debug for GcpOpener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcpOpener")
            .field("connected", &self.clients.initialized())
            .finish()
    }
}

impl GcpOpener {
    /// An opener on clients the application built.
    pub fn with_clients(clients: Clients) -> Self {
        GcpOpener {
            clients: OnceCell::new_with(Some(clients)),
        }
    }

    async fn clients(&self) -> Result<&Clients> {
        self.clients
            .get_or_try_init(|| async { connect(&Endpoint::from_env()).await })
            .await
    }
}

fn name_of(url: &Url, example: &str) -> Result<String> {
    pubsub_core::resource_name(url).ok_or_else(|| {
        Error::invalid_argument(format!(
            "a gcppubsub:// URL names its resource, as in {example}"
        ))
    })
}

fn batch_size(key: &str, value: &str) -> Result<usize> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=1000).contains(n))
        .ok_or_else(|| {
            Error::invalid_argument(format!("{key} must be between 1 and 1000, not {value:?}"))
        })
}

/// The topic config a `gcppubsub://` URL asks for.
fn topic_config(url: &Url) -> Result<TopicConfig> {
    let mut config = TopicConfig::default();
    for (k, v) in query_pairs(url) {
        match k.as_str() {
            "max_send_batch_size" => config.max_send_batch_size = batch_size(&k, &v)?,
            "ordering" => config.message_ordering = parse_bool(&k, &v)?,
            _ => {
                return Err(Error::invalid_argument(format!(
                    "unknown gcppubsub:// topic URL parameter {k:?}; known: max_send_batch_size, \
                     ordering"
                )))
            }
        }
    }
    Ok(config)
}

/// The subscription config a `gcppubsub://` URL asks for.
fn subscription_config(url: &Url) -> Result<SubscriptionConfig> {
    let mut config = SubscriptionConfig::default();
    for (k, v) in query_pairs(url) {
        match k.as_str() {
            "max_recv_batch_size" => config.max_recv_batch_size = batch_size(&k, &v)?,
            "nacklazy" => config.nack_lazy = parse_bool(&k, &v)?,
            _ => {
                return Err(Error::invalid_argument(format!(
                    "unknown gcppubsub:// subscription URL parameter {k:?}; known: \
                     max_recv_batch_size, nacklazy"
                )))
            }
        }
    }
    Ok(config)
}

#[async_trait]
impl Opener for GcpOpener {
    fn url_forms(&self, _scheme: &str) -> &'static [&'static str] {
        &[
            "gcppubsub://projects/P/topics/T or gcppubsub://P/T[?max_send_batch_size=N&ordering=BOOL]  (topic)",
            "gcppubsub://projects/P/subscriptions/S or gcppubsub://P/S[?max_recv_batch_size=N&nacklazy=BOOL]  (subscription)",
        ]
    }

    async fn open_topic(&self, url: &Url) -> Result<Topic> {
        let name = name_of(url, "gcppubsub://my-project/orders")?;
        let config = topic_config(url)?;
        // Check the name before building clients, so bad input fails the
        // same with and without credentials.
        path::full_path(&name, path::Collection::Topics)?;
        open_topic(
            self.clients().await?,
            &name,
            config,
            TopicOptions::default(),
        )
    }

    async fn open_subscription(&self, url: &Url) -> Result<Subscription> {
        let name = name_of(url, "gcppubsub://my-project/billing")?;
        let config = subscription_config(url)?;
        path::full_path(&name, path::Collection::Subscriptions)?;
        open_subscription(
            self.clients().await?,
            &name,
            config,
            SubscriptionOptions::default(),
        )
        .await
    }
}

/// Registers `gcppubsub://` with `registry`, building clients for
/// [`Endpoint::from_env`] on first use.
pub fn register(registry: &Registry) {
    registry.register(SCHEME, GcpOpener::default());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn url_parameters_as_the_go_cdk() {
        let c = topic_config(&url("gcppubsub://p/t?max_send_batch_size=10&ordering")).unwrap();
        assert_eq!((c.max_send_batch_size, c.message_ordering), (10, true));
        let c =
            subscription_config(&url("gcppubsub://p/s?max_recv_batch_size=5&nacklazy=1")).unwrap();
        assert_eq!((c.max_recv_batch_size, c.nack_lazy), (5, true));
        for bad in [
            "gcppubsub://p/t?max_send_batch_size=0",
            "gcppubsub://p/t?max_send_batch_size=1001",
            "gcppubsub://p/t?max_send_batch_size=x",
            "gcppubsub://p/t?ordering=maybe",
            "gcppubsub://p/t?nacklazy=true",
        ] {
            let e = topic_config(&url(bad)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}");
        }
        for bad in [
            "gcppubsub://p/s?max_recv_batch_size=0",
            "gcppubsub://p/s?nacklazy=yes",
            "gcppubsub://p/s?max_send_batch_size=10",
        ] {
            let e = subscription_config(&url(bad)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn both_url_forms_open_the_same_path() {
        for u in [
            "gcppubsub://projects/p-1/topics/orders",
            "gcppubsub://p-1/orders",
        ] {
            let name = name_of(&url(u), "").unwrap();
            assert_eq!(
                path::full_path(&name, path::Collection::Topics).unwrap(),
                "projects/p-1/topics/orders"
            );
        }
        assert!(name_of(&url("gcppubsub://"), "").is_err());
    }
}
