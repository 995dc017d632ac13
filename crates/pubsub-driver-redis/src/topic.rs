//! A topic is a stream.

use std::any::Any;
use std::fmt;

use async_trait::async_trait;
use pubsub_core::driver::{self, BatchError, BatchLimits, Capabilities, OutgoingMessage, Sent};
use pubsub_core::{Error, Result};
use redis::Value;

use crate::connection::Connector;
use crate::entry::{self, Fields};
use crate::{error, DEFAULT_MAX_MESSAGE_BYTES, DRIVER};

/// Options of a stream-backed topic.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct TopicConfig {
    /// Trim the stream to about this many entries on each add
    /// (`MAXLEN ~`). Trimmed entries are gone for every group, acked or
    /// not.
    pub max_len: Option<usize>,
    /// Create the stream on the first send if it does not exist; without
    /// it a missing stream fails the send with `NotFound`.
    pub create_stream: bool,
    /// The largest message (body, attributes and ordering key) accepted.
    pub max_message_bytes: usize,
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            max_len: None,
            create_stream: false,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

impl TopicConfig {
    /// Trims the stream to about `n` entries.
    pub fn with_max_len(mut self, n: usize) -> Self {
        self.max_len = Some(n);
        self
    }

    /// Creates the stream on first send.
    pub fn with_create_stream(mut self) -> Self {
        self.create_stream = true;
        self
    }
}

/// The Redis Streams topic driver: `XADD`s each message as one entry, a
/// batch in one pipeline.
///
/// [`pubsub_core::Topic::as_raw`] gives the [`Connector`]. A before-send
/// hook gets the entry's `&mut` [`Fields`]; an after-send hook the entry id
/// (`String`) as [`Sent::raw`] and the `$id` the driver set as
/// [`Sent::id`], the id receivers report unless the before-send hook
/// changed that field.
pub struct RedisTopic {
    connector: Connector,
    stream: String,
    config: TopicConfig,
}

impl RedisTopic {
    /// A topic adding to `stream`. The stream is not checked until the first
    /// send.
    pub fn new(connector: Connector, stream: &str, config: TopicConfig) -> Result<Self> {
        if stream.is_empty() {
            return Err(Error::invalid_argument("a stream name cannot be empty"));
        }
        Ok(RedisTopic {
            connector,
            stream: stream.to_owned(),
            config,
        })
    }

    fn command(&self, m: &OutgoingMessage) -> Result<redis::Cmd> {
        let mut fields: Fields = entry::to_fields(m);
        m.run_before_send(&mut fields)?;
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.stream);
        if !self.config.create_stream {
            cmd.arg("NOMKSTREAM");
        }
        if let Some(n) = self.config.max_len {
            cmd.arg("MAXLEN").arg("~").arg(n);
        }
        cmd.arg("*");
        for (k, v) in &fields {
            cmd.arg(k.as_bytes()).arg(v.as_ref());
        }
        Ok(cmd)
    }
}

/// Runs `m`'s after-send hook on the id Redis gave its entry.
fn accepted(m: &OutgoingMessage, entry: String) -> Result<()> {
    m.run_after_send(|| Sent::new(&entry).with_id(m.unique_id_hex()))
}

impl RedisTopic {
    /// What one `XADD` reply means for its message.
    fn outcome(&self, m: &OutgoingMessage, reply: Value) -> Result<()> {
        match reply {
            Value::BulkString(_) if !m.has_after_send() => Ok(()),
            Value::BulkString(id) => accepted(m, String::from_utf8_lossy(&id).into_owned()),
            Value::SimpleString(id) => accepted(m, id),
            Value::Nil => Err(Error::not_found(format!(
                "stream {:?} does not exist (create it, or set TopicConfig::create_stream)",
                self.stream
            ))
            .with_context("driver", DRIVER)),
            Value::ServerError(e) => Err(error::map(e.into(), "XADD")),
            _ => Err(Error::internal("unexpected reply from Redis to XADD")),
        }
    }
}

impl fmt::Debug for RedisTopic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTopic")
            .field("stream", &self.stream)
            .field("server", &self.connector.server())
            .finish()
    }
}

#[async_trait]
impl driver::Topic for RedisTopic {
    fn driver_name(&self) -> &'static str {
        DRIVER
    }

    fn resource(&self) -> &str {
        &self.stream
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::default();
        c.fan_out = true;
        c.max_message_bytes = Some(self.config.max_message_bytes);
        // One pipeline a batch: one round trip, and Redis runs the adds
        // back to back.
        c.send_batching = BatchLimits::new(1000, 4).with_max_bytes(64 * 1024 * 1024);
        c
    }

    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<(), BatchError> {
        if let [m] = batch {
            // A lone send (the common case with few senders) is one
            // command, not a pipeline of one.
            let cmd = self.command(m)?;
            let mut conn = self.connector.connection()?;
            let reply: Value = cmd
                .query_async(&mut conn)
                .await
                .map_err(|e| error::map(e, "XADD"))?;
            return self.outcome(m, reply).map_err(Into::into);
        }
        let mut failed = Vec::new();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut sent = Vec::with_capacity(batch.len());
        for (i, m) in batch.iter().enumerate() {
            match self.command(m) {
                Ok(cmd) => {
                    pipe.add_command(cmd);
                    sent.push(i);
                }
                Err(e) => failed.push((i, e)),
            }
        }
        if !sent.is_empty() {
            let mut conn = self.connector.connection()?;
            let replies: Vec<Value> = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| error::map(e, "XADD"))?;
            if replies.len() != sent.len() {
                return Err(Error::internal("Redis answered a pipeline short").into());
            }
            for (i, reply) in sent.into_iter().zip(replies) {
                if let Err(e) = self.outcome(&batch[i], reply) {
                    failed.push((i, e));
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            failed.sort_by_key(|(i, _)| *i);
            Err(BatchError::Items(failed))
        }
    }

    fn raw(&self) -> Option<&(dyn Any + Send + Sync)> {
        Some(&self.connector)
    }
}
