//! Accepting the kubelet's plugin-watcher connections.
//!
//! The kubelet's plugin watcher dials a registration socket with the socket
//! path itself as gRPC target, so its HTTP/2 requests carry that path as
//! `:authority` (`/var/lib/kubelet/plugins_registry/….sock`). The `h2`
//! crate under tonic refuses such an authority (a `/` is not a valid URI
//! authority character) and resets the stream with `PROTOCOL_ERROR`, so the
//! kubelet never learns about the driver. (Seen on the real kubelet 1.36;
//! hyperium/h2#487.)
//!
//! Each accepted connection therefore goes through a small frame-level
//! relay: server-to-client bytes pass unchanged; in client-to-server header
//! blocks the value of every `:authority` field is replaced by a valid one
//! of the same length (`x…x`). The relay never decodes HPACK strings: it only
//! walks the representations (integers and string lengths), and it keeps
//! each representation's kind, so both sides' dynamic tables hold the same
//! number of entries of the same sizes (for the kubelet, whose authority is
//! the path, exactly). Everything else is forwarded byte for byte.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::UnixListener;
use tracing::debug;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Static table index of `:authority` (RFC 7541, Appendix A).
const AUTHORITY_INDEX: u64 = 1;
/// Largest header block the relay reassembles.
const MAX_BLOCK: usize = 64 * 1024;

fn read_int(buf: &[u8], pos: &mut usize, prefix_bits: u32) -> Option<u64> {
    let mask = (1u16 << prefix_bits) as u8 - 1;
    let first = *buf.get(*pos)? & mask;
    *pos += 1;
    if first < mask {
        return Some(u64::from(first));
    }
    let mut value = u64::from(mask);
    let mut shift = 0u32;
    loop {
        let b = *buf.get(*pos)?;
        *pos += 1;
        value = value.checked_add(u64::from(b & 0x7f).checked_shl(shift)?)?;
        if b & 0x80 == 0 {
            return Some(value);
        }
        shift += 7;
        if shift > 56 {
            return None;
        }
    }
}

fn write_int(out: &mut Vec<u8>, first_bits: u8, prefix_bits: u32, mut value: u64) {
    let mask = (1u16 << prefix_bits) as u8 - 1;
    if value < u64::from(mask) {
        out.push(first_bits | value as u8);
        return;
    }
    out.push(first_bits | mask);
    value -= u64::from(mask);
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Skips a string literal; returns where it started.
fn skip_string(buf: &[u8], pos: &mut usize) -> Option<usize> {
    let start = *pos;
    let len = usize::try_from(read_int(buf, pos, 7)?).ok()?;
    let end = pos.checked_add(len)?;
    if end > buf.len() {
        return None;
    }
    *pos = end;
    Some(start)
}

/// The header block with the value of each `:authority` field replaced by
/// `value` (sent as a plain string); `None` if the block is malformed (it
/// is then forwarded as it was, for the server to judge).
pub fn rewrite_authority(block: &[u8], value: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(block.len() + value.len());
    let mut pos = 0;
    while pos < block.len() {
        let b = block[pos];
        let start = pos;
        if b & 0x80 != 0 {
            // Indexed field.
            read_int(block, &mut pos, 7)?;
            out.extend_from_slice(&block[start..pos]);
            continue;
        }
        if b & 0xe0 == 0x20 {
            // Dynamic table size update.
            read_int(block, &mut pos, 5)?;
            out.extend_from_slice(&block[start..pos]);
            continue;
        }
        // A literal: with incremental indexing (01), without (0000) or
        // never indexed (0001).
        let prefix = if b & 0xc0 == 0x40 { 6 } else { 4 };
        let index = read_int(block, &mut pos, prefix)?;
        if index == 0 {
            skip_string(block, &mut pos)?;
        }
        let name_end = pos;
        let value_start = skip_string(block, &mut pos)?;
        if index == AUTHORITY_INDEX {
            out.extend_from_slice(&block[start..name_end]);
            write_int(&mut out, 0x00, 7, value.len() as u64);
            out.extend_from_slice(value);
        } else {
            out.extend_from_slice(&block[start..pos]);
        }
        debug_assert!(value_start >= name_end);
    }
    Some(out)
}

fn frame_header(len: usize, kind: u8, flags: u8, stream: [u8; 4]) -> [u8; 9] {
    let l = (len as u32).to_be_bytes();
    [
        l[1], l[2], l[3], kind, flags, stream[0], stream[1], stream[2], stream[3],
    ]
}

/// Copies client frames to the server, rewriting header blocks.
async fn client_to_server<R, W>(mut from: R, mut to: W, value: Vec<u8>) -> io::Result<()>
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut preface = [0u8; 24];
    from.read_exact(&mut preface).await?;
    to.write_all(&preface).await?;
    if preface != PREFACE {
        // Not HTTP/2 with prior knowledge: relay as is, for the server to refuse.
        tokio::io::copy(&mut from, &mut to).await?;
        return Ok(());
    }
    let mut head = [0u8; 9];
    loop {
        if let Err(e) = from.read_exact(&mut head).await {
            return if e.kind() == io::ErrorKind::UnexpectedEof {
                to.shutdown().await
            } else {
                Err(e)
            };
        }
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        from.read_exact(&mut payload).await?;
        if head[3] != HEADERS {
            to.write_all(&head).await?;
            to.write_all(&payload).await?;
            continue;
        }
        let flags = head[4];
        let stream = [head[5], head[6], head[7], head[8]];
        let mut body = &payload[..];
        let mut pad = 0usize;
        if flags & PADDED != 0 {
            pad = usize::from(*body.first().unwrap_or(&0));
            body = body.get(1..).unwrap_or_default();
        }
        let mut priority: &[u8] = &[];
        if flags & PRIORITY != 0 {
            priority = body.get(..5).unwrap_or_default();
            body = body.get(5..).unwrap_or_default();
        }
        let mut block = body
            .get(..body.len().saturating_sub(pad))
            .unwrap_or_default()
            .to_vec();
        let mut end_headers = flags & END_HEADERS != 0;
        while !end_headers {
            let mut h = [0u8; 9];
            from.read_exact(&mut h).await?;
            let l = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            let mut more = vec![0u8; l];
            from.read_exact(&mut more).await?;
            if h[3] != CONTINUATION || block.len() + l > MAX_BLOCK {
                return Err(io::Error::other("malformed header block"));
            }
            block.extend_from_slice(&more);
            end_headers = h[4] & END_HEADERS != 0;
        }
        let block = rewrite_authority(&block, &value).unwrap_or(block);
        let out_flags = (flags & (END_STREAM | PRIORITY)) | END_HEADERS;
        to.write_all(&frame_header(
            priority.len() + block.len(),
            HEADERS,
            out_flags,
            stream,
        ))
        .await?;
        to.write_all(priority).await?;
        to.write_all(&block).await?;
    }
}

