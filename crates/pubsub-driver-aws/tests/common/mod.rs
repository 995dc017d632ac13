//! Shared by the SNS and SQS tests: where they run (moto, or a live account
//! when the environment names one) and the admin calls they make. Both go
//! through this same code; they differ only in endpoint and credentials.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use aws_sdk_sqs::types::QueueAttributeName;
use pubsub_driver_aws::{aws_sdk_sqs, AwsParams, Clients};

/// Where `scripts/backends up` starts moto.
pub const MOTO: &str = "127.0.0.1:5000";

/// How to start moto, for the message of a test that cannot reach it.
pub const HOW: &str = "start moto (scripts/backends up, or `moto_server -H 127.0.0.1 -p 5000` \
     from PyPI's moto[server]), or set PUBSUB_CONFORMANCE_AWS_REGION to run against a live \
     account with credentials from the standard chain";

/// The live region, when the environment names one.
pub fn live_region() -> Option<String> {
    std::env::var("PUBSUB_CONFORMANCE_AWS_REGION")
        .ok()
        .filter(|r| !r.is_empty())
}

/// The AWS parameters of the target: moto's endpoint and region, or the
/// live region.
pub fn params() -> AwsParams {
    match live_region() {
        Some(region) => AwsParams::default().with_region(region),
        None => AwsParams::default()
            .with_region("us-east-1")
            .with_endpoint(format!("http://{MOTO}")),
    }
}

/// Empties moto once a test binary, so each suite starts on a fresh server
/// (moto slows as its queues fill).
fn reset_moto_once() -> Result<(), String> {
    static RESET: OnceLock<Result<(), String>> = OnceLock::new();
    RESET
        .get_or_init(|| {
            let mut s = std::net::TcpStream::connect(MOTO)
                .map_err(|e| format!("nothing answers at {MOTO} ({e}); {HOW}"))?;
            s.set_read_timeout(Some(Duration::from_secs(30))).ok();
            write!(
                s,
                "POST /moto-api/reset HTTP/1.1\r\nHost: {MOTO}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .map_err(|e| e.to_string())?;
            let mut reply = String::new();
            let _ = s.read_to_string(&mut reply);
            if reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200") {
                Ok(())
            } else {
                Err(format!("moto's reset failed: {reply:.200}"))
            }
        })
        .clone()
}

/// The SDK configuration for `params`.
async fn sdk_config(params: &AwsParams) -> aws_config::SdkConfig {
    let config = params.load(None).await;
    if live_region().is_some() {
        return config;
    }
    // moto takes any credentials; fixed ones keep the run from depending on
    // the machine's.
    config
        .to_builder()
        .credentials_provider(aws_sdk_sqs::config::SharedCredentialsProvider::new(
            aws_sdk_sqs::config::Credentials::new("testing", "testing", None, None, "moto"),
        ))
        .build()
}

/// A connection to the target: the driver's clients, the account, and what
/// the tests created there.
pub struct Backend {
    pub params: AwsParams,
    pub clients: Clients,
    pub region: String,
    pub account: String,
    created: Mutex<Created>,
}

#[derive(Default)]
struct Created {
    topics: Vec<String>,
    queues: Vec<String>,
}

impl Backend {
    /// Connects to the target, failing with how to start moto when it does
    /// not answer.
    pub async fn connect() -> Result<Self, String> {
        Self::connect_with(params()).await
    }

    /// Connects with `params` (the fault tests point the endpoint at a
    /// proxy).
    pub async fn connect_with(params: AwsParams) -> Result<Self, String> {
        if live_region().is_none() {
            tokio::task::spawn_blocking(reset_moto_once)
                .await
                .map_err(|e| e.to_string())??;
        }
        let config = sdk_config(&params).await;
        let region = config
            .region()
            .map(|r| r.to_string())
            .ok_or_else(|| format!("no AWS region configured; {HOW}"))?;
        let clients = Clients::from_config(&config);
        let me = aws_sdk_sts::Client::new(&config)
            .get_caller_identity()
            .send()
            .await
            .map_err(|e| {
                format!(
                    "cannot reach AWS at {:?}: {}; {HOW}",
                    params.endpoint,
                    aws_sdk_sqs::error::DisplayErrorContext(&e)
                )
            })?;
        let account = me.account().unwrap_or("123456789012").to_owned();
        Ok(Backend {
            params,
            clients,
            region,
            account,
            created: Mutex::default(),
        })
    }

    /// The ARN a topic of this name has (or would have).
    pub fn topic_arn(&self, name: &str) -> String {
        format!("arn:aws:sns:{}:{}:{name}", self.region, self.account)
    }

    /// The URL a queue of this name has (or would have).
    pub fn queue_url(&self, name: &str) -> String {
        format!(
            "https://sqs.{}.amazonaws.com/{}/{name}",
            self.region, self.account
        )
    }

