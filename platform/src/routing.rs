//! Routes and policy rules as plain data, the same on every OS: what
//! [`Routing`](crate::Routing) adds, deletes and undoes. Each has a one-line text form
//! (`Display`, parsed back by `FromStr`) close to `ip route` / `ip rule` syntax, used
//! in logs and in the state file from which a later start removes a crashed run's
//! leftovers.
//!
//! ```text
//! route 0.0.0.0/0 dev 7 table 727
//! rule inet6 pref 7270 not fwmark 0x2d7 lookup 727
//! rule inet pref 7269 lookup 254 suppress_prefixlength 0
//! rule inet pref 7260 to 198.19.2.0/24 lookup 254
//! ```
//!
//! This module must not talk to the OS.

use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;

/// The main routing table (`RT_TABLE_MAIN`).
pub const MAIN_TABLE: u32 = 254;

/// An address family: IPv4 or IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4 (`inet`).
    V4,
    /// IPv6 (`inet6`).
    V6,
}

impl Family {
    /// The family of a network.
    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "inet",
            Family::V6 => "inet6",
        })
    }
}

/// A unicast route to `destination` out of interface `ifindex`, with no gateway (a
/// point-to-point device such as a TUN needs none), in routing table `table`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route {
    /// The destination network; `0.0.0.0/0` or `::/0` for a default route.
    pub destination: IpNet,
    /// The output interface.
    pub ifindex: u32,
    /// The routing table (1..=2^32-1; [`MAIN_TABLE`] is 254).
    pub table: u32,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "route {} dev {} table {}",
            self.destination, self.ifindex, self.table
        )
    }
}

/// A policy rule (`ip rule`): packets of `family` that match every selector set here
/// are looked up in `table`; with `suppress_prefix_len`, an answer whose prefix is
/// that short or shorter is ignored and the next rule is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rule {
    /// IPv4 or IPv6 rules.
    pub family: Family,
    /// The rule's priority (`pref`): lower runs first.
    pub priority: u32,
    /// Match this source network only (`from NET`).
    pub source: Option<IpNet>,
    /// Match this destination network only (`to NET`).
    pub destination: Option<IpNet>,
    /// Match this transport protocol only (`ipproto tcp|udp|N`; Linux 4.17+).
    pub ip_protocol: Option<u8>,
    /// Match this destination port only (`dport N`; with `ip_protocol`).
    pub destination_port: Option<u16>,
    /// Match packets carrying this firewall mark (`fwmark M`, full mask).
    pub fwmark: Option<u32>,
    /// Invert the match (`not`): match what the selectors do not.
    pub invert: bool,
    /// The table to look up.
    pub table: u32,
    /// Ignore answers with a prefix this short or shorter (`suppress_prefixlength N`).
    pub suppress_prefix_len: Option<u32>,
}

impl Rule {
    /// `pref PRIORITY lookup TABLE` for `family`, with no selector.
    pub fn lookup(family: Family, priority: u32, table: u32) -> Rule {
        Rule {
            family,
            priority,
            source: None,
            destination: None,
            ip_protocol: None,
            destination_port: None,
            fwmark: None,
            invert: false,
            table,
            suppress_prefix_len: None,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule {} pref {}", self.family, self.priority)?;
        if self.invert {
            f.write_str(" not")?;
        }
        if let Some(source) = self.source {
            write!(f, " from {source}")?;
        }
        if let Some(destination) = self.destination {
            write!(f, " to {destination}")?;
        }
        match self.ip_protocol {
            Some(6) => f.write_str(" ipproto tcp")?,
            Some(17) => f.write_str(" ipproto udp")?,
            Some(other) => write!(f, " ipproto {other}")?,
            None => {}
        }
        if let Some(port) = self.destination_port {
            write!(f, " dport {port}")?;
        }
        if let Some(mark) = self.fwmark {
            write!(f, " fwmark {mark:#x}")?;
        }
        write!(f, " lookup {}", self.table)?;
        if let Some(len) = self.suppress_prefix_len {
            write!(f, " suppress_prefixlength {len}")?;
        }
        Ok(())
    }
}

/// One routing change: a route or a policy rule. Its text form is the route's or the
/// rule's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RoutingEntry {
    /// A route.
    Route(Route),
    /// A policy rule.
    Rule(Rule),
}

impl fmt::Display for RoutingEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoutingEntry::Route(route) => route.fmt(f),
            RoutingEntry::Rule(rule) => rule.fmt(f),
        }
    }
}

impl FromStr for RoutingEntry {
    type Err = ParseError;

    fn from_str(line: &str) -> Result<RoutingEntry, ParseError> {
        if line.trim_start().starts_with("route") {
            line.parse().map(RoutingEntry::Route)
        } else {
            line.parse().map(RoutingEntry::Rule)
        }
    }
}

/// A line that is not the text form of a [`Route`] or [`Rule`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a route or rule line ({reason}): {line:?}")]
pub struct ParseError {
    /// The line.
    pub line: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Splits `line` into words after `keyword`, or fails.
fn words<'a>(line: &'a str, keyword: &str) -> Result<Vec<&'a str>, &'static str> {
    let mut words = line.split_whitespace();
    if words.next() != Some(keyword) {
        return Err("wrong keyword");
    }
    Ok(words.collect())
}

fn number(word: Option<&&str>) -> Result<u32, &'static str> {
    let word = word.ok_or("a number is missing")?;
    match word.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => word.parse(),
    }
    .map_err(|_| "bad number")
}

fn net(word: Option<&&str>) -> Result<IpNet, &'static str> {
    word.ok_or("a network is missing")?
        .parse()
        .map_err(|_| "bad network")
}

impl FromStr for Route {
    type Err = ParseError;

