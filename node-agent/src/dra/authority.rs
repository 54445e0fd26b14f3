//! Accepting the kubelet's plugin-watcher connections.
//!
//! The kubelet's plugin watcher dials a registration socket with the socket
//! path itself as gRPC target, so its HTTP/2 requests carry that path,
//! percent-escaped, as `:authority`
//! (`%2Fvar%2Flib%2Fkubelet%2Fplugins_registry%2F….sock`, seen with kubelet
//! 1.36.2). The `h2` crate under tonic refuses such an authority
//! (percent-encoding is valid only in userinfo) and resets the stream with
//! `PROTOCOL_ERROR`, so the kubelet would never learn about the driver.
//! This is hyperium/h2#487; once h2 accepts such authorities, or lets a
//! server opt in, this module goes away. The kubelet's DRA client sends
//! `localhost` on the driver socket, so only the registration socket is
//! relayed.
//!
//! Each accepted connection therefore goes through a small frame-level
//! relay: server-to-client bytes pass unchanged; in client-to-server header
//! blocks the value of every `:authority` field is replaced by `x`s of the
//! same decoded length (see [`super::hpack`]), so both sides' dynamic
//! tables hold entries of the same sizes and evict together on a
//! connection of any length. Every other representation and frame is
//! forwarded byte for byte.
//!
//! The relay holds the same limits the server advertises (h2's defaults,
//! which the agent keeps): frames of at most 16 KiB and a header block of
//! at most 64 KiB across its CONTINUATION frames. A frame or block over
//! them, a malformed one, or a CONTINUATION out of place closes the
//! connection, as the server would; a rewritten block that outgrows one
//! frame is sent as HEADERS plus CONTINUATION frames.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::UnixListener;
use tracing::{debug, warn};

use super::hpack::Rewriter;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// SETTINGS_MAX_FRAME_SIZE of the agent's gRPC server (h2's default).
pub const MAX_FRAME: usize = 16 * 1024;
/// Largest header block the relay reassembles.
pub const MAX_BLOCK: usize = 64 * 1024;
/// What replaces an `:authority` value.
const FILL: u8 = b'x';

fn frame_header(len: usize, kind: u8, flags: u8, stream: [u8; 4]) -> [u8; 9] {
    let l = (len as u32).to_be_bytes();
    [
        l[1], l[2], l[3], kind, flags, stream[0], stream[1], stream[2], stream[3],
    ]
}

