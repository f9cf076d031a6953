//! `tun2socks exec`: one program in a private network namespace whose only way out
//! is the tunnel.
//!
//! ```text
//!  tun2socks exec (original namespaces)          PROGRAM (new net + mount namespaces,
//!    upstream sockets -> the proxy                 and a user namespace if not root)
//!    stack <- TUN descriptor <--- SCM_RIGHTS ---   lo, tun0 = default route v4 + v6
//!                                                  /etc/resolv.conf -> 198.18.0.2
//! ```
//!
//! Stage: in front of the data path. It builds the sandbox (the mechanics are
//! `tun2socks_platform::Sandbox`), hands the TUN device it gets back to the same
//! tunnel function `tun2socks` itself runs, passes SIGINT and SIGTERM on to the
//! program, stops the tunnel when the program exits and returns the program's exit
//! status. It must not fork or touch namespaces itself (that is `platform/`), and
//! must not know how the tunnel is assembled (the caller passes it in).

use std::ffi::OsString;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tun2socks_platform::{ProgramExit, Sandbox, SandboxError, SandboxSignal, SandboxSpec};

use crate::device::{
    DEFAULT_MTU, DEFAULT_TXQUEUELEN, Device, DeviceConfig, DeviceError, default_addresses,
};

/// The resolver the program is given: an address inside the default TUN network
/// (`198.18.0.0/16`), so every query enters the tunnel, where the DNS stage answers
/// it (with the tunnel's `--dns` mode).
pub const NAMESERVER: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));

/// The first resolver of the host's `resolv.conf` text that the tunnel can reach
/// through the proxy (not loopback: a local stub such as systemd-resolved's
/// 127.0.0.53 means nothing at the proxy). `exec` sends the program's DNS there when
/// no `--dns-server` is given.
pub fn host_resolver(resolv_conf: &str) -> Option<IpAddr> {
    nameservers(resolv_conf).find(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

/// The `nameserver` addresses of `resolv.conf` text, in order.
pub fn nameservers(resolv_conf: &str) -> impl Iterator<Item = IpAddr> + '_ {
    resolv_conf
        .lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<IpAddr>().ok())
}

/// The exit status of `tun2socks exec` when it fails itself, before or around the
/// program (as `env`, `timeout` and `chroot` do); 126 and 127 keep their shell
/// meaning (found but not executable; not found).
pub const EXIT_EXEC_FAILED: u8 = 125;

/// How long the program has after SIGTERM, when the tunnel failed under it, before
/// it is killed.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Resolves when the program has exited: the tunnel's shutdown signal.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// What `exec` needs besides the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecConfig {
    /// The TUN device inside the namespace: name (default `tun0`), addresses
    /// (default [`default_addresses`]), MTU (default [`DEFAULT_MTU`]) and queue length.
    pub device: DeviceConfig,
    /// The `nameserver` written into the program's `/etc/resolv.conf`.
    pub nameserver: IpAddr,
}

impl ExecConfig {
    /// `device` with the default resolver address [`NAMESERVER`].
    pub fn new(device: DeviceConfig) -> ExecConfig {
        ExecConfig {
            device,
            nameserver: NAMESERVER,
        }
    }

    /// What the platform's sandbox needs: the device settings with defaults filled in.
    fn spec(&self, command: &[OsString]) -> Result<SandboxSpec, ExecError> {
        let (program, args) = command.split_first().ok_or(ExecError::NoProgram)?;
        Ok(SandboxSpec {
            program: program.clone(),
            args: args.to_vec(),
            device: self
                .device
                .name
                .clone()
                .unwrap_or_else(|| "tun0".to_owned()),
            mtu: u32::from(self.mtu()),
            txqueuelen: self.device.txqueuelen.unwrap_or(DEFAULT_TXQUEUELEN),
            addresses: self
                .device
                .addresses
                .clone()
                .unwrap_or_else(default_addresses),
            ipv6_optional: self.device.addresses.is_none(),
            resolv_conf: Some(resolv_conf(self.nameserver)),
        })
    }

    fn mtu(&self) -> u16 {
        self.device.mtu.unwrap_or(DEFAULT_MTU)
    }
}

/// The program's `/etc/resolv.conf`.
fn resolv_conf(nameserver: IpAddr) -> String {
    format!(
        "# tun2socks exec: DNS goes through the tunnel\nnameserver {nameserver}\n\
         options timeout:2 attempts:2\n"
    )
}

