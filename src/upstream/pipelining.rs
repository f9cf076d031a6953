//! Whether the SOCKS5 handshake is pipelined (greeting, login and request in one
//! write: one round trip to the proxy per connection instead of two or three), and,
//! in `auto` mode, finding out once whether the proxy reads a pipelined handshake.
//!
//! Most servers read the handshake through a buffer and answer each message in turn
//! (ours, Dante). Some read the greeting with one `recv`, drop whatever came with it
//! and wait for a request that never comes again (microsocks): a pipelined CONNECT to
//! them hangs until the handshake timeout. So `auto` (asked for; the default is off)
//! starts unpipelined and, once a
//! connection through the proxy has succeeded, probes it on a connection of its own
//! with a pipelined UDP ASSOCIATE: a request every server answers at once, without reaching anywhere (a
//! server without UDP answers it with a failure code, which is an answer too). An
//! answer to the request turns pipelining on for every later connection; silence or
//! any other failure turns it off for good (the safe side); a proxy that cannot be
//! reached leaves the question open for the next connection to ask again.

use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use super::{Upstream, UpstreamError, handshake_within, negotiate};
use crate::socks::{self, Address, ClientHandshake, Command, Protocol};

/// How the SOCKS5 handshake is sent (`--socks-pipeline`).
///
/// The default is `Off`: `auto`'s probe is one more connection to the proxy, with a
/// command the user's applications never sent, and a proxy (or a test harness) that
/// expects one connection per flow would see it as a flow of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pipelining {
    /// Probe the proxy once; pipeline if it reads a pipelined handshake.
    Auto,
    /// Always pipeline.
    On,
    /// Never pipeline: one message per round trip.
    #[default]
    Off,
}

impl FromStr for Pipelining {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Pipelining::Auto),
            "on" => Ok(Pipelining::On),
            "off" => Ok(Pipelining::Off),
            _ => Err(format!("{s:?} is not auto, on or off")),
        }
    }
}

/// Longest wait for the probe's answers. The request needs no outbound action from
/// the proxy, so a server that reads it answers within a round trip.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// What `auto` knows about the proxy (shared by clones of an [`Upstream`]).
#[derive(Debug)]
pub(super) struct PipelineState(AtomicU8);

const UNKNOWN: u8 = 0;
const PROBING: u8 = 1;
const SUPPORTED: u8 = 2;
const UNSUPPORTED: u8 = 3;

/// What a probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The proxy answered the pipelined request: pipeline from now on.
    Supported,
    /// It did not (silence, a closed connection, a failed greeting): never pipeline.
    Unsupported,
    /// The proxy could not be reached: ask again on a later connection.
    Unreachable,
}

impl PipelineState {
    pub(super) fn new() -> Self {
        PipelineState(AtomicU8::new(UNKNOWN))
    }

    /// Whether `auto` pipelines now; `Some(true)` only once a probe said so.
    /// `None`: nobody has asked yet.
    pub(super) fn known(&self) -> Option<bool> {
        match self.0.load(Ordering::Acquire) {
            SUPPORTED => Some(true),
            UNSUPPORTED => Some(false),
            _ => None,
        }
    }

