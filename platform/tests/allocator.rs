//! `return_large_blocks` in a process of its own (resident memory is per process, and
//! this is the only test here): after a large block was freed once, large blocks
//! still go back to the system when freed, even with small live allocations between
//! them that keep freed heap memory from being trimmed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn freed_large_blocks_leave_resident_memory() {
    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
    const BLOCK: usize = 512 * 1024;
    const BLOCKS: usize = 16;

    assert!(tun2socks_platform::return_large_blocks());
    // Freeing one large block is what raises glibc's dynamic threshold.
    drop(std::hint::black_box(vec![1u8; BLOCK]));

    let before = rss_kib();
    let mut blocks = Vec::new();
    let mut pins = Vec::new();
    for i in 0..BLOCKS {
        blocks.push(std::hint::black_box(vec![i as u8 | 1; BLOCK]));
        // A small live allocation after each block: freed blocks cannot merge into
        // the heap's top and be trimmed.
        pins.push(std::hint::black_box(Box::new([i as u8; 64])));
    }
    let touched = rss_kib();
    assert!(
        touched >= before + (BLOCKS * BLOCK / 1024) as u64 * 3 / 4,
        "the blocks were not resident: {before} -> {touched} KiB"
    );
    drop(blocks);
    let after = rss_kib();
    assert!(
        after < before + 1024,
        "freed blocks stayed resident: {before} KiB before, {touched} with the blocks, {after} after freeing them"
    );
    drop(pins);
}
