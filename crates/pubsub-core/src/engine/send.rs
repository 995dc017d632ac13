//! A topic's batches, handed to its driver.

use std::sync::Arc;

use tracing::Instrument;

use super::batcher::BatchHandler;
use super::with_context;
use crate::driver::{self, BatchError, OutgoingMessage};
use crate::error::Result;
use crate::metric::CallMetrics;

/// Hands each batch of a topic's batcher to the driver.
pub(crate) struct SendHandler {
    pub(crate) driver: Arc<dyn driver::Topic>,
    pub(crate) metrics: CallMetrics,
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
        let started = self.metrics.start();
        let r = d.send_batch(batch).instrument(span).await;
        self.metrics.record(batch.len(), started);
        r.map_err(|e| with_context(e, d.driver_name(), d.resource(), "send"))
    }

    fn retrying(&self) {
        self.metrics.retries.increment(1);
    }
}
