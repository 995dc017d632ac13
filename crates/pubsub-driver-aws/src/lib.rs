//! AWS SNS and SQS driver for [`pubsub_core`], on the official
//! `aws-sdk-sns` and `aws-sdk-sqs` crates, wire-compatible with the Go
//! CDK's `awssnssqs` driver.
//!
//! URLs take the Go CDK's forms:
//! - topic `awssns:///arn:aws:sns:REGION:ACCOUNT:TOPIC` (an SNS topic; the
//!   ARN goes in the path, as `:` cannot be in a host);
//! - topic `awssqs://HOST/ACCOUNT/QUEUE` (sending straight to a queue) and
//!   subscription `awssqs://HOST/ACCOUNT/QUEUE`; the queue URL is
//!   `https://HOST/ACCOUNT/QUEUE`.
//!
//! Parameters, as the Go CDK: `region`, `endpoint`, `profile`, `fips`,
//! `dualstack`, `anonymous`, `role` (assumed through STS), `awssdk`
//! (ignored) and `hostname_immutable` (no effect: this SDK never rewrites
//! the host); for subscriptions also `raw`, `snstopicarn`, `nacklazy` and
//! `waittime` (a Go duration, at most 20s). An unknown parameter is
//! `InvalidArgument`. Everything else comes from AWS's standard
//! environment and credential chain (`AWS_ENDPOINT_URL`, `AWS_REGION`,
//! `AWS_PROFILE`, shared config files, SSO-free profiles, web identity,
//! instance and container roles), so the same code runs against a real
//! account; with no region configured, the ARN's or queue host's is used.
//! [`AwsOpener::with_clients`] and the `open_*` functions take clients the
//! application built.
//!
//! ```no_run
//! # #[tokio::main]
//! # async fn main() -> pubsub_core::Result<()> {
//! use pubsub_core::{registry, Message};
//!
//! // Once at start-up: make awssns:// and awssqs:// URLs open here.
//! pubsub_driver_aws::register(registry());
//!
//! let topic = pubsub_core::open_topic(
//!     "awssns:///arn:aws:sns:us-east-2:123456789012:orders",
//! )
//! .await?;
//! topic.send(Message::new("hello").with_attribute("kind", "greeting")).await?;
//!
//! let sub = pubsub_core::open_subscription(
//!     "awssqs://sqs.us-east-2.amazonaws.com/123456789012/billing",
//! )
//! .await?;
//! let msg = sub.receive().await?;
//! msg.ack();
//! # topic.shutdown().await?; sub.shutdown().await
//! # }
//! ```
//!
//! # Behaviour
//! - `send` returns once SNS or SQS accepted the message. The core batches
//!   sends; each batch leaves as PublishBatch or SendMessageBatch requests
//!   of up to ten entries and 256 KiB, sent concurrently, and each failed
//!   entry fails only its own message (the core retries the temporary
//!   ones). The SDK's own retries are off in clients this crate builds, so
//!   the two do not stack.
//! - Refused before any I/O, with `InvalidArgument` naming the limit: an
//!   empty body (AWS requires one), more than 10 message attributes once
//!   encoded (the `base64encoded` marker counts: SNS raw delivery silently
//!   drops messages with more), an attribute name over 256 bytes once
//!   escaped, a message over [`MAX_MESSAGE_BYTES`] as AWS counts it, a
//!   FIFO message without a group, a malformed ARN or queue URL.
//! - Encoding as the Go CDK's (see [`encode`]): attribute keys
//!   hex-escaped (`__0x2f__`), values URL-escaped, a body that is not
//!   UTF-8 base64-encoded and marked with `base64encoded`; all undone on
//!   receive. A body is unwrapped from an SNS envelope only when it really
//!   is a notification (and from the `snstopicarn` topic when given);
//!   `raw` never unwraps.
//! - FIFO queues and topics (names ending `.fifo`): the ordering key is the
//!   MessageGroupId (or, as the Go CDK, a `MessageGroupId` attribute), and
//!   the deduplication id a `DeduplicationId` attribute, else the
//!   message's own id, the same on each of the core's attempts
//!   ([`Deduplication`]). On receive the group is the ordering key. One
//!   batch at a time goes to a FIFO target, its requests one after another
//!   and none after one that failed, so a group's messages and their
//!   retries arrive in send order; only an entry refused on its own
//!   inside an accepted request (which AWS reports per entry) can land
//!   after later messages of its group. On standard queues and topics the
//!   ordering key is not sent.
//! - Receiving is ReceiveMessage with long polling ([`DEFAULT_WAIT_TIME`]),
//!   up to ten a call and several calls at once for bigger batches
//!   ([`SubscriptionConfig::receive_concurrency`], 16). Ack is
//!   DeleteMessageBatch; nack ChangeMessageVisibilityBatch to the delay
//!   the core's [`NackBackoff`](pubsub_core::NackBackoff) gives it (whole
//!   seconds, rounded up; so SQS keeps the message invisible, not the
//!   client; to [`SubscriptionConfig::nack_delay`] where the backoff gives
//!   none), or nothing with `nacklazy`.
//!   Leases: the core's lease keeper extends a held message's visibility
//!   through ChangeMessageVisibilityBatch, so it is not redelivered while
//!   held (up to `SubscriptionOptions::max_lease_extension`); the ack
//!   deadline is the queue's visibility timeout, read at open. A message
//!   not acked in time comes back after it. `delivery_attempt` is SQS's
//!   ApproximateReceiveCount.
//! - Errors are mapped in one function from the services' codes, in both
//!   spellings (`QueueDoesNotExist` and
//!   `AWS.SimpleQueueService.NonExistentQueue`); throttling, 5xx,
//!   timeouts and connection failures are temporary. A missing topic or
//!   queue is `NotFound` on first use. The SDK's `SdkError` is the source.
//!
//! # Compared with the Go CDK
//! - Bodies that are UTF-8 but hold characters SQS refuses (NUL and other
//!   control characters) are base64-encoded too; the Go CDK sends them
//!   and SQS refuses them. Go receivers decode them by the marker as usual.
//! - Attribute names AWS would refuse are escaped where the Go CDK sends
//!   them as they are: a trailing `.`, an `AWS.` or `Amazon.` prefix (its
//!   first letter escaped), and a user attribute named `base64encoded`
//!   (which a Go receiver would take for the marker). Go's unescaping
//!   reads all of them back.
//! - Lease extension, FIFO deduplication by message id, the limits checked
//!   before I/O, and nack after a delay are this driver's; the Go CDK has
//!   none of them, and nacks with a visibility timeout of 1 s where this
//!   driver uses the backoff's delay (0 with `NackBackoff::none()`).
//! - The Go CDK polls without waiting by default (`waittime` 0, with a
//!   250 ms pause after an empty poll); this driver long-polls for 2 s.
//! - `rate_limiter_capacity`, `request_checksum_calculation` and
//!   `response_checksum_validation` are refused as unknown: this driver
//!   does not retry in the SDK, and SNS and SQS take no checksums.
//!
//! # Running the tests against a live account
//! The suites run against moto (`scripts/backends up` starts it on
//! 127.0.0.1:5000). The same suites run against AWS, creating and deleting
//! uniquely named topics and queues, when `PUBSUB_CONFORMANCE_AWS_REGION`
//! names a region and the standard chain finds credentials allowed to
//! administer SNS and SQS:
//! ```text
//! PUBSUB_CONFORMANCE_AWS_REGION=us-east-2 cargo test -p pubsub-driver-aws
//! ```
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]