/// `exec` failed; the program did not run, or ran without its tunnel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    /// No program was given.
    #[error("no program to run (tun2socks exec --proxy URL -- PROGRAM [ARGS...])")]
    NoProgram,
    /// The sandbox could not be built (namespaces, TUN device, routes, resolver).
    #[error("cannot set up the private network namespace: {0}")]
    Sandbox(#[from] SandboxError),
    /// The tokio runtime could not be started.
    #[error("cannot start the runtime: {0}")]
    Runtime(io::Error),
    /// The TUN descriptor could not be served.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The tunnel stopped while the program ran; the program was stopped too.
    #[error("the tunnel failed while the program ran ({exit:?}): {reason}")]
    Tunnel {
        /// What the tunnel reported.
        reason: String,
        /// How the program ended after it was stopped.
        exit: ProgramExit,
    },
}

/// Runs `command` (program and arguments) in a private network namespace served by
/// `tunnel`, and returns how the program ended.
///
/// Must be called before any async runtime or other thread exists (it forks; see
/// `Sandbox::spawn`); it builds its own current-thread runtime afterwards.
/// `tunnel(device, shutdown)` is the same function the plain `tun2socks` runs: it
/// must serve `device` until `shutdown` resolves, which happens when the program has
/// exited. SIGINT and SIGTERM that reach this process are passed on to the program
/// (SIGINT not while we share the terminal's foreground process group with it: the
/// terminal's Ctrl-C reaches it directly).
pub fn run<F, Fut, E>(
    config: &ExecConfig,
    command: &[OsString],
    tunnel: F,
) -> Result<ProgramExit, ExecError>
where
    F: FnOnce(Device, Shutdown) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: fmt::Display,
{
    let spec = config.spec(command)?;
    let (sandbox, tun) = Sandbox::spawn(&spec)?;
    let sandbox = Arc::new(sandbox);
    tracing::debug!(pid = sandbox.id(), device = tun.name(), "sandbox ready");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ExecError::Runtime)?;
    let result = runtime.block_on(async {
        let device = Device::from_tun(tun, config.mtu())?;
        supervise(Arc::clone(&sandbox), device, tunnel).await
    });
    let leftovers = sandbox.kill_leftovers();
    if leftovers > 0 {
        tracing::info!(
            leftovers,
            "killed what the program left running in its namespace"
        );
    }
    result
}

/// Starts the program, serves the tunnel and forwards signals until the program
/// exits; then stops the tunnel.
async fn supervise<F, Fut, E>(
    sandbox: Arc<Sandbox>,
    device: Device,
    tunnel: F,
) -> Result<ProgramExit, ExecError>
where
    F: FnOnce(Device, Shutdown) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: fmt::Display,
{
    let mut interrupt = signal(SignalKind::interrupt()).map_err(ExecError::Runtime)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(ExecError::Runtime)?;
    // Under `nohup` SIGHUP stays ignored, for the program too (it inherits that).
    let mut hangup =
        crate::signals::unless_ignored(SignalKind::hangup()).map_err(ExecError::Runtime)?;
    // SIGQUIT (Ctrl-\, or a JVM's thread dump) and SIGUSR1 / SIGUSR2 (a server's
    // "reopen your logs") are the program's too: their default action would end
    // tun2socks and with it the program. A shell's `&` without job control starts
    // SIGQUIT ignored; it stays so.
    let mut quit =
        crate::signals::unless_ignored(SignalKind::quit()).map_err(ExecError::Runtime)?;
    let mut user1 = signal(SignalKind::user_defined1()).map_err(ExecError::Runtime)?;
    let mut user2 = signal(SignalKind::user_defined2()).map_err(ExecError::Runtime)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let tunnel = tunnel(
        device,
        Box::pin(async move {
            let _ = stopped.await;
        }),
    );
    tokio::pin!(tunnel);
    // Started before the waiter exists: if this fails, nothing blocks on the
    // program, and dropping the sandbox kills and reaps it.
    sandbox.start()?;
    let waiter = Arc::clone(&sandbox);
    let mut exited = tokio::task::spawn_blocking(move || waiter.wait());

    let mut tunnel_failure: Option<String> = None;
    let mut tunnel_done = false;
    let kill_after = tokio::time::sleep(Duration::MAX);
    tokio::pin!(kill_after);
    let exit = loop {
        tokio::select! {
            joined = &mut exited => {
                let exit = joined
                    .map_err(|e| ExecError::Runtime(io::Error::other(e)))??;
                break exit;
            }
            result = &mut tunnel, if !tunnel_done => {
                tunnel_done = true;
                let reason = match result {
                    Ok(()) => "it stopped".to_owned(),
                    Err(e) => e.to_string(),
                };
                tracing::error!(%reason, "tunnel failed; stopping the program");
                tunnel_failure = Some(reason);
                forward(&sandbox, SandboxSignal::Terminate);
                kill_after.as_mut().reset(tokio::time::Instant::now() + KILL_GRACE);
            }
            () = &mut kill_after => {
                forward(&sandbox, SandboxSignal::Kill);
                kill_after.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(86_400));
            }
            _ = interrupt.recv() => {
                if sandbox.shares_terminal() {
                    tracing::debug!("SIGINT from the terminal: the program has it too");
                } else {
                    forward(&sandbox, SandboxSignal::Interrupt);
                }
            }
            _ = terminate.recv() => forward(&sandbox, SandboxSignal::Terminate),
            // A hang-up: the program decides (an editor saves, a shell exits); the
            // tunnel serves it until it exits, instead of dying and killing it.
            Some(()) = crate::signals::next(hangup.as_mut()) => {
                if sandbox.shares_terminal() {
                    tracing::debug!("SIGHUP from the terminal: the program has it too");
                } else {
                    forward(&sandbox, SandboxSignal::Hangup);
                }
            }
            Some(()) = crate::signals::next(quit.as_mut()) => {
                if sandbox.shares_terminal() {
                    tracing::debug!("SIGQUIT from the terminal: the program has it too");
                } else {
                    forward(&sandbox, SandboxSignal::Quit);
                }
            }
            _ = user1.recv() => forward(&sandbox, SandboxSignal::User1),
            _ = user2.recv() => forward(&sandbox, SandboxSignal::User2),
        }
    };
    tracing::debug!(?exit, "program exited");
    let _ = stop.send(());
    if !tunnel_done {
        if let Err(e) = (&mut tunnel).await {
            tracing::warn!(error = %e, "tunnel ended with an error after the program exited");
        }
    }
    match tunnel_failure {
        Some(reason) => Err(ExecError::Tunnel { reason, exit }),
        None => Ok(exit),
    }
}

