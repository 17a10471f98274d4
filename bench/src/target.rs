//! Server URLs: `http://host[:port][/]`, loopback only (127.0.0.0/8, ::1, localhost).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// as given
    pub url: String,
    /// host without brackets: `127.0.0.1`, `::1`, `localhost`
    pub host: String,
    pub port: u16,
    /// `Host:` header value, e.g. `127.0.0.1:3001` or `[::1]:3001`
    pub authority: String,
}

impl Target {
    /// Parses and checks a server URL.
    pub fn parse(url: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::BadUrl {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        let lower = url.to_ascii_lowercase();
        let rest = if let Some(r) = lower.strip_prefix("http://") {
            r
        } else if lower.starts_with("https://") {
            return Err(bad(
                "https is not supported (loopback targets only, plain http)",
            ));
        } else {
            return Err(bad("expected http://host:port"));
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if !(path.is_empty() || path == "/") {
            return Err(bad(
                "a path would name a Socket.IO namespace; give the server root",
            ));
        }
        if authority.contains('@') {
            return Err(bad("user info is not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let close = v6.find(']').ok_or_else(|| bad("unclosed '['"))?;
            let host = &v6[..close];
            let after = &v6[close + 1..];
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(bad("junk after ']'")),
            };
            (host, port)
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            None => 80,
            Some(p) => p.parse::<u16>().map_err(|_| bad("bad port"))?,
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if !is_loopback_host(host) {
            return Err(Error::NotLoopback(url.to_owned()));
        }
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Self {
            url: url.to_owned(),
            host: host.to_owned(),
            port,
            authority,
        })
    }

    /// The Engine.IO v4 websocket URL.
    pub fn ws_url(&self) -> String {
        format!(
            "ws://{}/socket.io/?EIO=4&transport=websocket",
            self.authority
        )
    }

    /// Resolves to a loopback socket address (`localhost` included); anything else is refused.
    pub async fn resolve(&self) -> Result<SocketAddr, Error> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, self.port));
        }
        let addrs = tokio::net::lookup_host((self.host.as_str(), self.port)).await?;
        let all: Vec<SocketAddr> = addrs.collect();
        // Prefer IPv4 (servers commonly listen on both); never anything off-host.
        all.iter()
            .find(|a| a.is_ipv4() && a.ip().is_loopback())
            .or_else(|| all.iter().find(|a| a.ip().is_loopback()))
            .copied()
            .ok_or_else(|| Error::NotLoopback(self.url.clone()))
    }
}

/// `localhost`, `::1`, or a dotted-quad IPv4 address in 127.0.0.0/8.
pub fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if host == "::1" {
        return true;
    }
    // only the plain dotted-quad form (no "127.1" shorthands)
    let parts: Vec<&str> = host.split('.').collect();
    parts.len() == 4
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        && host
            .parse::<Ipv4Addr>()
            .is_ok_and(|ip| ip.octets()[0] == 127)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_are_accepted() {
        let t = Target::parse("http://127.0.0.1:3001").expect("ok");
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 3001));
        assert_eq!(
            t.ws_url(),
            "ws://127.0.0.1:3001/socket.io/?EIO=4&transport=websocket"
        );
        let t = Target::parse("http://[::1]:8080/").expect("ok");
        assert_eq!((t.host.as_str(), t.port), ("::1", 8080));
        assert_eq!(t.authority, "[::1]:8080");
        let t = Target::parse("http://localhost").expect("ok");
        assert_eq!(t.port, 80);
        assert!(Target::parse("http://127.255.3.4:1").is_ok());
        assert!(Target::parse("HTTP://LOCALHOST:9").is_ok());
    }

    #[test]
    fn other_hosts_are_refused() {
        for url in [
            "http://10.0.0.1:3000",
            "http://192.168.1.2:3000",
            "http://8.8.8.8",
            "http://example.com:3000",
            "http://128.0.0.1:3000",
            "http://[::2]:3000",
            "http://127.0.0.1.example.com:3000",
            "http://localhost.example.com",
            "http://0.0.0.0:3000",
        ] {
            match Target::parse(url) {
                Err(Error::NotLoopback(u)) => assert_eq!(u, url),
                other => panic!("{url}: {other:?}"),
            }
        }
    }

    #[test]
    fn malformed_urls_are_errors() {
        for url in [
            "127.0.0.1:3000",
            "https://127.0.0.1:3000",
            "http://127.0.0.1:99999",
            "http://127.0.0.1:3000/chat",
            "http://user@127.0.0.1:3000",
            "http://[::1",
            "http://",
        ] {
            assert!(
                matches!(Target::parse(url), Err(Error::BadUrl { .. })),
                "{url}"
            );
        }
    }

    #[test]
    fn loopback_host_check() {
        assert!(is_loopback_host("127.0.0.1"));
        assert!(is_loopback_host("127.1.2.3"));
        assert!(!is_loopback_host("127.1"));
        assert!(!is_loopback_host("127.0.0.256"));
        assert!(!is_loopback_host("::"));
    }
}
