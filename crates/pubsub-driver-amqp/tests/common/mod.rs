//! Shared by the RabbitMQ tests: the server, and declaring test resources.

#![allow(dead_code)]

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use pubsub_driver_amqp::{lapin, Connector};

pub const HOW_TO_START: &str =
    "start RabbitMQ with `scripts/backends up` (or set RABBIT_SERVER_URL to a running server)";

pub fn server_url() -> String {
    std::env::var("RABBIT_SERVER_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

pub struct Admin {
    pub conn: Connection,
    pub channel: Channel,
    pub connector: Connector,
}

impl Admin {
    pub async fn connect() -> Result<Admin, String> {
        let url = server_url();
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .map_err(|e| format!("cannot connect to RabbitMQ ({e}); {HOW_TO_START}"))?;
        let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
        let connector = Connector::new(&url).map_err(|e| e.to_string())?;
        Ok(Admin {
            conn,
            channel,
            connector,
        })
    }

    /// A durable fanout exchange.
    pub async fn exchange(&self, name: &str) -> lapin::Result<()> {
        self.channel
            .exchange_declare(
                name.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
    }

    /// A durable queue bound to `exchange`, which RabbitMQ deletes after
    /// ten idle minutes so test runs leave nothing behind.
    pub async fn queue(&self, exchange: &str, name: &str) -> lapin::Result<()> {
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongInt(600_000));
        self.channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await?;
        self.channel
            .queue_bind(
                name.into(),
                exchange.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }
}
