//! Giving back the pages of code that start-up touched and an idle process no longer
//! runs.
//!
//! The kernel maps a program's code lazily, but each fault maps a whole window of
//! already-cached neighbours with it ("fault-around", 64 KiB by default), so parsing
//! the command line, opening the device and building the runtime leave most of a
//! multi-megabyte executable resident although an idle tunnel runs a few pages of it.
//! [`release_code`] drops our mappings of those pages (`madvise(MADV_DONTNEED)` on
//! read-only, private, file-backed mappings that hold no private copies): the pages
//! stay in the page cache, and whatever runs again is mapped again by an ordinary
//! minor fault. Writable mappings and mappings with private (relocated, copied on
//! write) pages are never touched: their contents exist nowhere else.

use std::io;

/// Read-only file mappings of this process, as `(start, length)`, that may be dropped:
/// private, not writable, backed by a file, and holding no anonymous (copied) page.
fn droppable(smaps: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    let mut anonymous_seen = false;
    let mut flush = |current: &mut Option<(usize, usize)>, anonymous: bool| {
        if let Some(range) = current.take() {
            if !anonymous {
                out.push(range);
            }
        }
    };
    for line in smaps.lines() {
        if let Some(range) = mapping_header(line) {
            flush(&mut current, anonymous_seen);
            anonymous_seen = false;
            current = range;
        } else if let Some(rest) = line.strip_prefix("Anonymous:") {
            // Unparsable means unknown: keep the mapping.
            let kib = rest.trim().trim_end_matches("kB").trim().parse::<u64>();
            anonymous_seen = !matches!(kib, Ok(0));
        }
    }
    flush(&mut current, anonymous_seen);
    out
}

/// For a mapping's header line (`start-end perms offset dev inode path`): `Some(None)`
/// for a mapping not to touch, `Some(Some(range))` for a candidate, `None` for a
/// field line.
fn mapping_header(line: &str) -> Option<Option<(usize, usize)>> {
    let mut fields = line.split_ascii_whitespace();
    let range = fields.next()?;
    let (start, end) = range.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?;
    let _offset = fields.next()?;
    let _dev = fields.next()?;
    let inode = fields.next()?;
    let path = fields.next().unwrap_or("");
    let perms = perms.as_bytes();
    let candidate = perms.len() == 4
        && perms.get(1) == Some(&b'-')
        && perms.get(3) == Some(&b'p')
        && inode != "0"
        && path.starts_with('/')
        && end > start;
    Some(candidate.then(|| (start, end - start)))
}

/// Drops this process's mappings of unmodified read-only file pages (code and
/// constants of the executable and its libraries); returns how many bytes of such
/// mappings were advised. Safe to call at any time: the dropped pages come back on
/// their next use.
pub fn release_code() -> io::Result<usize> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut advised = 0usize;
    for (start, len) in droppable(&smaps) {
        // SAFETY: `start..start+len` is a whole mapping of this process that
        // /proc/self/smaps listed as private, not writable, file-backed and holding
        // no anonymous page, so every page in it is an unmodified copy of the file:
        // MADV_DONTNEED only removes our page-table entries, and the next access maps
        // the same bytes from the page cache again. No Rust reference can observe a
        // difference. A mapping unmapped meanwhile makes madvise fail with ENOMEM,
        // which is reported, not undefined.
        let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) };
        if rc == 0 {
            advised = advised.saturating_add(len);
        }
    }
    Ok(advised)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55a21b868000-55a21ba1a000 r--p 00000000 fe:00 5554247 /usr/bin/tun2socks
Size:               1736 kB
Anonymous:             0 kB
55a21ba1a000-55a21be4f000 r-xp 001b1000 fe:00 5554247 /usr/bin/tun2socks
Size:               4308 kB
Anonymous:             0 kB
55a21be4f000-55a21be84000 r--p 005e5000 fe:00 5554247 /usr/bin/tun2socks
Size:                212 kB
Anonymous:           208 kB
55a21be84000-55a21be87000 rw-p 00619000 fe:00 5554247 /usr/bin/tun2socks
Anonymous:            12 kB
7f0000000000-7f0000001000 r--p 00000000 00:00 0 [vvar]
Anonymous:             0 kB
7f0000002000-7f0000003000 r--s 00000000 fe:00 77 /dev/shm/x
Anonymous:             0 kB
7f0000004000-7f0000005000 r-xp 00000000 fe:00 78 /usr/lib/libc.so.6
Size:                  4 kB
";

    #[test]
    fn only_unmodified_private_read_only_file_mappings_are_dropped() {
        let got = droppable(SMAPS);
        assert_eq!(
            got,
            vec![
                (0x55a2_1b86_8000, 0x1b2000),
                (0x55a2_1ba1_a000, 0x435000),
                // No Anonymous line at all: nothing says it holds a private page.
                (0x7f00_0000_4000, 0x1000),
            ]
        );
    }

    #[test]
    fn releasing_code_keeps_the_process_running_and_shrinks_file_residency() {
        fn rss_file() -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let line = status
                .lines()
                .find(|l| l.starts_with("RssFile:"))
                .unwrap()
                .to_string();
            line.split_ascii_whitespace()
                .nth(1)
                .unwrap()
                .parse()
                .unwrap()
        }
        let before = rss_file();
        let advised = release_code().unwrap();
        let after = rss_file();
        assert!(advised > 0, "nothing was advised");
        assert!(after < before, "RssFile {before} kB -> {after} kB");
        // Code and constants still work after their pages were dropped.
        let text = format!("{:?}", vec![1u8, 2, 3]);
        assert_eq!(text, "[1, 2, 3]");
    }
}
