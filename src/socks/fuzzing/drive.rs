//! Drivers that feed a handshake the way a network loop does: every chunk is appended
//! to the bytes not consumed yet, the handshake is called on that buffer, and the
//! consumed bytes are drained. They check what must hold after every call.

use super::super::client::{ClientHandshake, ClientStatus};
use super::super::server::{ServerHandshake, ServerPolicy, ServerStatus};
use super::super::{Address, Command, Error, MAX_MESSAGE, ReplyCode};

/// Longest reply a server sends during one handshake: method selection (2),
/// RFC 1929 status (2) and a failure reply, which always carries `0.0.0.0:0` (10).
const SERVER_REPLY_MAX: usize = 2 + 2 + 10;

/// Longest output of a client during one handshake: credentials (513) and a request
/// with a 255-byte name (262).
const CLIENT_SEND_MAX: usize = 3 + 255 + 255 + 3 + 1 + 1 + 255 + 2;

/// How a server handshake ended when the input ran out or it finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRun {
    /// The last status.
    pub status: ServerStatus,
    /// Every reply, concatenated.
    pub reply: Vec<u8>,
    /// Bytes consumed in total.
    pub consumed: usize,
}

/// The chunk sizes to feed, cycling through `chunks`; all at once when it is empty.
fn sizes(chunks: &[usize], total: usize) -> impl Iterator<Item = usize> + '_ {
    let all = chunks.is_empty().then_some(total.max(1));
    all.into_iter()
        .chain(chunks.iter().map(|&s| s.max(1)).cycle())
}

/// Feeds `input` to a new server handshake in chunks of `chunks` sizes (cycled; all at
/// once when empty). Checks after every call that no more than the buffer was
/// consumed, that a "need more" buffer stays below [`MAX_MESSAGE`], that replies stay
/// bounded, and that a finished handshake stays failed.
pub fn drive_server(policy: &ServerPolicy, input: &[u8], chunks: &[usize]) -> ServerRun {
    let mut handshake = ServerHandshake::new(policy.clone());
    let mut buf = Vec::new();
    let mut fed = 0usize;
    let mut run = ServerRun {
        status: ServerStatus::NeedMore,
        reply: Vec::new(),
        consumed: 0,
    };
    for size in sizes(chunks, input.len()) {
        let end = fed.saturating_add(size).min(input.len());
        buf.extend_from_slice(input.get(fed..end).unwrap_or_default());
        fed = end;
        let step = handshake.handshake(&buf);
        assert!(
            step.consumed <= buf.len(),
            "consumed {} of {}",
            step.consumed,
            buf.len()
        );
        buf.drain(..step.consumed);
        run.consumed = run.consumed.saturating_add(step.consumed);
        run.reply.extend(step.reply);
        assert!(
            run.reply.len() <= SERVER_REPLY_MAX,
            "reply grew to {}",
            run.reply.len()
        );
        run.status = step.status;
        if run.status == ServerStatus::NeedMore {
            assert!(buf.len() < MAX_MESSAGE, "{} bytes buffered", buf.len());
            if fed < input.len() {
                continue;
            }
            return run;
        }
        buf.extend_from_slice(input.get(fed..).unwrap_or_default());
        for rest in [buf.as_slice(), &[]] {
            let again = handshake.handshake(rest);
            assert_eq!(
                again.status,
                ServerStatus::Failed(Error::Failed),
                "not sticky"
            );
            assert_eq!((again.consumed, again.reply.len()), (0, 0), "not sticky");
        }
        return run;
    }
    run
}

/// How a client handshake ended when the input ran out or it finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRun {
    /// What `start` returned.
    pub start: Vec<u8>,
    /// Everything sent after that, concatenated.
    pub sent: Vec<u8>,
    /// Every `Bound` and `Done`, in order.
    pub events: Vec<ClientStatus>,
    /// The error that ended the handshake, if one did.
    pub error: Option<Error>,
    /// Bytes consumed in total.
    pub consumed: usize,
}

