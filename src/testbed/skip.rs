//! What a test needs from the machine, and the rule for when it is missing: skip with
//! a clear message only outside CI (`CI` unset); in CI, fail.

use std::env;
use std::path::Path;

/// A requirement of a test or of the selftest that this machine does not meet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} needs {needs}")]
pub struct Skip {
    /// Who needs it: a test name, "selftest".
    pub what: String,
    /// What is missing: "root", "the program `dnsmasq`".
    pub needs: String,
}

impl Skip {
    fn new(what: &str, needs: impl Into<String>) -> Skip {
        Skip {
            what: what.to_owned(),
            needs: needs.into(),
        }
    }
}

/// `Ok` when running as root (network namespaces and TUN devices need it).
pub fn require_root(what: &str) -> Result<(), Skip> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(Skip::new(what, "root"))
    }
}

/// `Ok` when `program` is an executable file in a directory of `PATH`.
pub fn require_program(program: &str, what: &str) -> Result<(), Skip> {
    let found = env::var_os("PATH")
        .is_some_and(|path| env::split_paths(&path).any(|dir| is_executable(&dir.join(program))));
    if found {
        Ok(())
    } else {
        Err(Skip::new(what, format!("the program `{program}` in PATH")))
    }
}

/// Whether a test may skip for a missing requirement: only when `CI` is unset.
pub fn skip_allowed() -> bool {
    env::var_os("CI").is_none()
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// In a test: evaluates a `Result<(), Skip>` (from [`require_root`],
/// [`require_program`]); on `Err`, returns from the test with a `SKIPPED` line on
/// stderr when `CI` is unset, and panics (fails the test) when `CI` is set. A test
/// that returns a value names it as the second argument.
///
/// ```no_run
/// use tun2socks::testbed::{require_program, require_root};
///
/// fn plain_test() {
///     tun2socks::require_or_skip!(require_root("plain_test"));
/// }
///
/// fn fallible_test() -> std::io::Result<()> {
///     tun2socks::require_or_skip!(require_program("ip", "fallible_test"), Ok(()));
///     Ok(())
/// }
/// # fn main() {}
/// ```
///
/// Only with the `test-support` feature (the package's own tests enable it).
#[cfg(feature = "test-support")]
#[macro_export]
macro_rules! require_or_skip {
    ($requirement:expr) => {
        $crate::require_or_skip!($requirement, ())
    };
    ($requirement:expr, $skipped:expr) => {
        if let ::std::result::Result::Err(skip) = $requirement {
            if $crate::testbed::skip_allowed() {
                ::std::eprintln!("SKIPPED: {skip} (CI is unset, so this test may skip)");
                return $skipped;
            }
            ::std::panic!("{skip}; CI is set, so this test fails instead of skipping");
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sh_and_not_nonsense() {
        assert_eq!(require_program("sh", "t"), Ok(()));
        let missing = require_program("t2s-no-such-program", "t").map_err(|e| e.to_string());
        assert_eq!(
            missing,
            Err("t needs the program `t2s-no-such-program` in PATH".to_owned())
        );
    }
}
