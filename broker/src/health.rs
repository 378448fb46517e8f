//! `isomesh-broker health`: the check a container's HEALTHCHECK runs (a `FROM scratch` image has
//! no curl and no shell). It speaks just enough MQTT 3.1.1 by hand to prove that a broker serves
//! clients, not merely that its port is open:
//!
//! 1. TCP connect to `HOST:PORT`;
//! 2. CONNECT (clean session, keepalive 30 s) and wait for a CONNACK that accepts it (or that
//!    refuses the anonymous login: a broker with logins on is alive, and the check stops there);
//! 3. PINGREQ and wait for PINGRESP (the broker's session loop is alive);
//! 4. DISCONNECT, so no Last Will fires and the broker logs a clean goodbye.
//!
//! Any broker works (isomesh-broker, Mosquitto, EMQX). Hand-written packets keep the check free
//! of a client library's reconnect loop and background pings: one attempt, one deadline.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Port used when the broker URL names none (the MQTT default).
pub const DEFAULT_PORT: u16 = 1883;

/// Why a broker is not healthy. Every message names the broker address.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("bad broker URL {url:?}: use mqtt://HOST:PORT (or HOST:PORT)")]
    BadUrl { url: String },
    // `error`, not `source`: the message already says it, so `{:#}` must not repeat it.
    #[error("cannot reach {addr}: {error} (is the broker running and listening there?)")]
    Connect { addr: String, error: std::io::Error },
    #[error("{addr} dropped the connection while waiting for {step}: {error}")]
    Io {
        addr: String,
        step: &'static str,
        error: std::io::Error,
    },
    #[error("{addr} sent no {step} within {timeout:?} (broker hung or overloaded?)")]
    Timeout {
        addr: String,
        step: &'static str,
        timeout: Duration,
    },
    #[error("{addr} does not speak MQTT: expected {step}, got bytes {got:02x?}")]
    Protocol {
        addr: String,
        step: &'static str,
        got: [u8; 2],
    },
    #[error("{addr} refused the MQTT connection: return code {code} ({reason})")]
    Refused {
        addr: String,
        code: u8,
        reason: &'static str,
    },
}

/// A broker address parsed from `mqtt://HOST:PORT`, `tcp://HOST:PORT` or `HOST[:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port, [`DEFAULT_PORT`] when the URL has none.
    pub port: u16,
}

impl BrokerAddr {
    /// Parses a broker URL; a path, credentials or query are refused rather than ignored.
    pub fn parse(url: &str) -> Result<BrokerAddr, HealthError> {
        let bad = || HealthError::BadUrl {
            url: url.to_string(),
        };
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
            .unwrap_or(url);
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() || rest.contains(['/', '@', '?']) {
            return Err(bad());
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            // [::1]:1883 or [::1]
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            match after.strip_prefix(':') {
                Some(port) => (host, port.parse().map_err(|_| bad())?),
                None if after.is_empty() => (host, DEFAULT_PORT),
                None => return Err(bad()),
            }
        } else {
            match rest.split_once(':') {
                Some((host, port)) => (host, port.parse().map_err(|_| bad())?),
                None => (rest, DEFAULT_PORT),
            }
        };
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(BrokerAddr {
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Checks that the broker at `url` accepts an MQTT session and answers a ping, each step
/// within `timeout`.
pub async fn check(url: &str, timeout: Duration) -> Result<BrokerAddr, HealthError> {
    let broker = BrokerAddr::parse(url)?;
    let addr = broker.to_string();
    let within = |step: &'static str| {
        let addr = addr.clone();
        move |_| HealthError::Timeout {
            addr,
            step,
            timeout,
        }
    };
    let mut stream = tokio::time::timeout(
        timeout,
        TcpStream::connect((broker.host.as_str(), broker.port)),
    )
    .await
    .map_err(within("TCP accept"))?
    .map_err(|error| HealthError::Connect {
        addr: addr.clone(),
        error,
    })?;
    let io = |step: &'static str| {
        let addr = addr.clone();
        move |error| HealthError::Io { addr, step, error }
    };

    stream
        .write_all(&connect_packet(&format!(
            "isomesh-health-{}",
            std::process::id()
        )))
        .await
        .map_err(io("CONNACK"))?;
    let mut connack = [0u8; 4];
    tokio::time::timeout(timeout, stream.read_exact(&mut connack))
        .await
        .map_err(within("CONNACK"))?
        .map_err(io("CONNACK"))?;
    if connack[..2] != [0x20, 0x02] {
        return Err(HealthError::Protocol {
            addr,
            step: "CONNACK",
            got: [connack[0], connack[1]],
        });
    }
    // 4 and 5 (bad login, not authorized): a broker that requires logins refused this
    // anonymous check, which proves its MQTT session code is alive.
    if matches!(connack[3], 4 | 5) {
        let _ = stream.shutdown().await;
        return Ok(broker);
    }
    if connack[3] != 0 {
        return Err(HealthError::Refused {
            addr,
            code: connack[3],
            reason: connack_reason(connack[3]),
        });
    }

    stream
        .write_all(&[0xC0, 0x00])
        .await
        .map_err(io("PINGRESP"))?;
    let mut pingresp = [0u8; 2];
    tokio::time::timeout(timeout, stream.read_exact(&mut pingresp))
        .await
        .map_err(within("PINGRESP"))?
        .map_err(io("PINGRESP"))?;
    if pingresp != [0xD0, 0x00] {
        return Err(HealthError::Protocol {
            addr,
            step: "PINGRESP",
            got: pingresp,
        });
    }

    // Best effort: the check has already passed.
    let _ = stream.write_all(&[0xE0, 0x00]).await;
    let _ = stream.shutdown().await;
    Ok(broker)
}

/// An MQTT 3.1.1 CONNECT: clean session, keepalive 30 s, no will, no credentials.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let id = client_id.as_bytes();
    // Client ids here are short ASCII; MQTT caps strings at 65535 bytes anyway.
    let id = &id[..id.len().min(u16::MAX as usize)];
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 30];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id);
    let mut packet = vec![0x10];
    // Remaining length, MQTT variable-length encoding.
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    packet
}

/// The MQTT 3.1.1 meaning of a CONNACK return code.
fn connack_reason(code: u8) -> &'static str {
    match code {
        1 => "unacceptable protocol version",
        2 => "client identifier rejected",
        3 => "server unavailable",
        4 => "bad user name or password",
        5 => "not authorized",
        _ => "unknown return code",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_and_without_scheme_and_port() {
        let parse = |url| BrokerAddr::parse(url).map(|b| b.to_string());
        assert_eq!(
            parse("mqtt://127.0.0.1:1884").ok().as_deref(),
            Some("127.0.0.1:1884")
        );
        assert_eq!(parse("tcp://broker").ok().as_deref(), Some("broker:1883"));
        assert_eq!(parse("broker:7").ok().as_deref(), Some("broker:7"));
        assert_eq!(
            parse("mqtt://[::1]:1883/").ok().as_deref(),
            Some("[::1]:1883")
        );
        for bad in [
            "",
            "mqtt://",
            "mqtt://:1883",
            "mqtt://h:x",
            "mqtt://h:0",
            "mqtt://h/path",
            "mqtt://u@h",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn connect_packet_is_well_formed() {
        let packet = connect_packet("abc");
        assert_eq!(packet[0], 0x10);
        assert_eq!(packet[1] as usize, packet.len() - 2);
        assert_eq!(&packet[2..10], &[0, 4, b'M', b'Q', b'T', b'T', 4, 2]);
        assert_eq!(&packet[packet.len() - 5..], &[0, 3, b'a', b'b', b'c']);
    }
}