pub mod encode;
mod error;
mod names;
mod subscription;
mod topic;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use pubsub_core::{
    parse_bool, parse_duration, query_pairs, Error, Opener, Registry, Result, Subscription,
    SubscriptionOptions, Topic, TopicOptions, Url,
};
use tokio::sync::Mutex;

pub use aws_sdk_sns;
pub use aws_sdk_sqs;
pub use encode::BodyEncoding;
pub use subscription::{
    AwsSubscription, SubscriptionConfig, DEFAULT_RECEIVE_CONCURRENCY, DEFAULT_VISIBILITY_TIMEOUT,
    DEFAULT_WAIT_TIME, MAX_RECEIVE, MAX_VISIBILITY_TIMEOUT,
};
pub use topic::{
    AwsTopic, Deduplication, TopicConfig, DEDUPLICATION_ATTRIBUTE, GROUP_ATTRIBUTE,
    MAX_BATCH_ENTRIES, MAX_MESSAGE_BYTES, MAX_REQUEST_BYTES,
};

/// The URL scheme of SNS topics.
pub const SNS_SCHEME: &str = "awssns";

/// The URL scheme of SQS queues, as topics and as subscriptions.
pub const SQS_SCHEME: &str = "awssqs";

pub(crate) const DRIVER: &str = "awssnssqs";

