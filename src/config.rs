//! Plain, validated configuration values shared by the binary and the library.
//!
//! The library never sees clap: the binary (`src/cli/args.rs`) turns command-line arguments into these
//! types. Here: [`ProxyUrl`], the upstream proxy as the user writes it
//! (`socks5://[user:pass@]host:port`, `socks4://[userid@]host:port`,
//! `socks4a://...`; IPv6 hosts in brackets; percent-encoded user information).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use url::{Host, Url};

use crate::socks::{Auth, Credentials, Protocol, v4::UserId};

/// The most TUN queues (`--threads`) a device takes: the kernel's `MAX_TAP_QUEUES`.
pub const MAX_THREADS: usize = 256;

/// The default `--threads`: one stack per core the process may run on (1 if that
/// cannot be known), at most [`MAX_THREADS`].
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .clamp(1, MAX_THREADS)
}

/// The port used when a proxy URL names none.
pub const DEFAULT_PROXY_PORT: u16 = 1080;

/// A proxy URL that cannot be used, with the reason in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid proxy URL {url:?}: {reason}")]
pub struct ProxyUrlError {
    /// The URL as given, with any password replaced by `***`.
    pub url: String,
    /// What is wrong.
    pub reason: String,
}

/// Where the proxy is: an address, or a name resolved when dialling.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProxyHost {
    /// An IPv4 or IPv6 address.
    Ip(IpAddr),
    /// A host name.
    Name(String),
}

impl fmt::Display for ProxyHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyHost::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            ProxyHost::Ip(ip) => write!(f, "{ip}"),
            ProxyHost::Name(name) => f.write_str(name),
        }
    }
}

/// The upstream SOCKS proxy: protocol, host, port and credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    /// SOCKS4, SOCKS4a or SOCKS5.
    pub protocol: Protocol,
    /// The proxy's host.
    pub host: ProxyHost,
    /// The proxy's port.
    pub port: u16,
    /// Credentials (SOCKS5 username/password) or the SOCKS4 user id.
    pub auth: Auth,
}

impl fmt::Display for ProxyUrl {
    /// The URL without its password (safe for logs).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.protocol.scheme())?;
        match &self.auth {
            Auth::None => {}
            Auth::Password(creds) => {
                write!(f, "{}:***@", String::from_utf8_lossy(creds.username()))?;
            }
            Auth::UserId(id) => write!(f, "{}@", String::from_utf8_lossy(id.as_bytes()))?,
        }
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Percent-decodes a URL component (RFC 3986; `+` stays `+`).
fn percent_decode(field: &str) -> Vec<u8> {
    percent_encoding::percent_decode_str(field).collect()
}

impl FromStr for ProxyUrl {
    type Err = ProxyUrlError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let fail = |reason: &str| ProxyUrlError {
            url: redact(input),
            reason: reason.to_string(),
        };
        let url = Url::parse(input).map_err(|e| {
            // `socks5://::1:1080` parses as an empty host: say what was meant.
            let authority = input.split_once("://").map_or("", |(_, rest)| rest);
            let authority = authority.split(['/', '?', '#']).next().unwrap_or_default();
            let host = authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host);
            if host.matches(':').count() > 1 && !host.starts_with('[') {
                fail(&format!(
                    "{e}: an IPv6 address goes in brackets, as in socks5://[::1]:1080"
                ))
            } else {
                fail(&e.to_string())
            }
        })?;
        let protocol = match url.scheme() {
            "socks5" | "socks5h" => Protocol::Socks5,
            "socks4" => Protocol::Socks4,
            "socks4a" => Protocol::Socks4a,
            other => {
                return Err(fail(&format!(
                    "unknown scheme {other:?}; use socks5://, socks4:// or socks4a://"
                )));
            }
        };
        let host = match url.host() {
            None => return Err(fail("no host")),
            Some(Host::Ipv4(ip)) => ProxyHost::Ip(ip.into()),
            Some(Host::Ipv6(ip)) => ProxyHost::Ip(ip.into()),
            Some(Host::Domain("")) => return Err(fail("no host")),
            // Non-special schemes keep IPv4 literals as opaque names.
            Some(Host::Domain(name)) => match name.parse::<IpAddr>() {
                Ok(ip) => ProxyHost::Ip(ip),
                Err(_) => ProxyHost::Name(name.to_string()),
            },
        };
        let port = url.port().unwrap_or(DEFAULT_PROXY_PORT);
        if port == 0 {
            return Err(fail("port 0"));
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err(fail("a proxy URL has no path, query or fragment"));
        }
        let user = percent_decode(url.username());
        let password = url.password().map(percent_decode);
        let auth = match (protocol, user.is_empty(), password) {
            (_, true, None) => Auth::None,
            (Protocol::Socks5, true, Some(_)) => return Err(fail("password without a user name")),
            (Protocol::Socks5, false, None) => {
                return Err(fail(
                    "user name without a password (socks5://user:pass@host:port)",
                ));
            }
            (Protocol::Socks5, false, Some(password)) => {
                Auth::Password(Credentials::new(user, password).map_err(|e| fail(&e.to_string()))?)
            }
            (_, _, Some(_)) => {
                return Err(fail(
                    "SOCKS4 has no password; give the user id alone (socks4://userid@host:port)",
                ));
            }
            (_, false, None) => Auth::UserId(UserId::new(user).map_err(|e| fail(&e.to_string()))?),
        };
        Ok(ProxyUrl {
            protocol,
            host,
            port,
            auth,
        })
    }
}

