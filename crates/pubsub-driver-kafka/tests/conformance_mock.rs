//! The conformance suite against librdkafka's in-process mock cluster.

mod common;

type MockKafka = common::On<common::MockKind>;

pubsub_conformance::conformance_tests!(MockKafka, nack, fan_out, max_message_bytes, ordering_keys);
