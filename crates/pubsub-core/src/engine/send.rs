//! A topic's batches, handed to its driver.

use std::sync::Arc;

use tracing::Instrument;

use super::batcher::BatchHandler;
use super::with_context;
use crate::driver::{self, BatchError, OutgoingMessage};
use crate::error::Result;

/// Hands each batch of a topic's batcher to the driver.
pub(crate) struct SendHandler {
    pub(crate) driver: Arc<dyn driver::Topic>,
}

impl BatchHandler<OutgoingMessage> for SendHandler {
    async fn handle(&self, batch: &[OutgoingMessage]) -> Result<(), BatchError> {
        let d = &*self.driver;
        let span = tracing::debug_span!(
            "send_batch",
            driver = d.driver_name(),
            resource = d.resource(),
            messages = batch.len()
        );
        d.send_batch(batch)
            .instrument(span)
            .await
            .map_err(|e| with_context(e, d.driver_name(), d.resource(), "send"))
    }
}
