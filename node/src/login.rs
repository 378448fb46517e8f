//! Where the broker is and how to log in to it, for nodes and for every `isomesh` command.
//!
//! A broker URL is `mqtt://[USER[:PASSWORD]@]HOST[:PORT]` (`tcp://` or a bare `HOST:PORT` also
//! work; the port defaults to 1883). Credentials in the URL win; otherwise they come from the
//! node's `--username`/`--password` flags or, for both nodes and commands, from
//! `$ISOMESH_USERNAME` and `$ISOMESH_PASSWORD` (the way to keep a password off command lines).

use rumqttc::v5::MqttOptions;

/// A parsed broker URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl BrokerAddress {
    pub fn parse(url: &str) -> Result<BrokerAddress, String> {
        let usage = "use mqtt://[USER[:PASSWORD]@]HOST[:PORT]";
        let rest = url
            .strip_prefix("mqtt://")
            .or_else(|| url.strip_prefix("tcp://"))
            .unwrap_or(url);
        if rest.contains("://") {
            return Err(format!("unsupported broker URL {url:?}: {usage}"));
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
                    .map_err(|_| format!("bad port in broker URL {url:?}: {usage}"))?;
                (host, port)
            }
            None => (rest, 1883),
        };
        if host.is_empty() {
            return Err(format!("no host in broker URL {url:?}: {usage}"));
        }
        Ok(BrokerAddress {
            host: host.to_string(),
            port,
            username: username.filter(|u| !u.is_empty()),
            password,
        })
    }

    /// The URL without its password, for logs and error messages.
    pub fn display(&self) -> String {
        match &self.username {
            Some(user) => format!("mqtt://{user}@{}:{}", self.host, self.port),
            None => format!("mqtt://{}:{}", self.host, self.port),
        }
    }

    /// MQTT options for `client_id` at this address, logged in with the URL's credentials, else
    /// `username`/`password` (flags or environment), else none. A password without a username
    /// logs in as `default_user` (a node's id).
    pub fn options(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&str>,
        default_user: Option<&str>,
    ) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, self.host.clone(), self.port);
        let password = self.password.as_deref().or(password);
        let username = self
            .username
            .as_deref()
            .or(username)
            .or(password.and(default_user));
        if let Some(username) = username {
            options.set_credentials(username, password.unwrap_or_default());
        }
        options
    }
}

/// Credentials from `$ISOMESH_USERNAME` and `$ISOMESH_PASSWORD`, for commands without flags.
pub fn from_env() -> (Option<String>, Option<String>) {
    let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
    (var("ISOMESH_USERNAME"), var("ISOMESH_PASSWORD"))
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
        assert!(BrokerAddress::parse("http://x:1").is_err());
        assert!(BrokerAddress::parse("mqtt://x:notaport").is_err());
        assert!(BrokerAddress::parse("mqtt://:1883").is_err());
    }
}