fn forward(sandbox: &Sandbox, signal: SandboxSignal) {
    tracing::debug!(?signal, "passing the signal on to the program");
    if let Err(e) = sandbox.signal(signal) {
        tracing::warn!(error = %e, ?signal, "cannot signal the program");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_fills_in_the_device_defaults() {
        let config = ExecConfig::new(DeviceConfig {
            name: None,
            addresses: None,
            mtu: None,
            txqueuelen: None,
            offload: Default::default(),
        });
        let command: Vec<OsString> = vec!["curl".into(), "-v".into(), "http://x".into()];
        let spec = config.spec(&command).unwrap();
        assert_eq!(spec.program, "curl");
        assert_eq!(
            spec.args,
            vec![OsString::from("-v"), OsString::from("http://x")]
        );
        assert_eq!(spec.device, "tun0");
        assert_eq!(spec.mtu, u32::from(DEFAULT_MTU));
        assert_eq!(spec.txqueuelen, DEFAULT_TXQUEUELEN);
        assert_eq!(spec.addresses, default_addresses());
        let resolv = spec.resolv_conf.unwrap();
        assert!(resolv.contains("\nnameserver 198.18.0.2\n"), "{resolv}");
    }

    #[test]
    fn the_nameserver_is_routed_into_the_tunnel_but_not_ours() {
        // Inside the device's network (so even without the default route it enters
        // the TUN), and not the device's own address (which would answer locally).
        let v4 = default_addresses()[0];
        assert!(v4.contains(&NAMESERVER));
        assert_ne!(v4.addr(), NAMESERVER);
    }

    #[test]
    fn the_host_resolver_skips_local_stubs() {
        let conf = "# comment\nnameserver 127.0.0.53\nsearch x\nnameserver 198.19.2.2\n";
        assert_eq!(host_resolver(conf), Some("198.19.2.2".parse().unwrap()));
        assert_eq!(
            host_resolver("nameserver 127.0.0.53\nnameserver ::1\n"),
            None
        );
        assert_eq!(
            host_resolver("nameserver fd19:2::2 # v6\n"),
            Some("fd19:2::2".parse().unwrap())
        );
        assert_eq!(host_resolver("nameserver\nnameserverx 1.2.3.4\n"), None);
    }

    #[test]
    fn user_settings_win_and_an_empty_command_is_refused() {
        let mut device = DeviceConfig::new(1500);
        device.name = Some("t2s0".into());
        device.addresses = Some(vec!["10.9.0.1/24".parse().unwrap()]);
        let mut config = ExecConfig::new(device);
        config.nameserver = "10.9.0.53".parse().unwrap();
        let spec = config.spec(&["true".into()]).unwrap();
        assert_eq!((spec.device.as_str(), spec.mtu), ("t2s0", 1500));
        assert!(spec.args.is_empty());
        assert!(spec.resolv_conf.unwrap().contains("nameserver 10.9.0.53"));
        assert!(matches!(config.spec(&[]), Err(ExecError::NoProgram)));
    }
}
