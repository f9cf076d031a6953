//! Test support: a uniquely named network namespace that is deleted on drop (even
//! when the test panics), a way to run code inside it on a dedicated thread
//! (`setns` switches only that thread), and parsers for `ip` output so tests check
//! the kernel's view with a tool we did not write.
//!
//! Shared by `platform/tests/` and the main crate's `tests/device.rs` (via `#[path]`).
#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sched::{CloneFlags, setns};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// `true` if we are root. Otherwise: under CI (`CI` set) the test fails; outside CI
/// it prints why it is skipped and returns `false`.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root (network namespaces, TUN devices); CI is set, so this fails \
         instead of skipping"
    );
    // Written to the real stderr, not eprintln!: the test harness would capture that
    // and show nothing for a passing (skipped) test.
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED {test}: needs root for network namespaces and TUN devices (CI unset)"
    );
    false
}

/// A network namespace `t2s-<tag>-<pid>-<n>`, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace and brings its loopback up.
    pub fn new(tag: &str) -> Netns {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let name = format!("t2s-{tag}-{}-{n}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NS ARGS...`; panics (with stderr) if it fails; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip -n NS ARGS...`; returns whether it succeeded, ignoring output.
    pub fn ip_ok(&self, args: &[&str]) -> bool {
        Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// `ip netns exec NS ARGS...`; panics if it fails; returns stdout.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns its
    /// result. A panic inside `f` is re-raised here, after the thread ended.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/run/netns/{}", self.name);
        let joined = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = File::open(&path).expect("open the namespace file");
                    setns(&file, CloneFlags::CLONE_NEWNET).expect("setns into the namespace");
                    f()
                })
                .join()
        });
        joined.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// The kernel's view of `dev`, from `ip -o link show dev DEV`.
    pub fn link(&self, dev: &str) -> LinkView {
        LinkView::parse(&self.ip(&["-o", "link", "show", "dev", dev]))
    }

    /// `true` if `dev` exists in the namespace.
    pub fn has_link(&self, dev: &str) -> bool {
        self.ip_ok(&["link", "show", "dev", dev])
    }

    /// Whether `dev` is gone within two seconds, for a device that should
    /// vanish with the fd this process just closed. Polled because the tests
    /// of one binary run in parallel threads: another test's
    /// `Command::spawn` may be between its fork and its exec at the moment
    /// of the close, and the child then holds a copy of the fd (O_CLOEXEC
    /// closes it only at exec), so the device lingers that short while.
    pub fn link_gone(&self, dev: &str) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while self.has_link(dev) {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        true
    }

    /// The addresses on `dev`, from `ip -o addr show dev DEV`.
    pub fn addresses(&self, dev: &str) -> Vec<AddrView> {
        AddrView::parse_all(&self.ip(&["-o", "addr", "show", "dev", dev]))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "could not delete namespace {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("could not run ip netns del {}: {e}", self.name),
        }
    }
}

/// Runs a command; panics with its stderr if it fails; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One line of `ip -o link show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkView {
    pub ifindex: u32,
    pub name: String,
    pub flags: Vec<String>,
    pub mtu: u32,
    pub qlen: u32,
}

impl LinkView {
    /// Parses `5: tun0: <POINTOPOINT,NOARP,UP> mtu 1400 qdisc ... qlen 500\ link/none`.
    pub fn parse(line: &str) -> LinkView {
        let mut words = line.split_whitespace();
        let ifindex = words.next().expect("index").trim_end_matches(':');
        let name = words.next().expect("name").trim_end_matches(':');
        let flags = words.next().expect("flags");
        let after = |key: &str| -> u32 {
            let mut it = line.split_whitespace().skip_while(|w| *w != key);
            it.next();
            it.next()
                .unwrap_or_else(|| panic!("no {key} in {line:?}"))
                .trim_end_matches('\\')
                .parse()
                .expect("number")
        };
        LinkView {
            ifindex: ifindex.parse().expect("ifindex"),
            name: name.split('@').next().unwrap_or(name).to_owned(),
            flags: flags
                .trim_matches(|c| c == '<' || c == '>')
                .split(',')
                .map(str::to_owned)
                .collect(),
            mtu: after("mtu"),
            qlen: after("qlen"),
        }
    }

    /// Administratively up.
    pub fn up(&self) -> bool {
        self.flags.iter().any(|f| f == "UP")
    }
}

/// One address line of `ip -o addr show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrView {
    /// `inet` or `inet6`.
    pub family: String,
    /// `10.0.0.1/24`, `fd00::1/64`.
    pub cidr: String,
    /// Words after the address, e.g. `scope`, `global`, `tentative`, `nodad`.
    pub words: Vec<String>,
}

impl AddrView {
    /// Parses every line of `ip -o addr show dev DEV`.
    pub fn parse_all(output: &str) -> Vec<AddrView> {
        output
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace().skip(2);
                let family = words.next()?.to_owned();
                let cidr = words.next()?.to_owned();
                let words = words
                    .take_while(|w| *w != "\\")
                    .map(str::to_owned)
                    .collect();
                Some(AddrView {
                    family,
                    cidr,
                    words,
                })
            })
            .collect()
    }

    /// The address has finished (or skipped) duplicate address detection.
    pub fn usable(&self) -> bool {
        !self
            .words
            .iter()
            .any(|w| w == "tentative" || w == "dadfailed")
    }
}

/// Finds `cidr` among `addresses`.
pub fn find<'a>(addresses: &'a [AddrView], cidr: &str) -> Option<&'a AddrView> {
    addresses.iter().find(|a| a.cidr == cidr)
}
