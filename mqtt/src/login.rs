//! Where the broker is and how to log in to it, for nodes and for every `isomesh` command.
//!
//! A broker URL is `mqtt://[USER[:PASSWORD]@]HOST[:PORT]` (`tcp://` or a bare `HOST:PORT` also
//! work; the port defaults to 1883), or `mqtts://...` for MQTT over TLS (port 8883 by default).
//! Credentials in the URL win; otherwise they come from the node's `--username`/`--password`
//! flags or, for both nodes and commands, from `$ISOMESH_USERNAME` and `$ISOMESH_PASSWORD` (the
//! way to keep a password off command lines). TLS trusts the CA certificates of `--ca-file`
//! (`$ISOMESH_CA_FILE`) and presents `--cert-file`/`--key-file` (`$ISOMESH_CERT_FILE`,
//! `$ISOMESH_KEY_FILE`) when the broker asks for a client certificate.
//!
//! Several URLs separated by commas name the members of one clustered broker
//! ([`BrokerAddress::parse_members`]): a client connects to the first and moves to the next when
//! its member goes ([`crate::failover`]). A password with a comma in it cannot go in such a
//! list; give it in `--password` or `$ISOMESH_PASSWORD`.

use rumqttc::v5::MqttOptions;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::PathBuf;
use std::sync::Arc;

/// How to write a broker URL, for errors.
const USAGE: &str = "use mqtt://[USER[:PASSWORD]@]HOST[:PORT], or mqtts:// for TLS";

/// Why a broker URL or a login cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("unsupported broker URL {0:?}: {USAGE}")]
    Unsupported(String),
    #[error("bad port in broker URL {0:?}: {USAGE}")]
    BadPort(String),
    #[error("no host in broker URL {0:?}: {USAGE}")]
    NoHost(String),
    /// A list of members with nothing between two commas.
    #[error("empty member {position} in the broker list {list:?}: separate members' URLs with one comma")]
    EmptyMember { position: usize, list: String },
    /// The TLS files are missing, unreadable or do not fit together.
    #[error("{0}")]
    Tls(String),
}

/// How to log in: account and TLS files, each optional.
#[derive(Debug, Clone, Default)]
pub struct Login {
    pub username: Option<String>,
    pub password: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl Login {
    /// `$ISOMESH_USERNAME`, `$ISOMESH_PASSWORD`, `$ISOMESH_CA_FILE`, `$ISOMESH_CERT_FILE` and
    /// `$ISOMESH_KEY_FILE`, for commands that take no such flags.
    pub fn from_env() -> Login {
        let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        Login {
            username: var("ISOMESH_USERNAME"),
            password: var("ISOMESH_PASSWORD"),
            ca_file: var("ISOMESH_CA_FILE").map(PathBuf::from),
            cert_file: var("ISOMESH_CERT_FILE").map(PathBuf::from),
            key_file: var("ISOMESH_KEY_FILE").map(PathBuf::from),
        }
    }
}

/// A parsed broker URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// `mqtts://`: MQTT over TLS.
    pub tls: bool,
}

impl BrokerAddress {
    pub fn parse(url: &str) -> Result<BrokerAddress, LoginError> {
        let (tls, rest) = match url
            .strip_prefix("mqtts://")
            .or_else(|| url.strip_prefix("ssl://"))
        {
            Some(rest) => (true, rest),
            None => (
                false,
                url.strip_prefix("mqtt://")
                    .or_else(|| url.strip_prefix("tcp://"))
                    .unwrap_or(url),
            ),
        };
        if rest.contains("://") {
            return Err(LoginError::Unsupported(url.to_string()));
        }
        let rest = rest.trim_end_matches('/');
        let (login, rest) = match rest.rsplit_once('@') {
            Some((login, rest)) => (Some(login), rest),
            None => (None, rest),
        };
        let (username, password) = match login.map(|l| l.split_once(':')) {
            None => (None, None),
            Some(None) => (login.map(String::from), None),
            Some(Some((user, password))) => (Some(user.to_string()), Some(password.to_string())),
        };
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => {
                let port = port
                    .parse::<u16>()
                    .map_err(|_| LoginError::BadPort(url.to_string()))?;
                (host, port)
            }
            None => (rest, if tls { 8883 } else { 1883 }),
        };
        if host.is_empty() {
            return Err(LoginError::NoHost(url.to_string()));
        }
        Ok(BrokerAddress {
            host: host.to_string(),
            port,
            username: username.filter(|u| !u.is_empty()),
            password,
            tls,
        })
    }

    /// The members of a broker given as a comma-separated list of URLs (one URL is a broker of
    /// one member). An error names the member at fault.
    pub fn parse_members(list: &str) -> Result<Vec<BrokerAddress>, LoginError> {
        list.split(',')
            .map(str::trim)
            .enumerate()
            .map(|(index, url)| {
                if url.is_empty() {
                    return Err(LoginError::EmptyMember {
                        position: index + 1,
                        list: redact_list(list),
                    });
                }
                BrokerAddress::parse(url)
            })
            .collect()
    }

    /// The URL without its password, for logs and error messages.
    pub fn display(&self) -> String {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        match &self.username {
            Some(user) => format!("{scheme}://{user}@{}:{}", self.host, self.port),
            None => format!("{scheme}://{}:{}", self.host, self.port),
        }
    }

    /// MQTT options for `client_id` at this address, logged in with the URL's credentials, else
    /// `login`'s, else none; over TLS for `mqtts://`. A password without a username logs in as
    /// `default_user` (a node's id).
    pub fn options(
        &self,
        client_id: &str,
        login: &Login,
        default_user: Option<&str>,
    ) -> Result<MqttOptions, LoginError> {
        let mut options = MqttOptions::new(client_id, self.host.clone(), self.port);
        let password = self.password.as_deref().or(login.password.as_deref());
        let username = self
            .username
            .as_deref()
            .or(login.username.as_deref())
            .or(password.and(default_user));
        if let Some(username) = username {
            options.set_credentials(username, password.unwrap_or_default());
        }
        if self.tls {
            let config = tls_config(login).map_err(LoginError::Tls)?;
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
            ));
        } else if login.ca_file.is_some() || login.cert_file.is_some() {
            tracing::warn!(broker = %self.display(), "TLS files given for a plain mqtt:// broker URL; use mqtts:// to connect over TLS");
        }
        Ok(options)
    }
}