    fn from_str(line: &str) -> Result<Route, ParseError> {
        let parse = || -> Result<Route, &'static str> {
            let words = words(line, "route")?;
            match words.as_slice() {
                [destination, "dev", ifindex, "table", table] => Ok(Route {
                    destination: net(Some(destination))?,
                    ifindex: number(Some(ifindex))?,
                    table: number(Some(table))?,
                }),
                _ => Err("expected `route NET dev IFINDEX table N`"),
            }
        };
        parse().map_err(|reason| ParseError {
            line: line.to_owned(),
            reason,
        })
    }
}

impl FromStr for Rule {
    type Err = ParseError;

    fn from_str(line: &str) -> Result<Rule, ParseError> {
        let parse = || -> Result<Rule, &'static str> {
            let words = words(line, "rule")?;
            let family = match words.first() {
                Some(&"inet") => Family::V4,
                Some(&"inet6") => Family::V6,
                _ => return Err("expected inet or inet6"),
            };
            let mut rule = Rule::lookup(family, 0, 0);
            let (mut priority, mut table) = (false, false);
            let mut i = 1;
            while let Some(word) = words.get(i) {
                let value = words.get(i + 1);
                i += 2;
                match *word {
                    "pref" => {
                        rule.priority = number(value)?;
                        priority = true;
                    }
                    "not" => {
                        rule.invert = true;
                        i -= 1;
                    }
                    "from" => rule.source = Some(net(value)?),
                    "to" => rule.destination = Some(net(value)?),
                    "ipproto" => {
                        rule.ip_protocol = Some(match value {
                            Some(&"tcp") => 6,
                            Some(&"udp") => 17,
                            _ => u8::try_from(number(value)?).map_err(|_| "bad protocol")?,
                        });
                    }
                    "dport" => {
                        rule.destination_port =
                            Some(u16::try_from(number(value)?).map_err(|_| "bad port")?);
                    }
                    "fwmark" => rule.fwmark = Some(number(value)?),
                    "lookup" => {
                        rule.table = number(value)?;
                        table = true;
                    }
                    "suppress_prefixlength" => rule.suppress_prefix_len = Some(number(value)?),
                    _ => return Err("unknown word"),
                }
            }
            let other = |net: Option<IpNet>| net.is_some_and(|net| Family::of(&net) != family);
            if other(rule.source) {
                Err("source of the other family")
            } else if other(rule.destination) {
                Err("destination of the other family")
            } else if !(priority && table) {
                Err("pref and lookup are required")
            } else {
                Ok(rule)
            }
        };
        parse().map_err(|reason| ParseError {
            line: line.to_owned(),
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_forms_round_trip() {
        let routes = [
            Route {
                destination: "0.0.0.0/0".parse().unwrap(),
                ifindex: 7,
                table: 727,
            },
            Route {
                destination: "::/0".parse().unwrap(),
                ifindex: 4_000_000_000,
                table: u32::MAX,
            },
        ];
        for route in routes {
            assert_eq!(route.to_string().parse::<Route>(), Ok(route));
        }
        let mut not_marked = Rule::lookup(Family::V6, 7270, 727);
        not_marked.invert = true;
        not_marked.fwmark = Some(0x2d7);
        let mut suppress = Rule::lookup(Family::V4, 7269, MAIN_TABLE);
        suppress.suppress_prefix_len = Some(0);
        let mut to = Rule::lookup(Family::V4, 7260, MAIN_TABLE);
        to.destination = Some("198.19.2.0/24".parse().unwrap());
        let mut dns = Rule::lookup(Family::V4, 7266, 727);
        dns.ip_protocol = Some(17);
        dns.destination_port = Some(53);
        assert_eq!(
            dns.to_string(),
            "rule inet pref 7266 ipproto udp dport 53 lookup 727"
        );
        let mut other = dns;
        other.ip_protocol = Some(132);
        let mut from = Rule::lookup(Family::V6, 7265, MAIN_TABLE);
        from.source = Some("fd19:1::1/128".parse().unwrap());
        assert_eq!(
            from.to_string(),
            "rule inet6 pref 7265 from fd19:1::1/128 lookup 254"
        );
        assert!(
            "rule inet pref 1 from fd19:1::1/128 lookup 254"
                .parse::<Rule>()
                .is_err()
        );
        assert_eq!(
            not_marked.to_string(),
            "rule inet6 pref 7270 not fwmark 0x2d7 lookup 727"
        );
        assert_eq!(
            suppress.to_string(),
            "rule inet pref 7269 lookup 254 suppress_prefixlength 0"
        );
        for rule in [not_marked, suppress, to, from, dns, other] {
            assert_eq!(rule.to_string().parse::<Rule>(), Ok(rule));
            let entry = RoutingEntry::Rule(rule);
            assert_eq!(entry.to_string().parse::<RoutingEntry>(), Ok(entry));
        }
        let entry = RoutingEntry::Route(routes[0]);
        assert_eq!(entry.to_string().parse::<RoutingEntry>(), Ok(entry));
    }

    #[test]
    fn bad_lines_are_errors() {
        for line in [
            "",
            "route",
            "route ::/0 dev x table 1",
            "route ::/0 dev 1 table",
            "route ::/0 dev 1 table 1 extra",
            "rule",
            "rule inet",
            "rule inet pref 1",
            "rule inet lookup 1",
            "rule inet pref 1 lookup",
            "rule inet pref 1 lookup 2 to ::/0",
            "rule inet pref 1 lookup 2 bogus 3",
            "rule ipx pref 1 lookup 2",
            "rule inet pref 0xzz lookup 2",
        ] {
            assert!(
                line.parse::<Rule>().is_err() && line.parse::<Route>().is_err(),
                "{line:?}"
            );
        }
    }
}
