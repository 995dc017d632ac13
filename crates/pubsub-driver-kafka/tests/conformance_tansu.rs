//! The conformance suite against a real Kafka-protocol broker over TCP
//! (tansu, started by `scripts/backends up`).

mod common;

type TansuKafka = common::On<common::TansuKind>;

pubsub_conformance::conformance_tests!(TansuKafka, nack, fan_out, max_message_bytes, ordering_keys);
