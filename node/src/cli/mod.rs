//! The subcommands of the `isomesh` tool. Each speaks to the mesh through the broker only, like
//! any other MQTT client would.

pub mod bench;
pub mod bench_mesh;
pub mod bench_offload;
pub mod bench_swap;
pub mod camera;
pub mod classify;
pub mod compile;
pub mod mesh;
pub mod rollout;
pub mod sign;
pub mod status;

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use std::time::Duration;

/// Reads a module file that is about to be signed, refusing one that is not WebAssembly.
pub fn read_module(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    let module = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if !module.starts_with(b"\0asm") {
        anyhow::bail!(
            "{} is not a WebAssembly module (it does not start with \\0asm)",
            path.display()
        );
    }
    Ok(module)
}

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
    let address = crate::login::BrokerAddress::parse(broker).map_err(anyhow::Error::msg)?;
    let mut options = address
        .options(id, &crate::login::Login::from_env(), None)
        .map_err(anyhow::Error::msg)?;
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