/// The SNS and SQS clients a driver uses.
#[derive(Clone, Debug)]
pub struct Clients {
    /// For SNS topics.
    pub sns: aws_sdk_sns::Client,
    /// For SQS queues.
    pub sqs: aws_sdk_sqs::Client,
}

impl Clients {
    /// Clients from an SDK configuration, with the SDK's retries off (the
    /// core retries) and time limits fit for long polling.
    pub fn from_config(config: &SdkConfig) -> Self {
        Self::build(config, false)
    }

    /// With `unsigned`, requests go without a signature when there are no
    /// credentials (the Go CDK's `anonymous`).
    fn build(config: &SdkConfig, unsigned: bool) -> Self {
        let config = config
            .to_builder()
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    // Above the longest long poll (20 s).
                    .operation_attempt_timeout(Duration::from_secs(40))
                    .build(),
            )
            .build();
        let mut sns = aws_sdk_sns::config::Builder::from(&config);
        let mut sqs = aws_sdk_sqs::config::Builder::from(&config);
        if unsigned {
            sns = sns.allow_no_auth();
            sqs = sqs.allow_no_auth();
        }
        Clients {
            sns: aws_sdk_sns::Client::from_conf(sns.build()),
            sqs: aws_sdk_sqs::Client::from_conf(sqs.build()),
        }
    }
}

/// The AWS settings a URL's query can make, as the Go CDK's
/// `V2ConfigFromURLParams`.
#[non_exhaustive]
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct AwsParams {
    /// `region`.
    pub region: Option<String>,
    /// `endpoint`: the URL of an emulator or a VPC endpoint.
    pub endpoint: Option<String>,
    /// `profile`: a shared config profile.
    pub profile: Option<String>,
    /// `fips`.
    pub fips: bool,
    /// `dualstack`.
    pub dual_stack: bool,
    /// `anonymous`: send unsigned requests.
    pub anonymous: bool,
    /// `role`: an IAM role ARN to assume through STS.
    pub role: Option<String>,
}