    /// Claims the probe: true for the one caller that should run it now.
    pub(super) fn claim(&self) -> bool {
        self.0
            .compare_exchange(UNKNOWN, PROBING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub(super) fn record(&self, outcome: ProbeOutcome) {
        let state = match outcome {
            ProbeOutcome::Supported => SUPPORTED,
            ProbeOutcome::Unsupported => UNSUPPORTED,
            ProbeOutcome::Unreachable => UNKNOWN,
        };
        self.0.store(state, Ordering::Release);
    }
}

/// Reads the outcome of a pipelined handshake: answered (whatever the reply code),
/// or not.
pub(super) fn classify(result: &Result<socks::ClientStatus, UpstreamError>) -> ProbeOutcome {
    match result {
        Ok(_) => ProbeOutcome::Supported,
        Err(UpstreamError::Protocol {
            source: socks::Error::Rejected { .. },
            ..
        }) => ProbeOutcome::Supported,
        Err(e) if e.proxy_unreachable() => ProbeOutcome::Unreachable,
        Err(_) => ProbeOutcome::Unsupported,
    }
}

impl Upstream {
    /// Asks the proxy, on a connection of its own, whether it reads a pipelined
    /// handshake (see the module doc). Records and returns the outcome; `auto` mode
    /// runs it by itself on the first connection.
    pub async fn probe_pipelining(&self) -> ProbeOutcome {
        let outcome = self.probe_once().await;
        self.pipeline_state.record(outcome);
        match outcome {
            ProbeOutcome::Supported => tracing::info!(
                proxy = %self.proxy,
                "the proxy reads a pipelined SOCKS5 handshake: greeting and request now go in one write"
            ),
            ProbeOutcome::Unsupported => tracing::info!(
                proxy = %self.proxy,
                "the proxy did not answer a pipelined SOCKS5 handshake: one message per round trip"
            ),
            ProbeOutcome::Unreachable => tracing::debug!(
                proxy = %self.proxy,
                "pipelining probe: proxy unreachable; asking again later"
            ),
        }
        outcome
    }

    async fn probe_once(&self) -> ProbeOutcome {
        let unspecified = Address::Ip(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
        let hs = ClientHandshake::new(
            self.proxy.protocol,
            self.proxy.auth.clone(),
            Command::UDP_ASSOCIATE,
            unspecified,
        );
        let Ok(hs) = hs else {
            return ProbeOutcome::Unsupported;
        };
        let mut hs = hs.pipelined(true);
        let (mut stream, proxy) = match self.dial_addr().await {
            Ok(dialled) => dialled,
            Err(_) => return ProbeOutcome::Unreachable,
        };
        let mut buf = Vec::with_capacity(64);
        let limit = PROBE_TIMEOUT.min(self.options.handshake_timeout);
        let result = handshake_within(
            limit,
            proxy,
            negotiate(&mut stream, &mut hs, &mut buf, proxy),
        )
        .await;
        if let Err(e) = &result {
            tracing::debug!(error = %e, "pipelining probe");
        }
        classify(&result)
    }

    /// Is the SOCKS5 handshake pipelined now (in `auto` mode: has the probe found
    /// that the proxy reads it)?
    pub fn is_pipelined(&self) -> bool {
        match self.pipelining {
            Pipelining::On => true,
            Pipelining::Off => false,
            Pipelining::Auto => self.pipeline_state.known() == Some(true),
        }
    }

    /// Called after a handshake succeeded: in `auto` mode, while the question is open,
    /// the first caller starts the probe in the background. Only a proxy that has
    /// just served a connection is asked, so a proxy that is down or refuses
    /// everything never sees a probe; a SOCKS4 proxy (one message anyway) never does.
    pub(super) fn learn_pipelining(&self) {
        if self.pipelining == Pipelining::Auto
            && self.proxy.protocol == Protocol::Socks5
            && self.pipeline_state.claim()
        {
            let upstream = self.clone();
            tokio::spawn(async move {
                upstream.probe_pipelining().await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socks::ReplyCode;

    #[test]
    fn parses_the_three_modes() {
        assert_eq!("auto".parse(), Ok(Pipelining::Auto));
        assert_eq!("on".parse(), Ok(Pipelining::On));
        assert_eq!("off".parse(), Ok(Pipelining::Off));
        assert!("yes".parse::<Pipelining>().is_err());
        assert_eq!(Pipelining::default(), Pipelining::Off);
    }

    #[test]
    fn an_answer_of_any_code_means_supported_and_silence_does_not() {
        let proxy: SocketAddr = "192.0.2.1:1080".parse().unwrap_or_else(|_| unreachable!());
        let refused = Err(UpstreamError::Protocol {
            proxy,
            source: socks::Error::Rejected {
                reply: ReplyCode::COMMAND_NOT_SUPPORTED,
            },
        });
        assert_eq!(classify(&refused), ProbeOutcome::Supported);
        let silent = Err(UpstreamError::HandshakeTimeout {
            proxy,
            timeout: PROBE_TIMEOUT,
        });
        assert_eq!(classify(&silent), ProbeOutcome::Unsupported);
        let closed = Err(UpstreamError::Closed {
            proxy,
            after_request: false,
        });
        assert_eq!(classify(&closed), ProbeOutcome::Unsupported);
        let down = Err(UpstreamError::Dial {
            proxy,
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        });
        assert_eq!(classify(&down), ProbeOutcome::Unreachable);
    }

    #[test]
    fn one_caller_claims_the_probe_and_unreachable_reopens_the_question() {
        let state = PipelineState::new();
        assert_eq!(state.known(), None);
        assert!(state.claim());
        assert!(!state.claim(), "a second caller must not probe too");
        state.record(ProbeOutcome::Unreachable);
        assert_eq!(state.known(), None);
        assert!(state.claim());
        state.record(ProbeOutcome::Supported);
        assert_eq!(state.known(), Some(true));
        assert!(!state.claim());
        state.record(ProbeOutcome::Unsupported);
        assert_eq!(state.known(), Some(false));
    }
}
