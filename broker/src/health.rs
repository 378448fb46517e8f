//! `isomesh-broker health`: connects to a broker, waits for CONNACK, disconnects. Exit code 0
//! means it accepts MQTT clients; made for container HEALTHCHECKs (no curl in a scratch image).

use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet};
use std::time::Duration;

/// Checks that an MQTT broker at `host:port` accepts a connection within `timeout`.
pub async fn check(host: &str, port: u16, timeout: Duration) -> Result<(), String> {
    let id = format!("isomesh-health-{}", std::process::id());
    let mut options = MqttOptions::new(id, host, port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 4);
    let connected = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(ConnectionError::Io(e)) => {
                    return Err(format!("cannot reach {host}:{port}: {e}"))
                }
                Err(e) => return Err(format!("{host}:{port} refused the MQTT connection: {e}")),
            }
        }
    };
    let result = match tokio::time::timeout(timeout, connected).await {
        Ok(result) => result,
        Err(_) => Err(format!("no CONNACK from {host}:{port} within {timeout:?}")),
    };
    let _ = client.try_disconnect();
    result
}