impl AwsParams {
    /// Sets the region.
    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Sets the endpoint (an emulator's URL, say).
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Takes the parameter `key` if it is an AWS one; `Ok(false)` for any
    /// other.
    fn take(&mut self, key: &str, value: &str) -> Result<bool> {
        match key {
            "region" => self.region = Some(value.to_owned()),
            "endpoint" => self.endpoint = Some(value.to_owned()),
            "profile" => self.profile = Some(value.to_owned()),
            "fips" => self.fips = parse_bool(key, value)?,
            "dualstack" => self.dual_stack = parse_bool(key, value)?,
            "anonymous" => self.anonymous = parse_bool(key, value)?,
            "role" => {
                if !value.starts_with("arn:") {
                    return Err(Error::invalid_argument(format!(
                        "role must be an IAM role ARN (arn:...), not {value:?}"
                    )));
                }
                self.role = Some(value.to_owned());
            }
            "hostname_immutable" => {
                parse_bool(key, value)?;
            }
            "awssdk" => {}
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Clients for these settings (see [`AwsParams::load`]).
    pub async fn clients(&self, fallback_region: Option<&str>) -> Clients {
        Clients::build(&self.load(fallback_region).await, self.anonymous)
    }

    /// Loads the SDK configuration: these settings over the standard
    /// environment and credential chain, with `fallback_region` when
    /// neither names a region.
    pub async fn load(&self, fallback_region: Option<&str>) -> SdkConfig {
        let loader = || {
            let mut l = aws_config::defaults(BehaviorVersion::latest());
            if let Some(r) = &self.region {
                l = l.region(Region::new(r.clone()));
            }
            if let Some(e) = &self.endpoint {
                l = l.endpoint_url(e);
            }
            if let Some(p) = &self.profile {
                l = l.profile_name(p);
            }
            if self.fips {
                l = l.use_fips(true);
            }
            if self.dual_stack {
                l = l.use_dual_stack(true);
            }
            if self.anonymous {
                l = l.no_credentials();
            }
            l
        };
        let mut config = loader().load().await;
        if config.region().is_none() {
            if let Some(r) = fallback_region {
                config = loader().region(Region::new(r.to_owned())).load().await;
            }
        }
        if let Some(role) = &self.role {
            let provider = aws_config::sts::AssumeRoleProvider::builder(role)
                .configure(&config)
                .session_name("pubsub-rs")
                .build()
                .await;
            config = config
                .to_builder()
                .credentials_provider(aws_sdk_sqs::config::SharedCredentialsProvider::new(
                    provider,
                ))
                .build();
        }
        config
    }
}

/// Opens the SNS topic `arn`.
pub fn open_sns_topic(
    client: aws_sdk_sns::Client,
    arn: &str,
    config: TopicConfig,
    options: TopicOptions,
) -> Result<Topic> {
    let driver = AwsTopic::sns(client, arn, config)?;
    Ok(Topic::with_options(Arc::new(driver), options))
}

/// Opens the SQS queue at `queue_url` as a topic.
pub fn open_sqs_topic(
    client: aws_sdk_sqs::Client,
    queue_url: &str,
    config: TopicConfig,
    options: TopicOptions,
) -> Result<Topic> {
    let driver = AwsTopic::sqs(client, queue_url, config)?;
    Ok(Topic::with_options(Arc::new(driver), options))
}

/// Opens the SQS queue at `queue_url` as a subscription.
pub async fn open_subscription(
    client: aws_sdk_sqs::Client,
    queue_url: &str,
    config: SubscriptionConfig,
    options: SubscriptionOptions,
) -> Result<Subscription> {
    let driver = AwsSubscription::new(client, queue_url, config).await?;
    Ok(Subscription::with_options(Arc::new(driver), options))
}

/// Opens `awssns://` and `awssqs://` URLs. Clients are built on first use
/// for each distinct set of AWS parameters and shared by everything opened
/// with it.
#[derive(Default)]
pub struct AwsOpener {
    given: Option<Clients>,
    built: Mutex<HashMap<AwsParams, Clients>>,
}

impl fmt::Debug for AwsOpener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsOpener")
            .field("given_clients", &self.given.is_some())
            .finish()
    }
}

impl AwsOpener {
    /// An opener on clients the application built; URLs with AWS
    /// parameters are refused, as the clients are already configured.
    pub fn with_clients(clients: Clients) -> Self {
        AwsOpener {
            given: Some(clients),
            built: Mutex::default(),
        }
    }

    async fn clients(&self, params: &AwsParams, fallback_region: Option<&str>) -> Result<Clients> {
        if let Some(c) = &self.given {
            if *params != AwsParams::default() {
                return Err(Error::invalid_argument(
                    "this opener uses clients the application built: AWS parameters in the URL \
                     (region, endpoint, profile...) cannot apply",
                ));
            }
            return Ok(c.clone());
        }
        let mut built = self.built.lock().await;
        if let Some(c) = built.get(params) {
            return Ok(c.clone());
        }
        let c = params.clients(fallback_region).await;
        built.insert(params.clone(), c.clone());
        Ok(c)
    }
}

/// The queue URL of an `awssqs://` URL, as the Go CDK makes it.
fn queue_url(url: &Url) -> Result<String> {
    let host = url.host_str().unwrap_or("");
    if host.is_empty() {
        return Err(Error::invalid_argument(
            "an awssqs:// URL names its queue as awssqs://HOST/ACCOUNT/QUEUE, as in \
             awssqs://sqs.us-east-2.amazonaws.com/123456789012/orders",
        ));
    }
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    Ok(format!(
        "https://{host}{port}{}",
        url.path().trim_end_matches('/')
    ))
}

/// The ARN of an `awssns://` URL.
fn topic_arn(url: &Url) -> Result<String> {
    pubsub_core::resource_name(url)
        .map(|n| n.trim_start_matches('/').to_owned())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            Error::invalid_argument(
                "an awssns:// URL puts the topic ARN in its path, as in \
                 awssns:///arn:aws:sns:us-east-2:123456789012:orders",
            )
        })
}

