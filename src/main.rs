//! The `tun2socks` binary: command line -> plain config; tracing; signals -> shutdown;
//! errors -> exit codes. The library never sees clap.
//!
//! Exit codes: 0 success; 1 runtime failure; 2 invalid arguments (bad URL, bad CIDR,
//! open-proxy refusal); 3 no permission (CAP_NET_ADMIN); 4 device busy (another
//! process has the TUN open, or another instance runs `--setup` in this network
//! namespace); 5 routing loop (the route to the proxy enters the TUN and neither a
//! mark nor `--interface` keeps it off). `exec` returns the program's status
//! (128 + signal if killed), or 125 if it failed itself.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cli::args::{ExecArgs, ServerArgs, TunnelArgs};
use cli::run::{run_exec, run_selftest, run_server, run_tunnel};

/// Exit code for invalid arguments or configuration.
pub(crate) const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "tun2socks",
    version,
    about = "System-wide SOCKS proxifier: a TUN device whose TCP and UDP flows go through a SOCKS proxy",
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    tunnel: TunnelArgs,

    /// Log level (off, error, warn, info, debug, trace) or a tracing filter such as
    /// tun2socks=debug (any other word is refused); overrides RUST_LOG.
    #[arg(long, global = true, value_name = "LEVEL", value_parser = cli::args::parse_log_level)]
    log_level: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the reference SOCKS4/4a/5 server.
    Server(ServerArgs),
    /// Run PROGRAM in a private network namespace whose only route is the tunnel
    /// (as root, or as an ordinary user where user namespaces are allowed).
    Exec(ExecArgs),
    /// Build test namespaces, run server and tunnel, drive TCP through every protocol
    /// variant, print a table; exit 0 only if every check passes (needs root).
    Selftest,
}

fn init_tracing(level: Option<&str>, default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(level) => EnvFilter::try_new(level),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(default)),
    }
    .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Resolves on SIGINT, SIGTERM, SIGHUP or SIGQUIT (see [`ShutdownSignals`]).
pub(crate) async fn shutdown_signal() {
    ShutdownSignals::install().received().await;
}

/// SIGINT, SIGTERM and SIGHUP, caught from the moment [`ShutdownSignals::install`]
/// runs: a signal that arrives while the tunnel is still setting up (routes, rules,
/// the device) is kept, and the tunnel stops as soon as it runs, undoing the setup,
/// instead of dying half set up with the default action and leaving rules behind.
/// SIGHUP (the terminal of an ssh session that dropped) and SIGQUIT (Ctrl-\\) stop it
/// the same way, unless it was started ignoring them (`nohup`; a shell's `&` without
/// job control ignores SIGQUIT), which stays so: their default actions (SIGQUIT's
/// dumps core) would leave `--setup`'s rules behind.
pub(crate) struct ShutdownSignals {
    signals: Option<[tokio::signal::unix::Signal; 2]>,
    hangup: Option<tokio::signal::unix::Signal>,
    quit: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    /// Installs the handlers. Must be called inside a tokio runtime.
    pub(crate) fn install() -> ShutdownSignals {
        use tokio::signal::unix::{SignalKind, signal};
        let signals = match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(int), Ok(term)) => {
                // SIGUSR1 and SIGUSR2 ask a running tunnel for its stats line
                // (`Observers`); from now on they never kill the process (whose
                // default action would leave `--setup`'s rules in place). Tokio keeps
                // a handler once installed.
                let _ = signal(SignalKind::user_defined1());
                let _ = signal(SignalKind::user_defined2());
                Some([int, term])
            }
            _ => {
                tracing::warn!("cannot install signal handlers; stop with SIGKILL");
                None
            }
        };
        let unless_ignored = |kind| tun2socks::signals::unless_ignored(kind).ok().flatten();
        ShutdownSignals {
            signals,
            hangup: unless_ignored(SignalKind::hangup()),
            quit: unless_ignored(SignalKind::quit()),
        }
    }

    /// Resolves once SIGINT, SIGTERM, SIGHUP or SIGQUIT has been received (since
    /// `install`).
    pub(crate) async fn received(self) {
        self.which().await;
    }

    /// As [`received`](Self::received), with the signal that came (its number).
    pub(crate) async fn which(self) -> i32 {
        use nix::sys::signal::Signal;
        let Some([mut int, mut term]) = self.signals else {
            return std::future::pending().await;
        };
        let (mut hangup, mut quit) = (self.hangup, self.quit);
        let signal = tokio::select! {
            _ = int.recv() => Signal::SIGINT,
            _ = term.recv() => Signal::SIGTERM,
            _ = tun2socks::signals::next(hangup.as_mut()) => Signal::SIGHUP,
            _ = tun2socks::signals::next(quit.as_mut()) => Signal::SIGQUIT,
        };
        tracing::info!("{signal}");
        signal as i32
    }
}

fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-files limit"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open-files limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-files limit"),
    }
}

/// The soft open-files limit now (after `raise_open_files_limit`, for the tunnel).
pub(crate) fn open_files_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit};
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

/// Parses the command line. The tunnel's options are refused beside a
/// subcommand (`tun2socks --proxy URL server`): they would be ignored without a
/// word. clap's `args_conflicts_with_subcommands` did that, but it also refused
/// the global `--log-level` before a subcommand (`tun2socks --log-level debug
/// exec -- PROGRAM`), so the check is made here, over the tunnel's own options.
fn parse_cli() -> Cli {
    use clap::parser::ValueSource;
    use clap::{CommandFactory, FromArgMatches};
    let mut command = Cli::command();
    let matches = command.get_matches_mut();
    if let Some((sub, _)) = matches.subcommand() {
        let tunnel = <TunnelArgs as clap::Args>::augment_args(clap::Command::new("tunnel"));
        for arg in tunnel.get_arguments() {
            let id = arg.get_id().as_str();
            if matches.try_get_raw(id).is_ok()
                && matches.value_source(id) == Some(ValueSource::CommandLine)
            {
                let name = arg
                    .get_long()
                    .map_or_else(|| id.to_owned(), |long| format!("--{long}"));
                command
                    .error(
                        clap::error::ErrorKind::ArgumentConflict,
                        format!("the subcommand '{sub}' cannot be used with '{name}'"),
                    )
                    .exit();
            }
        }
    }
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut command).exit())
}

fn main() -> ExitCode {
    let cli = parse_cli();
    // `exec` shares the terminal with its program: only warnings unless asked.
    let default_level = match &cli.command {
        Some(Command::Exec(_)) => "warn",
        _ => "info",
    };
    init_tracing(cli.log_level.as_deref(), default_level);
    // Freed TCP rings and other large buffers go back to the system instead of
    // staying resident in the heap (see the platform function).
    let fixed = tun2socks_platform::return_large_blocks();
    tracing::debug!(fixed, "allocator: large blocks mapped on their own");
    match &cli.command {
        Some(Command::Server(args)) => {
            raise_open_files_limit();
            run_server(args)
        }
        // Not for exec: its program keeps the limits it was started with.
        Some(Command::Exec(args)) => run_exec(args),
        Some(Command::Selftest) => run_selftest(),
        None => {
            raise_open_files_limit();
            run_tunnel(&cli.tunnel)
        }
    }
}