/// The URL with the password part of its user information replaced, for messages.
fn redact(input: &str) -> String {
    let Some((scheme, rest)) = input.split_once("://") else {
        return input.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{hostport}{tail}"),
            None => input.to_string(),
        },
        None => input.to_string(),
    }
}

/// `--offload`: whether the TUN device carries a `virtio_net_hdr` and lets the kernel
/// hand over (and take back) TCP super-segments and partial checksums.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum OffloadMode {
    /// Ask for checksum, TSO and USO offload; use whatever the kernel grants, or none
    /// (logged) if it refuses.
    #[default]
    Auto,
    /// Plain packets, no header.
    Off,
}

impl FromStr for OffloadMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(OffloadMode::Auto),
            "off" => Ok(OffloadMode::Off),
            other => Err(format!(
                "invalid offload mode {other:?}: expected auto or off"
            )),
        }
    }
}

impl fmt::Display for OffloadMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OffloadMode::Auto => "auto",
            OffloadMode::Off => "off",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn parse(s: &str) -> ProxyUrl {
        s.parse().unwrap()
    }

    #[test]
    fn plain_socks5() {
        let p = parse("socks5://127.0.0.1:1080");
        assert_eq!(p.protocol, Protocol::Socks5);
        assert_eq!(p.host, ProxyHost::Ip(Ipv4Addr::LOCALHOST.into()));
        assert_eq!(p.port, 1080);
        assert_eq!(p.auth, Auth::None);
    }

    #[test]
    fn ipv6_in_brackets_and_default_port() {
        let p = parse("socks5://[fd19:1::2]");
        assert_eq!(
            p.host,
            ProxyHost::Ip("fd19:1::2".parse::<Ipv6Addr>().unwrap().into())
        );
        assert_eq!(p.port, DEFAULT_PROXY_PORT);
        assert_eq!(p.to_string(), "socks5://[fd19:1::2]:1080");
    }

    #[test]
    fn credentials_are_percent_decoded() {
        let p = parse("socks5://us%3Aer:p%40ss%2F%25@proxy.example:9050/");
        let Auth::Password(c) = &p.auth else {
            panic!("{p:?}")
        };
        assert_eq!(c.username(), b"us:er");
        assert_eq!(c.password(), b"p@ss/%");
        assert_eq!(p.host, ProxyHost::Name("proxy.example".into()));
        assert_eq!(p.to_string(), "socks5://us:er:***@proxy.example:9050");
    }

    #[test]
    fn socks4_user_id() {
        let p = parse("socks4://alice@10.0.0.1:1080");
        assert_eq!(p.protocol, Protocol::Socks4);
        assert_eq!(p.auth, Auth::UserId(UserId::new("alice").unwrap()));
        let p = parse("socks4a://10.0.0.1:1080");
        assert_eq!(p.protocol, Protocol::Socks4a);
        assert_eq!(p.auth, Auth::None);
    }

    #[test]
    fn bad_urls_are_rejected_with_a_reason() {
        for (url, reason) in [
            ("http://127.0.0.1:8080", "unknown scheme"),
            ("socks5://", "no host"),
            ("socks5://127.0.0.1:0", "port 0"),
            ("socks5://127.0.0.1:70000", "invalid port"),
            ("socks5://user@127.0.0.1:1080", "without a password"),
            ("socks5://:pw@127.0.0.1:1080", "password without"),
            ("socks4://u:pw@127.0.0.1:1080", "no password"),
            ("socks5://127.0.0.1:1080/path", "no path"),
            ("127.0.0.1:1080", ""),
            ("socks5://[::1:1080", "invalid IPv6"),
            ("socks5://::1:1080", "an IPv6 address goes in brackets"),
            (
                "socks5://u:p@fd00::2:1080",
                "an IPv6 address goes in brackets",
            ),
        ] {
            let err = url.parse::<ProxyUrl>().unwrap_err();
            assert!(
                err.to_string().contains(reason),
                "{url}: {err} should mention {reason:?}"
            );
        }
    }

    #[test]
    fn errors_never_show_the_password() {
        let err = "socks5://u:secret@127.0.0.1:1080/x"
            .parse::<ProxyUrl>()
            .unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
        assert!(err.to_string().contains("u:***@"), "{err}");
    }

    #[test]
    fn over_long_credentials_are_rejected() {
        let long = "a".repeat(256);
        let err = format!("socks5://{long}:pw@127.0.0.1")
            .parse::<ProxyUrl>()
            .unwrap_err();
        assert!(err.to_string().contains("256"), "{err}");
        let ok = "a".repeat(255);
        parse(&format!("socks5://{ok}:{ok}@127.0.0.1"));
    }

    #[test]
    fn offload_modes_parse_and_print() {
        for mode in [OffloadMode::Auto, OffloadMode::Off] {
            assert_eq!(mode.to_string().parse::<OffloadMode>(), Ok(mode));
        }
        assert_eq!(OffloadMode::default(), OffloadMode::Auto);
        assert!(
            "on".parse::<OffloadMode>()
                .unwrap_err()
                .contains("auto or off")
        );
    }
}
