//! `Pipe`: bytes from one loopback TCP socket reach another through splice, end of
//! stream shows as 0, and an empty socket is WouldBlock (not an error or a hang).
#![allow(clippy::unwrap_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use tun2socks_platform::Pipe;

fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

#[test]
fn splices_between_sockets_and_sees_eof() {
    let (mut src_writer, src) = pair();
    let (dst, mut dst_reader) = pair();
    src.set_nonblocking(true).unwrap();
    dst.set_nonblocking(true).unwrap();
    let mut pipe = Pipe::new(256 * 1024).unwrap();

    assert_eq!(
        pipe.fill_from(&src).unwrap_err().kind(),
        ErrorKind::WouldBlock
    );

    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let expected = data.clone();
    // The writer closes its socket when done: the source then reaches end of stream.
    let writer = std::thread::spawn(move || src_writer.write_all(&data).unwrap());
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        dst_reader.read_to_end(&mut got).unwrap();
        got
    });
    let mut moved = 0usize;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "splice made no progress");
        match pipe.fill_from(&src) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("{e}"),
        }
        while pipe.buffered() > 0 {
            match pipe.drain_into(&dst) {
                Ok(n) => moved += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    writer.join().unwrap();
    drop(dst);
    let got = reader.join().unwrap();
    assert_eq!(moved, expected.len());
    assert!(got == expected, "spliced bytes differ");
}

#[test]
fn end_of_stream_is_zero() {
    let (writer, src) = pair();
    src.set_nonblocking(true).unwrap();
    drop(writer);
    let mut pipe = Pipe::new(4096).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match pipe.fill_from(&src) {
            Ok(0) => break,
            Ok(n) => panic!("read {n} bytes from a closed socket"),
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(pipe.buffered(), 0);
}
