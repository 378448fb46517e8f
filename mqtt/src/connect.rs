//! A short-lived MQTT 5 client for one run of an `isomesh` command: connected, or an error that
//! says what to check (is the broker running, does it want a login).

use crate::login::{BrokerAddress, Login};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use std::time::Duration;

/// A unique client id for one run of the tool, logged in as `$ISOMESH_USERNAME` if set; prefer
/// [`client_id_at`] when there is a broker URL, which may carry the username.
pub fn client_id(command: &str) -> String {
    client_id_as(Login::from_env().username.as_deref(), command)
}

/// A unique client id for one run of the tool against `broker`: owned by the username that
/// will log in (the URL's, else `$ISOMESH_USERNAME`), as isomesh-broker requires (a client id
/// belongs to one account: `{username}:...`). With a list of members, the first one's
/// username counts (a cluster's members share their accounts). The replies topic `isomesh/replies/{client id}`
/// is then readable through deploy/acl.conf's `pattern read isomesh/replies/%c`.
pub fn client_id_at(broker: &str, command: &str) -> String {
    let from_url = BrokerAddress::parse_members(broker)
        .ok()
        .and_then(|members| members.into_iter().next())
        .and_then(|a| a.username);
    let username = from_url.or(Login::from_env().username);
    client_id_as(username.as_deref(), command)
}

/// `{username}:{command}-{pid}-{nanos}` with a username, `isomesh-{command}-{pid}-{nanos}`
/// without one (an anonymous client: no account may own it).
pub fn client_id_as(username: Option<&str>, command: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let pid = std::process::id();
    match username {
        Some(user) => format!("{user}:{command}-{pid}-{nanos:x}"),
        None => format!("isomesh-{command}-{pid}-{nanos:x}"),
    }
}

/// Connects a clean-session MQTT 5 client and waits for the broker's CONNACK. `broker` may
/// list the members of a clustered broker (`URL,URL,...`): they are tried in turn, and the
/// first that accepts is used.
pub async fn connect(broker: &str, id: &str) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let members = BrokerAddress::parse_members(broker)?;
    let mut failures = Vec::new();
    for address in &members {
        match connect_to(address, id).await {
            Ok(connected) => return Ok(connected),
            Err(e) => failures.push(e),
        }
    }
    // Every member failed: one broker's error says what to check on it.
    match members.as_slice() {
        [address] => anyhow::bail!(
            "{}\nIs it running (`isomesh-broker --listen {}:{}`)? If it asks for a login, give one in the URL (mqtt://USER:PASSWORD@HOST:PORT) or in $ISOMESH_USERNAME and $ISOMESH_PASSWORD.",
            failures[0],
            address.host,
            address.port
        ),
        _ => anyhow::bail!(
            "no member of the broker accepted a connection:\n  {}\nAre they running? If they ask for a login, give one in the URLs or in $ISOMESH_USERNAME and $ISOMESH_PASSWORD.",
            failures.join("\n  ")
        ),
    }
}

/// One member: connected, or why not in a sentence.
async fn connect_to(address: &BrokerAddress, id: &str) -> Result<(AsyncClient, EventLoop), String> {
    let mut options = address
        .options(id, &Login::from_env(), None)
        .map_err(|e| e.to_string())?;
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(Some(256 << 20));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    first_connack(&mut eventloop, address).await?;
    Ok((client, eventloop))
}

/// Polls `eventloop` (its options pointing at `address`) until the broker's CONNACK, for at
/// most 10 s: `Ok` once connected, else why not, in a sentence naming the member.
pub async fn first_connack(
    eventloop: &mut EventLoop,
    address: &BrokerAddress,
) -> Result<(), String> {
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
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!(
            "cannot connect to the broker at {}: {e}",
            address.display()
        )),
        Err(_) => Err(format!(
            "no answer from the broker at {} within 10 s",
            address.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_belong_to_the_username_that_logs_in() {
        assert!(client_id_as(Some("camera"), "classify").starts_with("camera:classify-"));
        assert!(client_id_as(None, "status").starts_with("isomesh-status-"));
        let id = client_id_at("mqtt://operator:pw@127.0.0.1:1883", "status");
        assert!(id.starts_with("operator:status-"), "{id}");
    }
}
