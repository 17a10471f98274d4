//! Command-line flags and environment variables (docs/server.md, "Configuration").

use std::{fmt, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

/// A value that must never be printed: Debug and Display show a placeholder.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// chorus-server: a clustered Socket.IO server that broadcasts through Redis.
///
/// Without a subcommand it serves; `chorus-server token ...` prints a socket token.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "chorus-server",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// One port for Socket.IO, the HTTP API, health and metrics.
    #[arg(long, env = "PORT", default_value_t = 3000)]
    pub port: u16,

    /// redis://[:password@]host:port[/db] or rediss://; several, comma-separated, are
    /// independent buses (no single point of failure); unset runs a single node.
    // Read raw and checked in `from_args`: clap's own errors would echo the password.
    #[arg(
        long = "redis-url",
        env = "REDIS_URL",
        hide_env_values = true,
        value_name = "REDIS_URL"
    )]
    redis_url_raw: Option<Secret>,

    /// The parsed `--redis-url`s; empty for a single node.
    #[arg(skip)]
    pub redis_urls: Vec<RedisUrl>,

    /// Redis channel prefix: apps sharing one Redis must not hear each other.
    #[arg(long = "channel-prefix", env = "REDIS_CHANNEL_PREFIX", default_value = "chorus", value_parser = parse_prefix)]
    pub channel_prefix: String,

    /// Bearer token for /v1/*; unset leaves the API open (a warning is logged).
    #[arg(long, env = "API_TOKEN", hide_env_values = true, value_parser = parse_secret)]
    pub api_token: Option<Secret>,

    /// HS256 key; when set every socket must present a valid JWT.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true, value_parser = parse_secret)]
    pub jwt_secret: Option<Secret>,

    /// Comma list of room patterns (`*` glob) anyone may join even with JWT on.
    #[arg(long, env = "PUBLIC_ROOMS", value_delimiter = ',')]
    pub public_rooms: Vec<String>,

    /// This replica's name in the cluster (default: the hostname).
    #[arg(long = "node-id", env = "POD_NAME")]
    pub node_id: Option<String>,

    /// Largest socket message or HTTP body, in bytes.
    #[arg(long, env = "MAX_PAYLOAD", default_value_t = 1_048_576, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_payload: u64,

    /// On SIGTERM: the longest a drain may take, in seconds (the pod's termination grace
    /// period must cover it); a drain closes connections one by one while not ready.
    #[arg(long, env = "DRAIN_SECONDS", default_value_t = 5)]
    pub drain_seconds: u64,

    /// On SIGTERM: the most connections the drain closes per second (on average), so the
    /// other replicas take the reconnects at that rate; the drain lasts as long as that needs,
    /// within DRAIN_SECONDS.
    #[arg(long, env = "DRAIN_RATE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub drain_rate: u32,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Comma list of browser origins allowed to connect (`scheme://host[:port]`), `*` for any.
    #[arg(long, env = "CORS_ORIGINS", value_delimiter = ',', default_value = "*", value_parser = parse_origin)]
    pub cors_origins: Vec<String>,

    /// Sockets this replica accepts; beyond it new handshakes get 503 `over_capacity`.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Rooms one socket may be in (its automatic `user:<sub>` room counts).
    #[arg(long, env = "MAX_ROOMS_PER_SOCKET", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rooms_per_socket: u32,

    /// Client events per second per socket (bursts of twice that).
    #[arg(long, env = "SOCKET_RATE", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub socket_rate: u32,

    /// Bytes queued to one socket; a socket further behind is disconnected.
    #[arg(long, env = "SOCKET_BUFFER_BYTES", default_value_t = 1_048_576, value_parser = clap::value_parser!(u64).range(1024..))]
    pub socket_buffer_bytes: u64,

    /// Bytes of messages from Redis waiting for this replica's delivery at most; past it
    /// they are dropped from that queue and recovered as a gap (caught up from the history,
    /// or the sockets closed so that they resume).
    #[arg(long, env = "BUS_BACKLOG_BYTES", default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(1024..))]
    pub bus_backlog_bytes: u64,

    /// Shed sockets while this replica holds more than its share (see docs/server.md,
    /// Rebalancing): `true` or `false`.
    #[arg(long, env = "REBALANCE", default_value_t = true, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub rebalance: bool,

    /// How far above the mean of the ready replicas a replica may be before it sheds (0 to 10).
    #[arg(long, env = "REBALANCE_TOLERANCE", default_value_t = 0.2, value_parser = parse_tolerance)]
    pub rebalance_tolerance: f64,

    /// While shedding, at most this fraction of the replica's sockets closed per second (above
    /// 0, at most 1).
    #[arg(long, env = "REBALANCE_RATE", default_value_t = 0.005, value_parser = parse_rate)]
    pub rebalance_rate: f64,

    /// The Service's ClientIP affinity window, in seconds (0: no affinity): a shed client is
    /// asked to stay away that long, so that its reconnect is placed anew.
    #[arg(long, env = "REBALANCE_AFFINITY_SECONDS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub rebalance_affinity_seconds: u64,

    /// Messages kept per room for `resume`; 0 turns history off.
    #[arg(long, env = "HISTORY_SIZE", default_value_t = 100)]
    pub history_size: u32,

    /// Seconds a room's history outlives its last message.
    #[arg(long = "history-ttl", env = "HISTORY_TTL_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub history_ttl_seconds: u64,

    /// When set, tokens must carry this `aud`.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// When set, tokens must carry this `iss`.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Print a signed HS256 socket token (JWT) on stdout, and nothing else.
    Token(TokenArgs),
}

