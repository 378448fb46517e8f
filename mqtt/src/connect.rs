//! A short-lived MQTT 5 client for one run of an `isomesh` command: connected, or an error that
//! says what to check (is the broker running, does it want a login).

use crate::login::{BrokerAddress, Login};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use std::time::Duration;

/// A unique client id for one run of the tool.
pub fn client_id(command: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("isomesh-{command}-{}-{nanos:x}", std::process::id())
}

/// Connects a clean-session MQTT 5 client and waits for the broker's CONNACK.
pub async fn connect(broker: &str, id: &str) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let address = BrokerAddress::parse(broker)?;
    let mut options = address.options(id, &Login::from_env(), None)?;
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(Some(256 << 20));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let connected = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), connected).await {
        Ok(Ok(())) => Ok((client, eventloop)),
        Ok(Err(e)) => anyhow::bail!(
            "cannot connect to the broker at {}: {e}\nIs it running (`isomesh-broker --listen {}:{}`)? If it asks for a login, give one in the URL (mqtt://USER:PASSWORD@HOST:PORT) or in $ISOMESH_USERNAME and $ISOMESH_PASSWORD.",
            address.display(),
            address.host,
            address.port
        ),
        Err(_) => anyhow::bail!(
            "no answer from the broker at {} within 10 s",
            address.display()
        ),
    }
}
