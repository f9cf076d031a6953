//! The binary's commands run: the tunnel (its queues, setup and counters), `exec`,
//! the server and `selftest`; errors become exit codes.

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tun2socks::device::{Device, DeviceError};
use tun2socks::dns::DnsMode;
use tun2socks::exec::{self, ExecConfig};
use tun2socks::metrics::{Metrics, Observers};
use tun2socks::server;
use tun2socks::setup::{self, SetupError};
use tun2socks::stack::queues::{Queue, QueueRuntime, StopFlag};
use tun2socks::stack::{self, StackConfig};
use tun2socks::upstream::Upstream;
use tun2socks_platform::{Tun, TunError};

use super::args::{ExecArgs, Observe, ServerArgs, TunnelArgs};
use crate::{EXIT_USAGE, ShutdownSignals, shutdown_signal};

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

pub(crate) fn run_server(args: &ServerArgs) -> ExitCode {
    let config = match args.config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("tun2socks server: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let mut listeners = Vec::new();
            for addr in &args.listen {
                let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                    std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
                })?;
                listeners.push(listener);
            }
            server::run(listeners, config, shutdown_signal()).await
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tun2socks server: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Exit code when opening the TUN needs privileges we lack.
const EXIT_NO_PERMISSION: u8 = 3;
/// Exit code when the TUN device is held by another process.
const EXIT_BUSY: u8 = 4;
/// Exit code when the connection to the proxy would loop through the TUN.
const EXIT_LOOP: u8 = 5;

fn setup_exit_code(error: &SetupError) -> u8 {
    match error {
        SetupError::Busy { .. } => EXIT_BUSY,
        SetupError::Loop { .. } => EXIT_LOOP,
        error if error.permission_denied() => EXIT_NO_PERMISSION,
        _ => 1,
    }
}

fn device_exit_code(error: &DeviceError) -> u8 {
    match error {
        error if error.permission_denied() => EXIT_NO_PERMISSION,
        DeviceError::Open(TunError::Busy { .. }) => EXIT_BUSY,
        DeviceError::Open(TunError::NameTooLong { .. } | TunError::InvalidName { .. }) => {
            EXIT_USAGE
        }
        _ => 1,
    }
}

/// Warns about each fake-IP pool too small for more than a few names.
fn warn_small_pools(config: &StackConfig) {
    for (pool, size) in config.dns.small_pools() {
        tracing::warn!(
            %pool,
            addresses = size,
            "a small fake-IP pool: a name keeps its address until unused for the answer's TTL and a grace period (6 min by default), so past this many names further ones are answered SERVFAIL until one is free"
        );
    }
}