/// `chorus-server token`: what the token grants and how long it lives.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The user (`sub`); the socket joins `user:<sub>`. Omit for an anonymous token.
    #[arg(long)]
    pub sub: Option<String>,

    /// Comma list of room patterns (`*` glob) the socket may join.
    #[arg(long, value_delimiter = ',', value_name = "PATTERNS")]
    pub rooms: Vec<String>,

    /// Comma list of room patterns the socket may publish to.
    #[arg(long, value_delimiter = ',', value_name = "PATTERNS")]
    pub publish: Vec<String>,

    /// Lifetime: seconds, or a number with s, m, h or d (`90s`, `15m`, `1h`, `7d`).
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    pub ttl: Duration,

    /// `aud` claim (default: the JWT_AUDIENCE this server checks, if set).
    #[arg(long, env = "JWT_AUDIENCE")]
    pub aud: Option<String>,

    /// `iss` claim (default: the JWT_ISSUER this server checks, if set).
    #[arg(long, env = "JWT_ISSUER")]
    pub iss: Option<String>,

    /// The HS256 key the servers check tokens with.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true, value_parser = parse_secret)]
    pub jwt_secret: Option<Secret>,
}

/// `90s`, `15m`, `1h`, `7d`, or plain seconds; more than zero.
fn parse_tolerance(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=10.0).contains(&v) => Ok(v),
        _ => Err("expected a number from 0 to 10, such as 0.2".into()),
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err("expected a fraction above 0 and at most 1, such as 0.005".into()),
    }
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    const HINT: &str = "expected a duration like 90s, 15m, 1h or 7d";
    let s = s.trim();
    let (number, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let scale: u64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(HINT.into()),
    };
    let n: u64 = number.parse().map_err(|_| HINT.to_owned())?;
    match n.checked_mul(scale) {
        Some(0) => Err("must be more than zero".into()),
        Some(secs) => Ok(Duration::from_secs(secs)),
        None => Err("too long".into()),
    }
}

/// A parsed Redis URL; Debug never shows the password.
#[derive(Clone)]
pub struct RedisUrl {
    pub info: redis::ConnectionInfo,
    /// `host:port/db`, safe to log.
    pub display: String,
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({})", self.display)
    }
}