/// Feeds `input` (the proxy's bytes) to a copy of `client` in chunks of `chunks` sizes
/// (cycled; all at once when empty). After a call that consumed something the client
/// is called again on the rest, as a loop must (it handles one message per call).
/// Checks after every call that no more than the buffer was consumed, that buffers
/// and output stay bounded, and that a finished handshake stays failed.
pub fn drive_client(client: &ClientHandshake, input: &[u8], chunks: &[usize]) -> ClientRun {
    let mut handshake = client.clone();
    let mut run = ClientRun {
        start: handshake.start(),
        sent: Vec::new(),
        events: Vec::new(),
        error: None,
        consumed: 0,
    };
    assert!(handshake.start().is_empty(), "start twice");
    let mut buf = Vec::new();
    let mut fed = 0usize;
    for size in sizes(chunks, input.len()) {
        let end = fed.saturating_add(size).min(input.len());
        buf.extend_from_slice(input.get(fed..end).unwrap_or_default());
        fed = end;
        if pump_client(&mut handshake, &mut buf, &mut run) {
            buf.extend_from_slice(input.get(fed..).unwrap_or_default());
            for rest in [buf.as_slice(), &[]] {
                assert_eq!(handshake.handshake(rest), Err(Error::Failed), "not sticky");
            }
            return run;
        }
        assert!(buf.len() < MAX_MESSAGE, "{} bytes buffered", buf.len());
        if fed >= input.len() {
            return run;
        }
    }
    run
}

/// Calls the client until it needs more input; true when it finished (done or failed).
fn pump_client(handshake: &mut ClientHandshake, buf: &mut Vec<u8>, run: &mut ClientRun) -> bool {
    loop {
        let step = match handshake.handshake(buf) {
            Ok(step) => step,
            Err(error) => {
                run.error = Some(error);
                return true;
            }
        };
        assert!(
            step.consumed <= buf.len(),
            "consumed {} of {}",
            step.consumed,
            buf.len()
        );
        buf.drain(..step.consumed);
        run.consumed = run.consumed.saturating_add(step.consumed);
        run.sent.extend(step.send);
        assert!(
            run.sent.len() <= CLIENT_SEND_MAX,
            "sent {} bytes",
            run.sent.len()
        );
        match step.status {
            ClientStatus::NeedMore if step.consumed == 0 => return false,
            ClientStatus::NeedMore => {}
            ClientStatus::Bound(_) => run.events.push(step.status),
            ClientStatus::Done(_) => {
                run.events.push(step.status);
                return true;
            }
        }
    }
}

/// A client and a server that talked in memory until one of them finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// The server's final status.
    pub server: ServerStatus,
    /// The client's `Bound` and `Done` events, or the error that ended it.
    pub client: Result<Vec<ClientStatus>, Error>,
    /// Bytes the client left unconsumed (after `Done`: the data stream).
    pub client_leftover: Vec<u8>,
    /// Bytes the server left unconsumed.
    pub server_leftover: Vec<u8>,
}

/// Runs `client` against a server with `policy`. When the server accepts, it answers
/// success with `bound` (twice for BIND) followed by `payload`, all in one segment.
pub fn converse(
    client: ClientHandshake,
    policy: ServerPolicy,
    bound: &Address,
    payload: &[u8],
) -> Conversation {
    let mut client = client;
    let mut server = ServerHandshake::new(policy);
    let mut to_server = client.start();
    let mut to_client = Vec::new();
    let mut run = ClientRun {
        start: Vec::new(),
        sent: Vec::new(),
        events: Vec::new(),
        error: None,
        consumed: 0,
    };
    let mut client_finished = false;
    // Greeting, credentials, request: the server finishes within three rounds.
    for _ in 0..4 {
        let step = server.handshake(&to_server);
        to_server.drain(..step.consumed.min(to_server.len()));
        to_client.extend(step.reply);
        if let ServerStatus::Done(request) = &step.status {
            let replies = if request.command == Command::BIND {
                2
            } else {
                1
            };
            for _ in 0..replies {
                to_client.extend(request.reply(ReplyCode::SUCCEEDED, bound));
            }
            to_client.extend_from_slice(payload);
        }
        if !client_finished {
            let before = run.sent.len();
            client_finished = pump_client(&mut client, &mut to_client, &mut run);
            to_server.extend_from_slice(run.sent.get(before..).unwrap_or_default());
        }
        if step.status != ServerStatus::NeedMore {
            return Conversation {
                server: step.status,
                client: run.error.map_or(Ok(run.events), Err),
                client_leftover: to_client,
                server_leftover: to_server,
            };
        }
    }
    panic!("no progress: the server still needs more after four rounds")
}