/// A broker URL or list of members fit for logs: each member without its password (as given
/// when it does not parse).
pub fn redact_list(list: &str) -> String {
    list.split(',')
        .map(|url| {
            BrokerAddress::parse(url.trim())
                .map_or_else(|_| url.trim().to_string(), |a| a.display())
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A TLS client configuration that trusts `login.ca_file` and presents its certificate, if any.
fn tls_config(login: &Login) -> Result<rustls::ClientConfig, String> {
    let ca_file = login.ca_file.as_ref().ok_or(
        "an mqtts:// broker needs the CA certificate that signed its certificate: --ca-file FILE (or $ISOMESH_CA_FILE)",
    )?;
    let mut roots = rustls::RootCertStore::empty();
    let certs = read_certs(ca_file)?;
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", ca_file.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots);
    match (&login.cert_file, &login.key_file) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("{}: not a PEM private key: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate {}: {e}", cert.display()))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err("a client certificate needs both --cert-file and --key-file ($ISOMESH_CERT_FILE, $ISOMESH_KEY_FILE)".into()),
    }
}

fn read_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse_or_explain() {
        let plain = BrokerAddress::parse("mqtt://10.0.0.2:1884").unwrap();
        assert_eq!((plain.host.as_str(), plain.port), ("10.0.0.2", 1884));
        assert_eq!(plain.username, None);
        let bare = BrokerAddress::parse("broker").unwrap();
        assert_eq!((bare.host.as_str(), bare.port), ("broker", 1883));
        let login = BrokerAddress::parse("mqtt://d1:p@ss:w@broker:1883").unwrap();
        assert_eq!(login.username.as_deref(), Some("d1"));
        assert_eq!(login.password.as_deref(), Some("p@ss:w"));
        assert_eq!(login.host, "broker");
        assert_eq!(login.display(), "mqtt://d1@broker:1883");
        let tls = BrokerAddress::parse("mqtts://broker").unwrap();
        assert!(tls.tls && tls.port == 8883, "{tls:?}");
        assert_eq!(tls.display(), "mqtts://broker:8883");
        let err = tls.options("c", &Login::default(), None).unwrap_err();
        // The error names the flag that fixes it.
        assert!(
            matches!(&err, LoginError::Tls(text) if text.contains("--ca-file")),
            "{err}"
        );
        assert_eq!(
            BrokerAddress::parse("http://x:1"),
            Err(LoginError::Unsupported("http://x:1".into()))
        );
        assert_eq!(
            BrokerAddress::parse("mqtt://x:notaport"),
            Err(LoginError::BadPort("mqtt://x:notaport".into()))
        );
        assert_eq!(
            BrokerAddress::parse("mqtt://:1883"),
            Err(LoginError::NoHost("mqtt://:1883".into()))
        );
    }

    #[test]
    fn a_list_of_members_parses_each_and_names_the_one_at_fault() {
        let members = BrokerAddress::parse_members("mqtt://a:1883, mqtt://n1:pw@b:1884,c").unwrap();
        let hosts: Vec<(&str, u16)> = members.iter().map(|m| (m.host.as_str(), m.port)).collect();
        assert_eq!(hosts, [("a", 1883), ("b", 1884), ("c", 1883)]);
        assert_eq!(members[1].password.as_deref(), Some("pw"));
        assert_eq!(BrokerAddress::parse_members("mqtt://a").unwrap().len(), 1);
        assert_eq!(
            BrokerAddress::parse_members("mqtt://u:secret@a,,b"),
            Err(LoginError::EmptyMember {
                position: 2,
                list: "mqtt://u@a:1883,,mqtt://b:1883".into()
            })
        );
        assert_eq!(
            BrokerAddress::parse_members("mqtt://a,mqtt://b:x"),
            Err(LoginError::BadPort("mqtt://b:x".into()))
        );
        assert_eq!(
            redact_list("mqtt://u:secret@a:1,mqtts://b"),
            "mqtt://u@a:1,mqtts://b:8883"
        );
    }
}