/// Accepts connections on `listener` and yields, for each, the server end
/// of a relay that makes its `:authority` acceptable (see the module
/// docs). `authority_len` is the length of the value put in its place: the
/// length of the socket path, which is what the kubelet sends.
pub fn incoming(
    listener: UnixListener,
    authority_len: usize,
) -> impl futures::Stream<Item = io::Result<DuplexStream>> {
    let value = vec![b'x'; authority_len.max(1)];
    futures::stream::unfold((listener, value), |(listener, value)| async move {
        let conn = match listener.accept().await {
            Ok((c, _)) => c,
            Err(e) => return Some((Err(e), (listener, value))),
        };
        let (server_end, relay_end) = tokio::io::duplex(64 * 1024);
        let (client_read, mut client_write) = conn.into_split();
        let (mut relay_read, relay_write) = tokio::io::split(relay_end);
        let v = value.clone();
        tokio::spawn(async move {
            let up = client_to_server(client_read, relay_write, v);
            let down = async {
                let r = tokio::io::copy(&mut relay_read, &mut client_write).await;
                let _ = client_write.shutdown().await;
                r
            };
            let (a, b) = tokio::join!(up, down);
            debug!(up = ?a.err(), down = ?b.err(), "relayed connection closed");
        });
        Some((Ok(server_end), (listener, value)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(s: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_int(&mut v, 0, 7, s.len() as u64);
        v.extend_from_slice(s);
        v
    }

    #[test]
    fn only_the_authority_value_changes() {
        let path = b"/var/lib/kubelet/plugins_registry/x.devplug.io-reg.sock";
        let mut block = vec![0x83, 0x86]; // :method POST, :scheme http (indexed)
        block.push(0x41); // :authority, literal with incremental indexing
        block.extend(plain(path));
        block.push(0x44); // :path (static 4), incremental indexing
        block.extend(plain(b"/pluginregistration.Registration/GetInfo"));
        block.push(0x40); // a literal name
        block.extend(plain(b"te"));
        block.extend(plain(b"trailers"));
        block.push(0x3f); // table size update 31+…
        block.push(0x01);
        block.push(0x01); // :authority, without indexing
        block.extend(plain(b"a/b"));
        block.push(0xbe); // indexed, dynamic entry 62

        let value = vec![b'x'; path.len()];
        let out = rewrite_authority(&block, &value).unwrap();
        let mut want = vec![0x83, 0x86, 0x41];
        want.extend(plain(&value));
        want.push(0x44);
        want.extend(plain(b"/pluginregistration.Registration/GetInfo"));
        want.push(0x40);
        want.extend(plain(b"te"));
        want.extend(plain(b"trailers"));
        want.extend([0x3f, 0x01, 0x01]);
        want.extend(plain(&value));
        want.push(0xbe);
        assert_eq!(out, want);
    }

    #[test]
    fn huffman_values_and_long_lengths_are_walked_not_decoded() {
        // A Huffman-coded value (H bit) of 200 bytes: a multi-byte length.
        let mut block = vec![0x41, 0xff, 200 - 127];
        block.extend(vec![0xaa; 200]);
        block.push(0x82);
        let out = rewrite_authority(&block, b"xx").unwrap();
        assert_eq!(out, vec![0x41, 0x02, b'x', b'x', 0x82]);
        // Truncated input is malformed, not a panic.
        assert!(rewrite_authority(&[0x41, 0x7f], b"x").is_none());
        assert!(rewrite_authority(&[0x41, 0x05, b'a'], b"x").is_none());
        assert!(
            rewrite_authority(
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                b"x"
            )
            .is_none()
        );
    }
}
