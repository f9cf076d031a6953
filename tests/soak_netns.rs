//! The soak in CI: one minute of mixed load (bulk TCP, short connections, UDP echo,
//! DNS; half the benchmark's rates, `SoakConfig::ci`) through our tunnel and our SOCKS
//! server in namespaces, rows every 10 s, then 6 s for the last UDP associations to close
//! and 10 s of idleness. Fails on any load error, UDP/DNS loss over 0.1%, RSS or
//! descriptor drift over 10% after the warm-up (tunnel or server), an idle tunnel
//! using over 1% of a core, or an unclean exit. See `tun2socks::testbed::soak`; the
//! long run is `cargo bench --bench soak`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use tun2socks::require_or_skip;
use tun2socks::testbed::soak::{SoakConfig, run_soak};
use tun2socks::testbed::{require_program, require_root};

#[test]
fn one_minute_of_mixed_load_leaves_no_errors_leaks_or_spinning() {
    require_or_skip!(require_root("soak_netns"));
    require_or_skip!(require_program("dnsmasq", "soak_netns"));
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_tun2socks"));
    let config = SoakConfig::ci();
    let report = run_soak(&binary, &config, &mut std::io::stdout()).expect("soak setup");
    println!("{report}");
    assert!(report.passed(), "{report}");
}