/// Redis servers at most in `REDIS_URL`.
pub const MAX_REDIS: usize = 4;

/// One or several comma-separated URLs (a password is percent-encoded, so it holds no comma).
fn parse_redis_urls(s: &str) -> Result<Vec<RedisUrl>, String> {
    let urls = s
        .split(',')
        .map(str::trim)
        .enumerate()
        .map(|(i, u)| {
            parse_redis_url(u).map_err(|why| match s.contains(',') {
                true => format!("URL {}: {why}", i + 1),
                false => why,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if urls.len() > MAX_REDIS {
        return Err(format!("at most {MAX_REDIS} Redis URLs"));
    }
    for (i, u) in urls.iter().enumerate() {
        if urls[..i].iter().any(|v| v.info.addr() == u.info.addr()) {
            return Err(format!("URL {}: {} is listed twice", i + 1, u.display));
        }
    }
    Ok(urls)
}

fn parse_redis_url(s: &str) -> Result<RedisUrl, String> {
    use redis::IntoConnectionInfo;
    let scheme_ok = s.starts_with("redis://") || s.starts_with("rediss://");
    if !scheme_ok {
        return Err("expected redis://[:password@]host:port[/db] or rediss://...".into());
    }
    // redis-rs error texts do not echo the URL, so they are safe to show.
    let info = s
        .into_connection_info()
        .map_err(|e| format!("not a Redis URL: {}", e.detail().unwrap_or("malformed")))?;
    let addr = match info.addr() {
        redis::ConnectionAddr::Tcp(h, p) => format!("{h}:{p}"),
        redis::ConnectionAddr::TcpTls { host, port, .. } => format!("{host}:{port} (tls)"),
        other => format!("{other}"),
    };
    let display = format!("{addr}/{}", info.redis_settings().db());
    // RESP3 lets one connection carry commands and subscriptions (push messages).
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(redis::ProtocolVersion::RESP3);
    Ok(RedisUrl {
        info: info.set_redis_settings(settings),
        display,
    })
}

/// An origin the way browsers send it: `scheme://host[:port]` in lower case, without the
/// scheme's default port; or `null` (sandboxed pages), or `*`. Empty stays empty (a stray
/// comma in the list).
pub fn parse_origin(s: &str) -> Result<String, String> {
    const HINT: &str = "expected origins like https://app.example.com (scheme://host[:port], no path), `null` or `*`";
    let s = s.trim().to_ascii_lowercase();
    let s = s.strip_suffix('/').unwrap_or(&s);
    if matches!(s, "" | "*" | "null") {
        return Ok(s.to_owned());
    }
    let (scheme, rest) = s.split_once("://").ok_or(HINT)?;
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    let rest_ok = !rest.is_empty()
        && !rest
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "/?#@\\".contains(c));
    if !scheme_ok || !rest_ok {
        return Err(HINT.into());
    }
    // A `:` inside `[...]` belongs to an IPv6 address, not to the port.
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (rest, None),
    };
    let port = port.map(str::parse::<u16>).transpose().map_err(|_| HINT)?;
    if host.is_empty() {
        return Err(HINT.into());
    }
    Ok(match (scheme, port) {
        (_, None) | ("http" | "ws", Some(80)) | ("https" | "wss", Some(443)) => {
            format!("{scheme}://{host}")
        }
        (_, Some(port)) => format!("{scheme}://{host}:{port}"),
    })
}

fn parse_prefix(s: &str) -> Result<String, String> {
    if s.is_empty() || s.contains('#') || s.chars().any(char::is_control) {
        return Err("must be non-empty, without '#' or control characters".into());
    }
    Ok(s.to_owned())
}

fn parse_secret(s: &str) -> Result<Secret, String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(Secret(s.to_owned()))
}

impl Config {
    /// Parses flags and environment. On a bad value returns the one-line message to print.
    pub fn from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::CommandFactory;
        let mut config = Self::try_parse_from(args)?;
        if let Some(raw) = config
            .redis_url_raw
            .take()
            .filter(|r| !r.expose().is_empty())
        {
            config.redis_urls = parse_redis_urls(raw.expose()).map_err(|why| {
                clap::Error::raw(
                    clap::error::ErrorKind::ValueValidation,
                    format!("invalid value for '--redis-url <REDIS_URL>' (REDIS_URL): {why}\n"),
                )
                .format(&mut Self::command())
            })?;
        }
        config.public_rooms.retain(|p| !p.trim().is_empty());
        config.cors_origins.retain(|o| !o.trim().is_empty());
        Ok(config)
    }

    /// The node name: the flag, else the hostname, else a random one.
    pub fn node_name(&self) -> String {
        if let Some(id) = self.node_id.as_ref().filter(|s| !s.is_empty()) {
            return id.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| format!("node-{:08x}", rand::random::<u32>()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::from_args(std::iter::once("chorus-server").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_are_the_spec_ones() {
        let c = parse(&[]).expect("defaults parse");
        assert_eq!(c.port, 3000);
        assert!(c.redis_urls.is_empty());
        assert_eq!(c.channel_prefix, "chorus");
        assert_eq!(c.max_payload, 1_048_576);
        assert_eq!((c.drain_seconds, c.drain_rate), (5, 1000));
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.cors_origins, vec!["*"]);
        assert_eq!(c.max_connections, 100_000);
        assert_eq!(c.max_rooms_per_socket, 128);
        assert_eq!(c.socket_rate, 100);
        assert_eq!(c.socket_buffer_bytes, 1_048_576);
        assert_eq!(c.history_size, 100);
        assert_eq!(c.bus_backlog_bytes, 64 << 20);
        assert!(c.rebalance);
        assert_eq!((c.rebalance_tolerance, c.rebalance_rate), (0.2, 0.005));
        assert_eq!(c.rebalance_affinity_seconds, 0);
        assert_eq!(c.history_ttl_seconds, 300);
        assert_eq!((c.jwt_audience, c.jwt_issuer), (None, None));
        assert!(c.command.is_none());
    }

    #[test]
    fn malformed_rebalance_values_name_their_flag() {
        for (flag, value) in [
            ("--rebalance", "perhaps"),
            ("--rebalance-tolerance", "-1"),
            ("--rebalance-tolerance", "lots"),
            ("--rebalance-rate", "0"),
            ("--rebalance-rate", "2"),
        ] {
            let err = parse(&[&format!("{flag}={value}")]).expect_err(value);
            let first = err.to_string();
            let first = first.lines().next().unwrap_or_default();
            assert!(first.contains(flag), "{flag} {value}: {first}");
        }
        let c = parse(&["--rebalance", "false", "--rebalance-rate", "0.05"]).expect("parses");
        assert!(!c.rebalance);
        assert_eq!(c.rebalance_rate, 0.05);
    }

    #[test]
    fn token_subcommand() {
        let c = parse(&[
            "token",
            "--sub",
            "alice",
            "--rooms",
            "chat:*,lobby",
            "--ttl",
            "15m",
            "--jwt-secret",
            "k",
        ])
        .expect("parses");
        let Some(Command::Token(t)) = c.command else {
            panic!("no token command");
        };
        assert_eq!(t.sub.as_deref(), Some("alice"));
        assert_eq!(t.rooms, vec!["chat:*", "lobby"]);
        assert!(t.publish.is_empty());
        assert_eq!(t.ttl, Duration::from_secs(900));
        // Server flags belong to the server, not to the subcommand.
        assert!(parse(&["--port", "4000", "token"]).is_err());
        let err = parse(&["token", "--ttl", "soon"]).expect_err("bad ttl");
        assert!(
            err.to_string()
                .lines()
                .next()
                .unwrap_or_default()
                .contains("--ttl")
        );
    }

    #[test]
    fn origins_are_normalised() {
        let c = parse(&[
            "--cors-origins",
            "HTTPS://App.test/, http://localhost:8080,,http://[::1]:80",
        ])
        .expect("parses");
        assert_eq!(
            c.cors_origins,
            vec!["https://app.test", "http://localhost:8080", "http://[::1]"]
        );
    }

    #[test]
    fn ttl_units() {
        for (text, secs) in [
            ("90s", 90),
            ("15m", 900),
            ("1h", 3600),
            ("7d", 604_800),
            ("45", 45),
        ] {
            assert_eq!(parse_ttl(text), Ok(Duration::from_secs(secs)), "{text}");
        }
        for bad in ["", "0s", "h", "1w", "-5m", "1.5h", "99999999999999999999d"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bad_values_name_the_flag_in_the_first_line() {
        for (args, flag) in [
            (&["--port", "70000"][..], "--port"),
            (&["--redis-url", "http://x"][..], "--redis-url"),
            (&["--max-payload", "0"][..], "--max-payload"),
            (&["--log-format", "xml"][..], "--log-format"),
            (&["--channel-prefix", "a#b"][..], "--channel-prefix"),
            (&["--max-connections", "0"][..], "--max-connections"),
            (&["--max-rooms-per-socket=-1"][..], "--max-rooms-per-socket"),
            (&["--socket-rate", "fast"][..], "--socket-rate"),
            (&["--drain-rate", "0"][..], "--drain-rate"),
            (
                &["--socket-buffer-bytes", "10"][..],
                "--socket-buffer-bytes",
            ),
            (
                &["--cors-origins", "https://a.test,b.test"][..],
                "--cors-origins",
            ),
            (
                &["--cors-origins", "https://a.test/app"][..],
                "--cors-origins",
            ),
        ] {
            let err = parse(args).expect_err("must be refused");
            let first = err
                .to_string()
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            assert!(first.contains(flag), "{first:?} should name {flag}");
        }
    }

    #[test]
    fn redis_password_never_shows() {
        let c = parse(&["--redis-url", "redis://:hunter2@127.0.0.1:6390/2"]).expect("parses");
        let [url] = &c.redis_urls[..] else {
            panic!("one URL: {:?}", c.redis_urls)
        };
        assert_eq!(url.display, "127.0.0.1:6390/2");
        assert!(!format!("{url:?}").contains("hunter2"));
        assert_eq!(
            url.info.redis_settings().protocol(),
            redis::ProtocolVersion::RESP3
        );
        let c = parse(&["--api-token", "tok-secret"]).expect("parses");
        assert!(!format!("{c:?}").contains("tok-secret"));
    }

    #[test]
    fn several_redis_urls_are_independent_buses() {
        let c = parse(&[
            "--redis-url",
            "redis://:a%2Cb@127.0.0.1:6390, redis://:hunter2@127.0.0.1:6391/1",
        ])
        .expect("parses");
        let shown: Vec<&str> = c.redis_urls.iter().map(|u| u.display.as_str()).collect();
        assert_eq!(shown, ["127.0.0.1:6390/0", "127.0.0.1:6391/1"]);
        assert_eq!(
            c.redis_urls[0].info.redis_settings().password(),
            Some("a,b"),
            "a percent-encoded comma belongs to the password"
        );
        for (bad, why) in [
            ("redis://127.0.0.1:1,redis://127.0.0.1:1/2", "listed twice"),
            ("redis://127.0.0.1:1,", "URL 2"),
            (
                "redis://h:1,redis://h:2,redis://h:3,redis://h:4,redis://h:5",
                "at most 4",
            ),
        ] {
            let err = parse(&["--redis-url", bad]).expect_err(bad).to_string();
            assert!(err.contains(why), "{bad}: {err}");
            assert!(!err.contains("hunter2"));
        }
    }
}
