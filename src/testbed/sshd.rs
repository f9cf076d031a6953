//! OpenSSH as the SOCKS upstream, the way most users of a tunnel run it: `sshd` in
//! the proxy namespace and `ssh -D 127.0.0.1:PORT -N` in the app namespace, so the
//! tunnel's `--proxy socks5://127.0.0.1:PORT` is the ssh client's dynamic forward,
//! and every connection leaves the proxy namespace from sshd.
//!
//! Everything it needs is made per instance in a temporary directory: a host key, a
//! user key (for root, allowed only to forward ports), `authorized_keys` and an
//! `sshd_config` (no PAM, no passwords, `StrictModes no`). The one change outside
//! that directory is `/run/sshd`, sshd's privilege separation directory, created if
//! missing and left in place (it is the system's own).
//!
//! What `ssh -D` is as a SOCKS server: SOCKS4, SOCKS4a and SOCKS5 CONNECT, names
//! resolved by sshd; no authentication, no BIND, no UDP ASSOCIATE. It answers a
//! CONNECT once sshd has connected; when sshd could not (or for UDP ASSOCIATE) it
//! closes the connection without any reply, so no SOCKS error code says why.

use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::namespace::Namespace;
use super::process::Process;
use super::skip::Skip;
use super::stale::unique_id;
use super::topology::{PROXY_V4, PROXY_V6};
use super::wait::wait_for_tcp;
use super::{context, run_checked};

/// The port sshd listens on in the proxy namespace.
pub const SSH_PORT: u16 = 22;
/// The port of the ssh client's dynamic forward (the SOCKS server), on the app
/// namespace's loopback.
pub const SOCKS_PORT: u16 = 1080;
/// sshd's privilege separation directory (Debian's build); it must exist.
pub const PRIVSEP_DIR: &str = "/run/sshd";

/// How long sshd gets to listen, and the client to log in and listen.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the client is checked while it logs in.
const POLL: Duration = Duration::from_millis(20);
/// Where sshd is looked for when it is not in `PATH` (root's `PATH` has it, a
/// user's often not).
const SSHD_FALLBACK: &str = "/usr/sbin/sshd";

/// sshd in the proxy namespace and `ssh -D` in the app namespace, logged in with a
/// generated key. Dropping it stops the client, then sshd, then removes the keys and
/// configuration (fields drop in order).
#[derive(Debug)]
pub struct SshProxy {
    client: Process,
    sshd: Process,
    _dir: TempDir,
}

impl SshProxy {
    /// Starts sshd in `proxy` on the proxy's app-side addresses (v4 and v6, port
    /// [`SSH_PORT`]), then `ssh -D 127.0.0.1:SOCKS_PORT -N root@198.19.1.2` in
    /// `app`; returns once the client's SOCKS port listens (so it has logged in).
    /// An error carries the logs of both.
    pub fn start(proxy: &Namespace, app: &Namespace) -> io::Result<SshProxy> {
        let sshd_program = sshd_path().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "sshd is neither in PATH nor at /usr/sbin/sshd (Debian: openssh-server)",
            )
        })?;
        let dir = TempDir::create()?;
        let files = Files::generate(&dir.0)?;
        fs::create_dir_all(PRIVSEP_DIR).map_err(context(PRIVSEP_DIR))?;
        let sshd = start_sshd(proxy, &sshd_program, &files)?;
        let client = start_client(app, &files, &sshd)?;
        Ok(SshProxy {
            client,
            sshd,
            _dir: dir,
        })
    }

    /// Where the SOCKS server listens in the app namespace: `127.0.0.1:1080`.
    pub fn socks_addr() -> SocketAddr {
        (Ipv4Addr::LOCALHOST, SOCKS_PORT).into()
    }

    /// `socks5://127.0.0.1:1080`, for the tunnel's `--proxy` in the app namespace.
    pub fn url() -> String {
        format!("socks5://{}", SshProxy::socks_addr())
    }

    /// The `ssh -D` process: its log has "channel N: open failed" lines.
    pub fn client(&self) -> &Process {
        &self.client
    }

    /// The sshd process: its log (level DEBUG1) names every forwarded destination
    /// (`server_request_direct_tcpip: ... to HOST port PORT`).
    pub fn sshd(&self) -> &Process {
        &self.sshd
    }
}

/// Whether OpenSSH's server, client and key generator are installed: `Ok`, or the
/// [`Skip`] that names what is missing (for `require_or_skip!`).
pub fn require_openssh(what: &str) -> Result<(), Skip> {
    if sshd_path().is_none() {
        return Err(Skip {
            what: what.to_owned(),
            needs: "the program `sshd` (openssh-server) in PATH or /usr/sbin".to_owned(),
        });
    }
    super::skip::require_program("ssh", what)?;
    super::skip::require_program("ssh-keygen", what)
}

/// sshd's absolute path (it refuses to run from a relative one): the first in
/// `PATH`, else `/usr/sbin/sshd` if it exists.
pub fn sshd_path() -> Option<PathBuf> {
    let in_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("sshd"))
            .find(|candidate| candidate.is_absolute() && candidate.is_file())
    });
    in_path.or_else(|| {
        let fallback = PathBuf::from(SSHD_FALLBACK);
        fallback.is_file().then_some(fallback)
    })
}

