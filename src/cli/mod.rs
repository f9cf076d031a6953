//! The `tun2socks` binary's own modules (not the library's): the command line and
//! the commands it runs.

pub mod args;
pub mod run;
