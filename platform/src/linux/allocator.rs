//! The allocator's rule for large blocks: memory freed goes back to the system.
//!
//! glibc serves a request of at least `M_MMAP_THRESHOLD` bytes (128 KiB at start)
//! with a mapping of its own, unmapped when freed. But the threshold is dynamic:
//! freeing such a block raises it to that block's size, so later blocks of that size
//! come from the heap, whose freed memory stays resident unless it happens to lie at
//! the heap's top. The tunnel's TCP rings grow up to 512 KiB while a flow is busy and
//! shrink back when it idles: after the first large ring was freed, every later one
//! came from the heap and its pages stayed resident after its flow ended (the CI soak
//! saw the tunnel's anonymous memory step up by 0.5-1.3 MiB during a minute of load).
//! Setting the threshold explicitly turns the adjustment off.

/// Blocks of at least this many bytes get their own mapping (glibc's initial
/// threshold, now fixed).
pub const LARGE_BLOCK: usize = 128 * 1024;

/// Fixes the allocator's mmap threshold at [`LARGE_BLOCK`], unless the user chose one
/// (`MALLOC_MMAP_THRESHOLD_`, which glibc has then applied already). Returns whether
/// the threshold was set here; false on a C library other than glibc.
pub fn return_large_blocks() -> bool {
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some() {
        return false;
    }
    set_threshold()
}

#[cfg(target_env = "gnu")]
fn set_threshold() -> bool {
    let Ok(value) = libc::c_int::try_from(LARGE_BLOCK) else {
        return false;
    };
    // SAFETY: mallopt only changes a tuning parameter inside the allocator (under its
    // own lock); no pointer is passed and no memory already handed out is affected.
    // M_MMAP_THRESHOLD accepts 0..=32 MiB on 64-bit glibc; 128 KiB is its default
    // start value. It returns 1 on success and 0 on error.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, value) == 1 }
}

#[cfg(not(target_env = "gnu"))]
fn set_threshold() -> bool {
    false
}