pub(crate) fn run_tunnel(args: &TunnelArgs) -> ExitCode {
    let (device_config, stack_config, upstream) = match args.configs() {
        Ok(configs) => configs,
        Err(e) => {
            eprintln!("tun2socks: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    warn_small_pools(&stack_config);
    let observe = match args.observe() {
        Ok(observe) => observe,
        Err(e) => {
            eprintln!("tun2socks: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // One thread per queue: a queue's stack and every flow it accepted share that
    // thread, so no lock is contended on the TCP path and no packet crosses threads.
    // The further queues' runtimes are built now, before the device exists, so that
    // once it is up the process holds all its descriptors; those a device without
    // multi_queue leaves unused are dropped after `block_on` (never inside it).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tun2socks: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut runtimes: Vec<_> = match (1..args.threads()).map(|_| QueueRuntime::new()).collect() {
        Ok(runtimes) => runtimes,
        Err(e) => {
            eprintln!("tun2socks: cannot start the runtimes: {e}");
            return ExitCode::FAILURE;
        }
    };
    let setup_config = args.setup_config();
    runtime.block_on(async {
        // Before any change to the system, so that a signal during setup still
        // undoes it.
        let stop = ShutdownSignals::install().received();
        let mut stop = std::pin::pin!(stop);
        let lock = match setup_config.as_ref().map(|c| setup::begin(&args.device, c)) {
            Some(Err(e)) => {
                eprintln!("tun2socks: {e}");
                return ExitCode::from(setup_exit_code(&e));
            }
            lock => lock.and_then(Result::ok),
        };
        let (device, queues) = match Device::open_queues(&device_config, runtimes.len() + 1) {
            Ok((device, queues)) => {
                let runtimes = runtimes.drain(..queues.len());
                (device, queues.into_iter().zip(runtimes).collect())
            }
            Err(e) => {
                eprintln!("tun2socks: {e}");
                return ExitCode::from(device_exit_code(&e));
            }
        };
        // A name lookup may take seconds; a signal meanwhile ends the run here
        // (nothing routed yet; the device's guards undo its changes).
        tokio::select! {
            () = resolve_proxy(&upstream) => {}
            () = stop.as_mut() => return ExitCode::SUCCESS,
        }
        let lock = lock.zip(setup_config.as_ref());
        let routing = match setup::start(&device, &upstream, lock) {
            Ok(routing) => routing,
            Err(e) => {
                eprintln!("tun2socks: {e}");
                return ExitCode::from(setup_exit_code(&e));
            }
        };
        let _routing = routing; // undone when this block ends, after the stack stopped
        let mut upstream = upstream;
        let fake_pools = match stack_config.dns.mode {
            DnsMode::FakeIp => stack_config.dns.fake_pools.clone(),
            _ => Vec::new(),
        };
        upstream.guard_loops(device.ifindex(), device.name(), &fake_pools);
        let tunnel = Tunnel {
            stack_config,
            upstream,
            observe,
        };
        match serve(device, queues, tunnel, stop).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tun2socks: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Looks the proxy's name up, once, at start; again later only if every address fails:
/// once the host's DNS goes through the tunnel, a lookup per flow would loop.
async fn resolve_proxy(upstream: &Upstream) {
    if let Err(e) = upstream.resolve().await {
        tracing::warn!(error = %e, "cannot resolve the proxy yet; will retry with backoff");
    }
}

/// What every queue's stack runs with.
struct Tunnel {
    stack_config: StackConfig,
    upstream: Upstream,
    observe: Observe,
}

/// The tunnel, the same for `tun2socks` and `tun2socks exec`: serves `device` (on
/// this thread's runtime) and each of the further `queues` of it (each on a thread
/// and runtime of its own) until `shutdown` resolves or a queue fails; then stops
/// them all and logs the counters of all of them.
async fn serve(
    device: Device,
    queues: Vec<(Tun, QueueRuntime)>,
    tunnel: Tunnel,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let Tunnel {
        stack_config,
        upstream,
        observe,
    } = tunnel;
    if upstream.proxy_addrs().is_empty() {
        resolve_proxy(&upstream).await;
    }
    tracing::info!(
        proxy = %upstream.proxy(), device = device.name(), mtu = device.mtu(),
        threads = queues.len() + 1, "tunnel running"
    );
    let counters = Arc::new(Metrics::new());
    let side = Observers::start(&counters, observe.interval, observe.listener)
        .map_err(|e| format!("metrics endpoint: {e}"))?;
    let shared = Arc::new(stack::Shared::new(&stack_config, counters.clone()));
    // Set when any queue stops (shutdown, or its device failed): all stop.
    let stop = StopFlag::default();
    let mtu = device.mtu();
    let offload = device.offload();
    // The attached device keeps its configuration until every queue has stopped.
    let mut device = device;
    let guards = device.take_guards();
    let removal = device.take_removal();
    let name = removal.name().to_owned();
    let removed = std::sync::atomic::AtomicBool::new(false);
    let mut workers = Vec::with_capacity(queues.len());
    for (index, (tun, runtime)) in queues.into_iter().enumerate() {
        let queue = Queue {
            queue: index + 1,
            tun,
            runtime,
            mtu,
            offload,
            config: stack_config.clone(),
            upstream: upstream.clone(),
            shared: shared.clone(),
            stop: stop.clone(),
        };
        match queue.spawn() {
            Ok(worker) => workers.push(worker),
            Err(e) => {
                tracing::warn!(queue = index + 1, error = %e, "cannot start a queue thread; serving with fewer");
            }
        }
    }
    let both = async {
        tokio::select! {
            () = shutdown => {}
            () = stop.stopped() => {}
            () = removal.gone() => {
                tracing::error!(device = %name, "the TUN device was deleted or moved to another network namespace; stopping");
                removed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    };
    let trim = tokio::spawn(release_startup_code());
    let first = stack::run_queue(device, stack_config, upstream, shared, 0, both).await;
    trim.abort();
    stop.set();
    let mut result = first
        .map(|stats| stats.ring_bytes)
        .map_err(|e| format!("device failed: {e}"));
    for worker in workers {
        let joined = tokio::task::spawn_blocking(move || worker.join()).await;
        let failed = match joined {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(e))) => Some(e.to_string()),
            Ok(Err(_)) | Err(_) => Some("a queue thread panicked".to_owned()),
        };
        if let (Some(e), Ok(_)) = (failed, &result) {
            result = Err(e);
        }
    }
    side.stop().await;
    if removed.load(std::sync::atomic::Ordering::Relaxed) {
        guards.forget();
        result = Err(format!(
            "the TUN device {name} was deleted or moved to another network namespace"
        ));
    } else {
        drop(guards);
    }
    let ring_bytes = result?;
    let stats = stack::StackStats {
        ring_bytes,
        ..counters.snapshot()
    };
    tracing::info!(stats = %stats, "stopped");
    Ok(())
}

/// Once the stack runs, gives back the pages of code that start-up touched (parsing,
/// device and route setup, runtime construction): an idle tunnel runs a few of them,
/// and the rest would otherwise stay counted in its resident memory. They remain in
/// the page cache and come back by a minor fault when used.
async fn release_startup_code() {
    tokio::time::sleep(RELEASE_CODE_AFTER).await;
    match tun2socks_platform::release_code() {
        Ok(bytes) => tracing::debug!(bytes, "released start-up code pages"),
        Err(e) => tracing::debug!(error = %e, "cannot release start-up code pages"),
    }
}

/// How long after start the tunnel releases its start-up code ([`release_startup_code`]).
const RELEASE_CODE_AFTER: Duration = Duration::from_millis(250);

/// `tun2socks exec`: forks the sandbox before any runtime exists (`exec::run`).
pub(crate) fn run_exec(args: &ExecArgs) -> ExitCode {
    if args.tunnel.setup() {
        eprintln!(
            "tun2socks exec: --setup does not apply to exec: the program's private namespace \
             is routed through the tunnel by itself, and the host's routes stay as they are"
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let (device_config, stack_config, upstream) = match args.tunnel.configs() {
        Ok(configs) => configs,
        Err(e) => {
            eprintln!("tun2socks exec: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    warn_small_pools(&stack_config);
    let mut stack_config = stack_config;
    if stack_config.dns.server.is_none() && stack_config.dns.mode != DnsMode::FakeIp {
        // The program's resolv.conf points into the tunnel; its queries go on to the
        // host's own resolver unless --dns-server says otherwise.
        let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        stack_config.dns.server = exec::host_resolver(&conf);
        if stack_config.dns.server.is_none() {
            tracing::warn!(
                "no --dns-server and no usable nameserver in /etc/resolv.conf: names will not \
                 resolve inside (use --dns-server IP or --dns fake-ip)"
            );
        }
    }
    let observe = match args.tunnel.observe() {
        Ok(observe) => observe,
        Err(e) => {
            eprintln!("tun2socks exec: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let config = ExecConfig::new(device_config);
    let tunnel = Tunnel {
        stack_config,
        upstream,
        observe,
    };
    // The sandbox hands over one descriptor, opened in its namespace: one queue.
    let tunnel = |device, stop| serve(device, Vec::new(), tunnel, stop);
    match exec::run(&config, &args.command, tunnel) {
        Ok(exit) => ExitCode::from(exit.shell_status()),
        Err(e) => {
            eprintln!("tun2socks exec: {e}");
            ExitCode::from(exec::EXIT_EXEC_FAILED)
        }
    }
}

/// On SIGINT, SIGTERM, SIGHUP or SIGQUIT (caught from here on), the selftest's
/// namespaces go, with the server, tunnels and resolvers running in them, and it
/// exits 128 + the signal. Its checks run on this thread and hold their guards, so a
/// thread of its own waits for the signal.
fn stop_selftest_on_signal() {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!(
                "tun2socks selftest: no signal handling ({e}); stopped, it leaves its namespaces"
            );
            return;
        }
    };
    let signals = {
        let _inside = runtime.enter();
        ShutdownSignals::install()
    };
    std::thread::spawn(move || {
        let signal = runtime.block_on(signals.which());
        eprintln!("tun2socks selftest: stopped by a signal; removing its namespaces");
        tun2socks::testbed::stale::remove_own_and_exit(128 + signal);
    });
}

pub(crate) fn run_selftest() -> ExitCode {
    let binary = match std::env::current_exe() {
        Ok(path) => path,
        Err(e) => {
            eprintln!("tun2socks selftest: cannot find this executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "tun2socks selftest: namespaces, reference server and tunnel ({})",
        binary.display()
    );
    stop_selftest_on_signal();
    let result = tun2socks::selftest::run(&binary, |check| {
        let mark = if check.ok { "ok  " } else { "FAIL" };
        eprintln!("  {mark} {} ({})", check.name, check.detail);
    });
    match result {
        Ok(report) => {
            println!();
            println!("{report}");
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!("tun2socks selftest: {e} (run it as root: it creates network namespaces)");
            ExitCode::from(EXIT_NO_PERMISSION)
        }
        Err(e) => {
            eprintln!("tun2socks selftest: setup failed: {e}");
            ExitCode::FAILURE
        }
    }
}