fn unknown(scheme: &str, what: &str, key: &str, known: &str) -> Error {
    Error::invalid_argument(format!(
        "unknown {scheme}:// {what} URL parameter {key:?}; known: region, endpoint, profile, \
         fips, dualstack, anonymous, role, awssdk, hostname_immutable{known}"
    ))
}

/// The AWS parameters of a topic URL.
fn topic_params(url: &Url) -> Result<AwsParams> {
    let mut params = AwsParams::default();
    for (k, v) in query_pairs(url) {
        if !params.take(&k, &v)? {
            return Err(unknown(url.scheme(), "topic", &k, ""));
        }
    }
    Ok(params)
}

/// The AWS parameters and subscription config of a subscription URL.
fn subscription_params(url: &Url) -> Result<(AwsParams, SubscriptionConfig)> {
    let mut params = AwsParams::default();
    let mut config = SubscriptionConfig::default();
    for (k, v) in query_pairs(url) {
        match k.as_str() {
            "raw" => config.raw = parse_bool(&k, &v)?,
            "snstopicarn" => {
                names::sns_topic_name(&v)?;
                config.sns_topic_arn = Some(v);
            }
            "nacklazy" => config.nack_lazy = parse_bool(&k, &v)?,
            "waittime" => {
                let d = parse_duration(&v)?;
                if d > Duration::from_secs(20) {
                    return Err(Error::invalid_argument(format!(
                        "waittime is at most 20s, not {v:?}"
                    )));
                }
                config.wait_time = d;
            }
            _ => {
                if !params.take(&k, &v)? {
                    return Err(unknown(
                        SQS_SCHEME,
                        "subscription",
                        &k,
                        ", raw, snstopicarn, nacklazy, waittime",
                    ));
                }
            }
        }
    }
    Ok((params, config))
}

#[async_trait]
impl Opener for AwsOpener {
    fn url_forms(&self, scheme: &str) -> &'static [&'static str] {
        if scheme.eq_ignore_ascii_case(SQS_SCHEME) {
            &[
                "awssqs://HOST/ACCOUNT/QUEUE[?region=R&endpoint=URL&profile=P]  (topic: sends straight to the queue)",
                "awssqs://HOST/ACCOUNT/QUEUE[?raw=BOOL&nacklazy=BOOL&waittime=DURATION&...]  (subscription)",
            ]
        } else {
            &["awssns:///arn:aws:sns:REGION:ACCOUNT:TOPIC[?region=R&endpoint=URL&profile=P]  (topic)"]
        }
    }

    async fn open_topic(&self, url: &Url) -> Result<Topic> {
        let params = topic_params(url)?;
        match url.scheme() {
            SNS_SCHEME => {
                let arn = topic_arn(url)?;
                names::sns_topic_name(&arn)?;
                let clients = self.clients(&params, names::sns_region(&arn)).await?;
                open_sns_topic(
                    clients.sns,
                    &arn,
                    TopicConfig::default(),
                    TopicOptions::default(),
                )
            }
            SQS_SCHEME => {
                let q = queue_url(url)?;
                names::sqs_queue_name(&q)?;
                let clients = self
                    .clients(&params, names::sqs_region(&q).as_deref())
                    .await?;
                open_sqs_topic(
                    clients.sqs,
                    &q,
                    TopicConfig::default(),
                    TopicOptions::default(),
                )
            }
            other => Err(Error::invalid_argument(format!(
                "the AWS driver opens awssns:// and awssqs:// topics, not {other}://"
            ))),
        }
    }

    async fn open_subscription(&self, url: &Url) -> Result<Subscription> {
        if url.scheme() != SQS_SCHEME {
            return Err(Error::invalid_argument(format!(
                "subscriptions are SQS queues (awssqs://HOST/ACCOUNT/QUEUE), not {}://",
                url.scheme()
            )));
        }
        let (params, config) = subscription_params(url)?;
        let q = queue_url(url)?;
        names::sqs_queue_name(&q)?;
        let clients = self
            .clients(&params, names::sqs_region(&q).as_deref())
            .await?;
        open_subscription(clients.sqs, &q, config, SubscriptionOptions::default()).await
    }
}