    /// Creates an SNS topic (FIFO if its name ends `.fifo`).
    pub async fn create_topic(&self, name: &str) -> Result<String, String> {
        let mut req = self.clients.sns.create_topic().name(name);
        if name.ends_with(".fifo") {
            req = req.attributes("FifoTopic", "true");
        }
        let out = req.send().await.map_err(|e| {
            format!(
                "create topic {name}: {}",
                aws_sdk_sqs::error::DisplayErrorContext(&e)
            )
        })?;
        let arn = out.topic_arn().unwrap_or_default().to_owned();
        self.created.lock().unwrap().topics.push(arn.clone());
        Ok(arn)
    }

    /// Creates an SQS queue with this visibility timeout (FIFO if its name
    /// ends `.fifo`), returning its URL.
    pub async fn create_queue(&self, name: &str, visibility: Duration) -> Result<String, String> {
        let secs = visibility.as_secs() + u64::from(visibility.subsec_nanos() > 0);
        let mut req = self
            .clients
            .sqs
            .create_queue()
            .queue_name(name)
            .attributes(QueueAttributeName::VisibilityTimeout, secs.to_string());
        if name.ends_with(".fifo") {
            req = req.attributes(QueueAttributeName::FifoQueue, "true");
        }
        let out = req.send().await.map_err(|e| {
            format!(
                "create queue {name}: {}",
                aws_sdk_sqs::error::DisplayErrorContext(&e)
            )
        })?;
        let url = out.queue_url().unwrap_or_default().to_owned();
        self.created.lock().unwrap().queues.push(url.clone());
        Ok(url)
    }

    /// Sets a queue's visibility timeout.
    pub async fn set_visibility(
        &self,
        queue_url: &str,
        visibility: Duration,
    ) -> Result<(), String> {
        let secs = visibility.as_secs() + u64::from(visibility.subsec_nanos() > 0);
        self.clients
            .sqs
            .set_queue_attributes()
            .queue_url(queue_url)
            .attributes(QueueAttributeName::VisibilityTimeout, secs.to_string())
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                format!(
                    "set visibility of {queue_url}: {}",
                    aws_sdk_sqs::error::DisplayErrorContext(&e)
                )
            })
    }

    /// Subscribes a queue to a topic, with raw message delivery or not, and
    /// lets the topic send to the queue (a live account needs the policy).
    pub async fn subscribe(
        &self,
        topic_arn: &str,
        queue_url: &str,
        raw: bool,
    ) -> Result<(), String> {
        let sqs = &self.clients.sqs;
        let attrs = sqs
            .get_queue_attributes()
            .queue_url(queue_url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| {
                format!(
                    "queue ARN of {queue_url}: {}",
                    aws_sdk_sqs::error::DisplayErrorContext(&e)
                )
            })?;
        let queue_arn = attrs
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn))
            .cloned()
            .ok_or("queue has no ARN")?;
        let policy = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Allow",
                "Principal": {"Service": "sns.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}}
            }]
        });
        sqs.set_queue_attributes()
            .queue_url(queue_url)
            .attributes(QueueAttributeName::Policy, policy.to_string())
            .send()
            .await
            .map_err(|e| {
                format!(
                    "queue policy of {queue_url}: {}",
                    aws_sdk_sqs::error::DisplayErrorContext(&e)
                )
            })?;
        self.clients
            .sns
            .subscribe()
            .topic_arn(topic_arn)
            .protocol("sqs")
            .endpoint(queue_arn)
            .attributes("RawMessageDelivery", if raw { "true" } else { "false" })
            .send()
            .await
            .map_err(|e| {
                format!(
                    "subscribe {queue_url} to {topic_arn}: {}",
                    aws_sdk_sqs::error::DisplayErrorContext(&e)
                )
            })?;
        Ok(())
    }
}

impl Drop for Backend {
    /// Deletes what the tests created, on a thread of its own because a
    /// test's runtime may be ending.
    fn drop(&mut self) {
        let created = std::mem::take(&mut *self.created.lock().unwrap());
        if created.topics.is_empty() && created.queues.is_empty() {
            return;
        }
        let params = self.params.clone();
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                // Clients of their own: the test's are tied to its runtime.
                let clients = Clients::from_config(&sdk_config(&params).await);
                for arn in created.topics {
                    if let Err(e) = clients.sns.delete_topic().topic_arn(&arn).send().await {
                        eprintln!("cleanup of {arn} failed: {e}");
                    }
                }
                for url in created.queues {
                    if let Err(e) = clients.sqs.delete_queue().queue_url(&url).send().await {
                        eprintln!("cleanup of {url} failed: {e}");
                    }
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Names to resources, for harnesses that open by name.
#[derive(Default)]
pub struct Names(Mutex<HashMap<String, String>>);

impl Names {
    pub fn insert(&self, name: &str, value: String) {
        self.0.lock().unwrap().insert(name.to_owned(), value);
    }

    pub fn get(&self, name: &str) -> Option<String> {
        self.0.lock().unwrap().get(name).cloned()
    }
}