/// The sshd configuration for a directory holding `hostkey`, `authorized_keys`:
/// listen on the proxy's app-side addresses, public keys only (root allowed, no
/// PAM), TCP forwarding on, logged at DEBUG1 (one line per forwarded destination).
pub fn sshd_config(dir: &Path) -> String {
    let file = |name: &str| dir.join(name).display().to_string();
    format!(
        "ListenAddress {PROXY_V4}:{SSH_PORT}\n\
         ListenAddress [{PROXY_V6}]:{SSH_PORT}\n\
         HostKey {host_key}\n\
         PidFile {pid_file}\n\
         AuthorizedKeysFile {authorized_keys}\n\
         PermitRootLogin prohibit-password\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         StrictModes no\n\
         UsePAM no\n\
         UseDNS no\n\
         AllowTcpForwarding yes\n\
         X11Forwarding no\n\
         PrintMotd no\n\
         MaxSessions 100\n\
         MaxStartups 100\n\
         LogLevel DEBUG1\n",
        host_key = file("hostkey"),
        pid_file = file("sshd.pid"),
        authorized_keys = file("authorized_keys"),
    )
}

/// The files of one instance, all in its temporary directory.
struct Files {
    config: PathBuf,
    user_key: PathBuf,
}

impl Files {
    /// Generates the host key and the user key (ed25519, no passphrase), writes
    /// `authorized_keys` (the user key, restricted to port forwarding) and the
    /// configuration.
    fn generate(dir: &Path) -> io::Result<Files> {
        let host_key = dir.join("hostkey");
        let user_key = dir.join("userkey");
        keygen(&host_key)?;
        keygen(&user_key)?;
        let public = dir.join("userkey.pub");
        let key = fs::read_to_string(&public).map_err(context(public.display()))?;
        let authorized = dir.join("authorized_keys");
        fs::write(&authorized, format!("restrict,port-forwarding {key}"))
            .map_err(context(authorized.display()))?;
        let config = dir.join("sshd_config");
        fs::write(&config, sshd_config(dir)).map_err(context(config.display()))?;
        Ok(Files { config, user_key })
    }
}

/// `ssh-keygen -q -t ed25519 -N '' -f PATH` (it writes `PATH` mode 0600 and
/// `PATH.pub`).
fn keygen(path: &Path) -> io::Result<()> {
    let mut command = Command::new("ssh-keygen");
    command
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "t2s-testbed", "-f"])
        .arg(path);
    run_checked(command).map(drop)
}

/// Checks the configuration (`sshd -t`: its complaint is the error), then runs
/// `sshd -D -e` in `ns` (in the foreground, logging to the process log) and waits
/// for both listeners.
fn start_sshd(ns: &Namespace, program: &Path, files: &Files) -> io::Result<Process> {
    let mut test = ns.command(program);
    test.arg("-t").arg("-f").arg(&files.config);
    run_checked(test).map_err(context("sshd refused its configuration"))?;
    let mut command = ns.command(program);
    command.args(["-D", "-e", "-f"]).arg(&files.config);
    let mut sshd = ns.spawn(command)?;
    for addr in [
        SocketAddr::from((PROXY_V4, SSH_PORT)),
        SocketAddr::from((PROXY_V6, SSH_PORT)),
    ] {
        if let Err(e) = wait_for_tcp(ns, addr, START_TIMEOUT) {
            let _ = sshd.try_wait();
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "sshd did not listen: {e}\n{}",
                    sshd.log().unwrap_or_default()
                ),
            ));
        }
    }
    Ok(sshd)
}

/// Runs `ssh -N -D 127.0.0.1:SOCKS_PORT root@PROXY_V4` in `ns` with the user key,
/// no configuration file, no host key check and no prompt, and waits until the
/// forward listens; fails with both logs if the client exits first or times out.
fn start_client(ns: &Namespace, files: &Files, sshd: &Process) -> io::Result<Process> {
    let mut command = ns.command("ssh");
    command
        .args(["-F", "/dev/null", "-N", "-D"])
        .arg(SshProxy::socks_addr().to_string())
        .arg("-i")
        .arg(&files.user_key)
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "ConnectTimeout=5",
            "-p",
            &SSH_PORT.to_string(),
        ])
        .arg(format!("root@{PROXY_V4}"));
    let mut client = ns.spawn(command)?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        // A zero timeout: one look at the listeners.
        if wait_for_tcp(ns, SshProxy::socks_addr(), Duration::ZERO).is_ok() {
            return Ok(client);
        }
        let exited = client.try_wait()?;
        if exited.is_some() || Instant::now() >= deadline {
            let why = exited.map_or_else(
                || format!("did not listen within {START_TIMEOUT:?}"),
                |status| format!("exited with {status}"),
            );
            return Err(io::Error::other(format!(
                "ssh -D {why}\n--- ssh:\n{}\n--- sshd:\n{}",
                client.log().unwrap_or_default(),
                sshd.log().unwrap_or_default()
            )));
        }
        std::thread::sleep(POLL);
    }
}

/// A directory under the system's temporary directory, removed on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn create() -> io::Result<TempDir> {
        let path =
            std::env::temp_dir().join(format!("t2s-sshd-{}-{}", std::process::id(), unique_id()));
        fs::create_dir_all(&path).map_err(context(path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _gone_already = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_listens_on_the_proxy_and_keeps_files_in_its_directory() {
        let config = sshd_config(Path::new("/tmp/t2s-sshd-x"));
        for line in [
            "ListenAddress 198.19.1.2:22",
            "ListenAddress [fd19:1::2]:22",
            "HostKey /tmp/t2s-sshd-x/hostkey",
            "PidFile /tmp/t2s-sshd-x/sshd.pid",
            "AuthorizedKeysFile /tmp/t2s-sshd-x/authorized_keys",
            "UsePAM no",
            "StrictModes no",
            "PasswordAuthentication no",
            "PermitRootLogin prohibit-password",
            "AllowTcpForwarding yes",
        ] {
            assert!(config.lines().any(|l| l == line), "{line}");
        }
    }
}