/// Registers `awssns://` and `awssqs://` with `registry`, building clients
/// from the standard AWS environment on first use.
pub fn register(registry: &Registry) {
    let opener = Arc::new(AwsOpener::default());
    registry.register(SNS_SCHEME, SharedOpener(opener.clone()));
    registry.register(SQS_SCHEME, SharedOpener(opener));
}

/// One opener registered under both schemes, so they share clients.
#[derive(Debug)]
struct SharedOpener(Arc<AwsOpener>);

#[async_trait]
impl Opener for SharedOpener {
    async fn open_topic(&self, url: &Url) -> Result<Topic> {
        self.0.open_topic(url).await
    }

    async fn open_subscription(&self, url: &Url) -> Result<Subscription> {
        self.0.open_subscription(url).await
    }

    fn url_forms(&self, scheme: &str) -> &'static [&'static str] {
        self.0.url_forms(scheme)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pubsub_core::ErrorKind;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn url_forms_as_the_go_cdk() {
        assert_eq!(
            topic_arn(&url("awssns:///arn:aws:sns:us-east-2:123456789012:orders")).unwrap(),
            "arn:aws:sns:us-east-2:123456789012:orders"
        );
        assert_eq!(
            queue_url(&url(
                "awssqs://sqs.us-east-2.amazonaws.com/123456789012/jobs"
            ))
            .unwrap(),
            "https://sqs.us-east-2.amazonaws.com/123456789012/jobs"
        );
        assert_eq!(
            queue_url(&url("awssqs://127.0.0.1:5000/123456789012/q?endpoint=x")).unwrap(),
            "https://127.0.0.1:5000/123456789012/q"
        );
        assert!(topic_arn(&url("awssns://")).is_err());
    }

    #[test]
    fn url_parameters_as_the_go_cdk() {
        let (p, c) = subscription_params(&url(
            "awssqs://h/1/q?region=eu-west-1&endpoint=http://127.0.0.1:5000&raw=true\
             &nacklazy=1&waittime=500ms&snstopicarn=arn:aws:sns:eu-west-1:1:t&awssdk=v2",
        ))
        .unwrap();
        assert_eq!(p.region.as_deref(), Some("eu-west-1"));
        assert_eq!(p.endpoint.as_deref(), Some("http://127.0.0.1:5000"));
        assert!(c.raw && c.nack_lazy);
        assert_eq!(c.wait_time, Duration::from_millis(500));
        assert_eq!(
            c.sns_topic_arn.as_deref(),
            Some("arn:aws:sns:eu-west-1:1:t")
        );
        let p = topic_params(&url("awssns:///arn?profile=dev&fips=true")).unwrap();
        assert_eq!(p.profile.as_deref(), Some("dev"));
        assert!(p.fips);
        for bad in [
            "awssqs://h/1/q?raw=maybe",
            "awssqs://h/1/q?waittime=21s",
            "awssqs://h/1/q?waittime=soon",
            "awssqs://h/1/q?snstopicarn=nope",
            "awssqs://h/1/q?rate_limiter_capacity=5",
            "awssqs://h/1/q?role=admin",
            "awssqs://h/1/q?color=blue",
        ] {
            let e = subscription_params(&url(bad)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}");
        }
        for bad in ["awssns:///arn?raw=true", "awssqs://h/1/q?nacklazy=true"] {
            let e = topic_params(&url(bad)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}");
        }
    }
}