fn refuse(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Reads one frame (header, payload) within [`MAX_FRAME`]; `None` at a
/// clean end of the stream between frames.
async fn read_frame<R: AsyncRead + Unpin>(from: &mut R) -> io::Result<Option<([u8; 9], Vec<u8>)>> {
    let mut head = [0u8; 9];
    match from.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    if len > MAX_FRAME {
        return Err(refuse(format!(
            "a frame of {len} bytes is over the {MAX_FRAME} the server allows"
        )));
    }
    let mut payload = vec![0u8; len];
    from.read_exact(&mut payload).await?;
    Ok(Some((head, payload)))
}

/// Writes a header block as HEADERS (with `priority` and the flags kept)
/// plus CONTINUATION frames, none over [`MAX_FRAME`].
async fn write_block<W: AsyncWrite + Unpin>(
    to: &mut W,
    flags: u8,
    stream: [u8; 4],
    priority: &[u8],
    block: &[u8],
) -> io::Result<()> {
    let first = block.len().min(MAX_FRAME - priority.len());
    let (head, mut rest) = block.split_at(first);
    let mut out_flags = flags & (END_STREAM | PRIORITY);
    if rest.is_empty() {
        out_flags |= END_HEADERS;
    }
    to.write_all(&frame_header(
        priority.len() + head.len(),
        HEADERS,
        out_flags,
        stream,
    ))
    .await?;
    to.write_all(priority).await?;
    to.write_all(head).await?;
    while !rest.is_empty() {
        let (chunk, more) = rest.split_at(rest.len().min(MAX_FRAME));
        let f = if more.is_empty() { END_HEADERS } else { 0 };
        to.write_all(&frame_header(chunk.len(), CONTINUATION, f, stream))
            .await?;
        to.write_all(chunk).await?;
        rest = more;
    }
    Ok(())
}

/// Copies client frames to the server, rewriting header blocks; returns
/// the first `:authority` the client sent.
pub async fn client_to_server<R, W>(
    mut from: R,
    mut to: W,
    socket: &str,
) -> io::Result<Option<String>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    from.read_exact(&mut preface).await?;
    to.write_all(&preface).await?;
    if preface != PREFACE {
        return Err(refuse("not an HTTP/2 connection preface"));
    }
    let mut table = Rewriter::default();
    loop {
        let Some((head, payload)) = read_frame(&mut from).await? else {
            to.shutdown().await?;
            return Ok(table.first_authority);
        };
        match head[3] {
            HEADERS => {}
            CONTINUATION => return Err(refuse("a CONTINUATION frame without HEADERS before it")),
            _ => {
                to.write_all(&head).await?;
                to.write_all(&payload).await?;
                continue;
            }
        }
        let flags = head[4];
        let stream = [head[5], head[6], head[7], head[8]];
        let mut body = &payload[..];
        let mut pad = 0usize;
        if flags & PADDED != 0 {
            let (p, rest) = body
                .split_first()
                .ok_or_else(|| refuse("a PADDED frame with no pad length"))?;
            pad = usize::from(*p);
            body = rest;
        }
        let mut priority: &[u8] = &[];
        if flags & PRIORITY != 0 {
            if body.len() < 5 {
                return Err(refuse("a PRIORITY frame too short for its priority"));
            }
            (priority, body) = body.split_at(5);
        }
        if pad > body.len() {
            return Err(refuse("padding longer than the frame"));
        }
        let mut block = body[..body.len() - pad].to_vec();
        let mut end_headers = flags & END_HEADERS != 0;
        while !end_headers {
            let (h, more) = read_frame(&mut from)
                .await?
                .ok_or_else(|| refuse("the connection ended inside a header block"))?;
            if h[3] != CONTINUATION || h[5..9] != stream {
                return Err(refuse("a header block interrupted by another frame"));
            }
            if block.len() + more.len() > MAX_BLOCK {
                return Err(refuse(format!("a header block over {MAX_BLOCK} bytes")));
            }
            block.extend_from_slice(&more);
            end_headers = h[4] & END_HEADERS != 0;
        }
        let said = table.first_authority.is_some();
        let block = table
            .rewrite(&block, FILL)
            .map_err(|e| refuse(format!("header block: {e}")))?;
        if let (false, Some(a)) = (said, &table.first_authority) {
            debug!(socket, authority = %a, "first :authority on a connection");
        }
        write_block(&mut to, flags, stream, priority, &block).await?;
    }
}

/// Accepts connections on `listener` (the registration socket) and yields,
/// for each, the server end of a relay that makes its `:authority`
/// acceptable (see the module docs).
pub fn incoming(listener: UnixListener) -> impl futures::Stream<Item = io::Result<DuplexStream>> {
    futures::stream::unfold(listener, move |listener| async move {
        let conn = match listener.accept().await {
            Ok((c, _)) => c,
            Err(e) => return Some((Err(e), listener)),
        };
        let (server_end, relay_end) = tokio::io::duplex(64 * 1024);
        tokio::spawn(relay(conn, relay_end, "registration"));
        Some((Ok(server_end), listener))
    })
}

/// Runs one relayed connection until either side ends it. On an error in
/// either direction both ends are closed at once, so neither the kubelet
/// nor the server waits on a connection that can no longer work.
async fn relay(conn: tokio::net::UnixStream, relay_end: DuplexStream, socket: &'static str) {
    let (client_read, mut client_write) = conn.into_split();
    let (mut relay_read, relay_write) = tokio::io::split(relay_end);
    let up = client_to_server(client_read, relay_write, socket);
    let down = async {
        let r = tokio::io::copy(&mut relay_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
        r
    };
    tokio::pin!(up, down);
    tokio::select! {
        r = &mut up => match r {
            Ok(authority) => {
                debug!(socket, ?authority, "client closed its side; relaying the rest of the replies");
                let _ = down.await;
            }
            Err(e) => warn!(socket, error = %e, "closing a kubelet connection the relay cannot carry"),
        },
        r = &mut down => debug!(socket, result = ?r.err(), "server side closed; closing the connection"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::hpack::tests::{Table, decode, encode, huffman_encode};
    use super::super::hpack::write_int;
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = frame_header(payload.len(), kind, flags, stream.to_be_bytes()).to_vec();
        f.extend_from_slice(payload);
        f
    }

    /// The frames of `bytes` after the preface: (kind, flags, stream, payload).
    fn frames(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert_eq!(&bytes[..24], PREFACE);
        let mut out = Vec::new();
        let mut rest = &bytes[24..];
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            out.push((rest[3], rest[4], stream, rest[9..9 + len].to_vec()));
            rest = &rest[9 + len..];
        }
        out
    }

    async fn relay_bytes(input: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        client_to_server(input, &mut out, "test").await?;
        Ok(out)
    }

    const PATH: &str = "/var/lib/kubelet/plugins_registry/simulated-foo-dra.devplug.io-reg.sock";

    #[tokio::test]
    async fn continuation_padding_and_priority_are_taken_apart_and_put_back() {
        let mut client = Table::new();
        let block = encode(
            &mut client,
            &[
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/pluginregistration.Registration/GetInfo"),
                (":authority", PATH),
                ("te", "trailers"),
            ],
            None,
        );
        let (a, b) = block.split_at(block.len() / 2);
        // HEADERS: padded (3 bytes), with a priority, no END_HEADERS.
        let mut first = vec![3u8];
        first.extend([0, 0, 0, 0, 15]);
        first.extend_from_slice(a);
        first.extend([0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        input.extend(frame(HEADERS, PADDED | PRIORITY, 1, &first));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0")); // DATA
        let out = relay_bytes(&input).await.unwrap();
        let f = frames(&out);
        assert_eq!(f.len(), 3);
        assert_eq!((f[0].0, f[0].3.len()), (0x4, 0));
        let (kind, flags, stream, payload) = &f[1];
        assert_eq!(
            (*kind, *flags, *stream),
            (HEADERS, PRIORITY | END_HEADERS, 1)
        );
        assert_eq!(&payload[..5], &[0, 0, 0, 0, 15]);
        let got = decode(&mut Table::new(), &payload[5..]);
        assert_eq!(got[3], (":authority".into(), "x".repeat(PATH.len())));
        assert_eq!(got[2].1, "/pluginregistration.Registration/GetInfo");
        assert_eq!(f[2], (0x0, END_STREAM, 1, b"\0\0\0\0\0".to_vec()));
    }

    #[tokio::test]
    async fn a_block_that_outgrows_a_frame_is_sent_as_headers_and_continuation() {
        // 130 never-indexed `:authority` fields, each 200 Huffman-coded
        // 'a's (125 bytes on the wire, 200 once plain).
        let value = huffman_encode(&[b'a'; 200]);
        let mut block = Vec::new();
        for _ in 0..130 {
            block.push(0x11); // never indexed, name index 1
            write_int(&mut block, 0x80, 7, value.len() as u64);
            block.extend_from_slice(&value);
        }
        assert!(block.len() > MAX_FRAME);
        let (a, b) = block.split_at(MAX_FRAME);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_STREAM, 3, a));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, b));
        let out = relay_bytes(&input).await.unwrap();
        let f = frames(&out);
        assert!(f.len() >= 2);
        assert!(f.iter().all(|(_, _, _, p)| p.len() <= MAX_FRAME));
        assert_eq!((f[0].0, f[0].1), (HEADERS, END_STREAM));
        let last = f.len() - 1;
        for (i, (kind, flags, stream, _)) in f.iter().enumerate().skip(1) {
            assert_eq!((*kind, *stream), (CONTINUATION, 3));
            assert_eq!(*flags, if i == last { END_HEADERS } else { 0 });
        }
        let whole: Vec<u8> = f.iter().flat_map(|(_, _, _, p)| p.clone()).collect();
        let got = decode(&mut Table::new(), &whole);
        assert_eq!(got.len(), 130);
        assert!(
            got.iter()
                .all(|(n, v)| n == ":authority" && *v == "x".repeat(200))
        );
    }

    #[tokio::test]
    async fn what_the_server_would_refuse_closes_the_connection() {
        let ok_block = encode(&mut Table::new(), &[(":authority", PATH)], None);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "a frame over the limit",
                frame(0x0, 0, 1, &vec![0; MAX_FRAME + 1]),
            ),
            (
                "a CONTINUATION alone",
                frame(CONTINUATION, END_HEADERS, 1, &ok_block),
            ),
            ("a header block interrupted", {
                let mut v = frame(HEADERS, 0, 1, &ok_block);
                v.extend(frame(0x0, 0, 1, b"x"));
                v
            }),
            ("a CONTINUATION of another stream", {
                let mut v = frame(HEADERS, 0, 1, &ok_block);
                v.extend(frame(CONTINUATION, END_HEADERS, 3, &[]));
                v
            }),
            ("a header block over the limit", {
                let mut v = frame(HEADERS, 0, 1, &[0x82; MAX_FRAME]);
                for _ in 0..4 {
                    v.extend(frame(CONTINUATION, 0, 1, &[0x82; MAX_FRAME]));
                }
                v
            }),
            (
                "padding longer than the frame",
                frame(HEADERS, PADDED | END_HEADERS, 1, &[9, 0x82]),
            ),
            (
                "a malformed block",
                frame(HEADERS, END_HEADERS, 1, &[0x41, 0x7f]),
            ),
        ];
        for (what, bytes) in cases {
            let mut input = PREFACE.to_vec();
            input.extend(bytes);
            assert!(relay_bytes(&input).await.is_err(), "{what} was relayed");
        }
        assert!(
            relay_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .is_err()
        );
    }

    /// On an error the relay closes both ends at once; it does not wait
    /// for the server to hang up first.
    #[tokio::test]
    async fn an_error_closes_both_ends() {
        let (mut kubelet, agent_side) = tokio::net::UnixStream::pair().unwrap();
        let (mut server, relay_end) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(relay(agent_side, relay_end, "test"));
        let mut bad = PREFACE.to_vec();
        bad.extend(frame(CONTINUATION, END_HEADERS, 1, &[]));
        kubelet.write_all(&bad).await.unwrap();
        let deadline = std::time::Duration::from_secs(10);
        let mut buf = Vec::new();
        // The kubelet's side reads end-of-stream although the server never
        // closed its end.
        tokio::time::timeout(deadline, kubelet.read_to_end(&mut buf))
            .await
            .expect("the kubelet's connection was left open")
            .unwrap();
        tokio::time::timeout(deadline, task).await.unwrap().unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(deadline, server.read_to_end(&mut got))
            .await
            .expect("the server's end was left open")
            .unwrap();
        assert_eq!(got, PREFACE);
    }

    /// The bytes the real kubelet (1.36.2) sent on a registration
    /// connection (GetInfo, then NotifyRegistrationStatus on the same
    /// connection, the second naming the authority by dynamic index),
    /// captured on the cluster kit.
    #[tokio::test]
    async fn the_kubelets_own_bytes_come_out_with_only_the_authority_changed() {
        let input = include_bytes!("testdata/kubelet-1.36.2-registration.bin");
        let out = relay_bytes(input).await.unwrap();
        let (sent, got) = (frames(input), frames(&out));
        assert_eq!(sent.len(), got.len());
        let (mut client, mut server) = (Table::new(), Table::new());
        let mut requests = 0;
        for (s, g) in sent.iter().zip(&got) {
            assert_eq!((s.0, s.2), (g.0, g.2));
            if s.0 != HEADERS {
                assert_eq!(s, g);
                continue;
            }
            requests += 1;
            let want: Vec<(String, String)> = decode(&mut client, &s.3)
                .into_iter()
                .map(|(n, v)| {
                    if n == ":authority" {
                        assert!(
                            v.starts_with("%2Fvar%2Flib%2Fkubelet%2Fplugins_registry%2F"),
                            "{v}"
                        );
                        (n, "x".repeat(v.len()))
                    } else {
                        (n, v)
                    }
                })
                .collect();
            assert!(want.iter().any(|(n, _)| n == ":authority"));
            assert_eq!(decode(&mut server, &g.3), want);
        }
        assert_eq!(requests, 2);
    }
}
