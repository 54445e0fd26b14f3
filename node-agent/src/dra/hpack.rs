//! The parts of HPACK (RFC 7541) the `:authority` relay needs: integers,
//! string literals (Huffman-coded ones decoded), the static table's names,
//! and a mirror of one direction's dynamic table that records, for each
//! entry, its size and whether its name is `:authority`.
//!
//! The relay replaces each `:authority` value with one of the same decoded
//! length, so the client's and the server's dynamic tables keep entries of
//! the same sizes and evict at the same moments; the mirror lets it follow
//! a name that refers to an earlier `:authority` entry by dynamic index.

use std::collections::VecDeque;

/// The dynamic table's size before any update (SETTINGS_HEADER_TABLE_SIZE's
/// default, which the agent's gRPC server keeps).
pub const DEFAULT_TABLE_SIZE: usize = 4096;
/// Static table index of `:authority` (RFC 7541, Appendix A).
const AUTHORITY_INDEX: u64 = 1;
/// An entry's overhead in the table's size (RFC 7541, section 4.1).
const ENTRY_OVERHEAD: usize = 32;

/// The names of the static table (RFC 7541, Appendix A), index 1 first.
const STATIC_NAMES: [&str; 61] = [
    ":authority",
    ":method",
    ":method",
    ":path",
    ":path",
    ":scheme",
    ":scheme",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "accept",
    "access-control-allow-origin",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "content-disposition",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-range",
    "content-type",
    "cookie",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "link",
    "location",
    "max-forwards",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "refresh",
    "retry-after",
    "server",
    "set-cookie",
    "strict-transport-security",
    "transfer-encoding",
    "user-agent",
    "vary",
    "via",
    "www-authenticate",
];

/// The length in bits of each symbol's Huffman code (RFC 7541, Appendix
/// B); EOS (256) has 30. The code is canonical: codes of one length are
/// consecutive, in symbol order, after the last code of the length before,
/// so the lengths alone define it.
const CODE_LENGTHS: [u8; 256] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, //
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, //
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, //
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, //
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, //
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, //
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, //
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, //
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, //
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, //
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, //
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, //
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, //
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, //
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, //
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, //
];
const EOS_LENGTH: u8 = 30;

/// For each code length: its first code and its symbols, in order.
struct Canonical {
    first: [u32; 31],
    symbols: [Vec<u16>; 31],
}

fn canonical() -> &'static Canonical {
    static TABLE: std::sync::OnceLock<Canonical> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut symbols: [Vec<u16>; 31] = Default::default();
        for (sym, len) in CODE_LENGTHS.iter().enumerate() {
            symbols[usize::from(*len)].push(sym as u16);
        }
        symbols[usize::from(EOS_LENGTH)].push(256);
        let mut first = [0u32; 31];
        let mut code = 0u32;
        for len in 1..31 {
            code <<= 1;
            first[len] = code;
            code += symbols[len].len() as u32;
        }
        Canonical { first, symbols }
    })
}

/// Decodes a Huffman-coded string; `None` if it is not valid HPACK
/// (EOS inside, padding longer than 7 bits or not all ones).
pub fn huffman_decode(bits: &[u8]) -> Option<Vec<u8>> {
    let table = canonical();
    let mut out = Vec::with_capacity(bits.len() * 8 / 5);
    let (mut code, mut len) = (0u32, 0usize);
    for byte in bits {
        for i in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> i) & 1);
            len += 1;
            let offset = code.wrapping_sub(table.first[len]) as usize;
            if let Some(sym) = table.symbols[len]
                .get(offset)
                .filter(|_| code >= table.first[len])
            {
                if *sym == 256 {
                    return None;
                }
                out.push(*sym as u8);
                code = 0;
                len = 0;
            } else if len >= usize::from(EOS_LENGTH) {
                return None;
            }
        }
    }
    // What is left is padding: fewer than 8 bits, all ones.
    if len > 7 || code != (1u32 << len) - 1 {
        return None;
    }
    Some(out)
}

/// Reads an integer with an N-bit prefix (RFC 7541, section 5.1).
pub fn read_int(buf: &[u8], pos: &mut usize, prefix_bits: u32) -> Option<u64> {
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

/// Writes an integer with an N-bit prefix after `first_bits`.
pub fn write_int(out: &mut Vec<u8>, first_bits: u8, prefix_bits: u32, mut value: u64) {
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

/// A string literal: where it ends and its decoded bytes.
fn read_string(buf: &[u8], pos: &mut usize) -> Option<Vec<u8>> {
    let huffman = *buf.get(*pos)? & 0x80 != 0;
    let len = usize::try_from(read_int(buf, pos, 7)?).ok()?;
    let end = pos.checked_add(len)?;
    let raw = buf.get(*pos..end)?;
    *pos = end;
    if huffman {
        huffman_decode(raw)
    } else {
        Some(raw.to_vec())
    }
}

/// Why a header block could not be rewritten. The connection cannot go on
/// after it: the two dynamic tables may no longer agree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("truncated or invalid HPACK representation at byte {0}")]
    Invalid(usize),
    #[error("index {0} is in neither the static nor the dynamic table")]
    Index(u64),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    authority: bool,
    name_len: usize,
    size: usize,
}

/// One direction's dynamic table as the relay follows it.
#[derive(Debug)]
pub struct Rewriter {
    entries: VecDeque<Entry>,
    size: usize,
    max: usize,
    /// The first `:authority` value seen, for the log.
    pub first_authority: Option<String>,
    /// How many `:authority` values were replaced.
    pub replaced: u64,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            max: DEFAULT_TABLE_SIZE,
            first_authority: None,
            replaced: 0,
        }
    }
}

impl Rewriter {
    fn evict(&mut self) {
        while self.size > self.max {
            match self.entries.pop_back() {
                Some(e) => self.size -= e.size,
                None => break,
            }
        }
    }

    fn insert(&mut self, e: Entry) {
        if e.size > self.max {
            // RFC 7541, section 4.4: the table is emptied, nothing added.
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.entries.push_front(e);
        self.size += e.size;
        self.evict();
    }

    /// (is `:authority`, name length) of the name at `index`.
    fn name(&self, index: u64) -> Result<(bool, usize), BlockError> {
        let i = usize::try_from(index).map_err(|_| BlockError::Index(index))?;
        match i {
            0 => Err(BlockError::Index(index)),
            1..=61 => Ok((index == AUTHORITY_INDEX, STATIC_NAMES[i - 1].len())),
            _ => self
                .entries
                .get(i - 62)
                .map(|e| (e.authority, e.name_len))
                .ok_or(BlockError::Index(index)),
        }
    }

    /// The header block with every `:authority` value replaced by as many
    /// `fill` bytes as it had (sent as a plain string), every other byte as
    /// it was; the mirror table follows the block.
    pub fn rewrite(&mut self, block: &[u8], fill: u8) -> Result<Vec<u8>, BlockError> {
        let mut out = Vec::with_capacity(block.len() + 64);
        let mut pos = 0;
        while pos < block.len() {
            let start = pos;
            let b = block[pos];
            let bad = || BlockError::Invalid(start);
            if b & 0x80 != 0 {
                // Indexed field: nothing inserted, nothing to change.
                let index = read_int(block, &mut pos, 7).ok_or_else(bad)?;
                self.name(index)?;
                out.extend_from_slice(&block[start..pos]);
                continue;
            }
            if b & 0xe0 == 0x20 {
                let max = read_int(block, &mut pos, 5).ok_or_else(bad)?;
                self.max = usize::try_from(max).map_err(|_| bad())?;
                self.evict();
                out.extend_from_slice(&block[start..pos]);
                continue;
            }
            // A literal: with incremental indexing (01), without (0000)
            // or never indexed (0001).
            let indexing = b & 0xc0 == 0x40;
            let index = read_int(block, &mut pos, if indexing { 6 } else { 4 }).ok_or_else(bad)?;
            let (authority, name_len) = if index == 0 {
                let name = read_string(block, &mut pos).ok_or_else(bad)?;
                (name == b":authority", name.len())
            } else {
                self.name(index)?
            };
            let name_end = pos;
            let value = read_string(block, &mut pos).ok_or_else(bad)?;
            if authority && !value.is_empty() {
                if self.first_authority.is_none() {
                    self.first_authority = Some(String::from_utf8_lossy(&value).into_owned());
                }
                out.extend_from_slice(&block[start..name_end]);
                write_int(&mut out, 0x00, 7, value.len() as u64);
                out.resize(out.len() + value.len(), fill);
                self.replaced += 1;
            } else {
                out.extend_from_slice(&block[start..pos]);
            }
            if indexing {
                self.insert(Entry {
                    authority,
                    name_len,
                    size: name_len + value.len() + ENTRY_OVERHEAD,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Huffman-encodes `s` with the canonical code (for the tests' encoder).
    pub fn huffman_encode(s: &[u8]) -> Vec<u8> {
        let t = canonical();
        let mut bits: Vec<bool> = Vec::new();
        for &c in s {
            let len = CODE_LENGTHS[usize::from(c)];
            let pos = t.symbols[usize::from(len)]
                .iter()
                .position(|&x| x == u16::from(c))
                .unwrap();
            let code = t.first[usize::from(len)] + pos as u32;
            bits.extend((0..len).rev().map(|i| (code >> i) & 1 == 1));
        }
        while !bits.len().is_multiple_of(8) {
            bits.push(true);
        }
        bits.chunks(8)
            .map(|b| b.iter().fold(0u8, |acc, &x| acc << 1 | u8::from(x)))
            .collect()
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn huffman_decodes_the_rfc_examples() {
        // RFC 7541, Appendix C.4 and C.6.
        for (coded, plain) in [
            ("f1e3c2e5f23a6ba0ab90f4ff", "www.example.com"),
            ("a8eb10649cbf", "no-cache"),
            ("25a849e95ba97d7f", "custom-key"),
            ("25a849e95bb8e8b4bf", "custom-value"),
            ("6402", "302"),
            ("aec3771a4b", "private"),
        ] {
            assert_eq!(huffman_decode(&hex(coded)).unwrap(), plain.as_bytes());
            assert_eq!(huffman_encode(plain.as_bytes()), hex(coded));
        }
        let every: Vec<u8> = (0..=255).collect();
        assert_eq!(huffman_decode(&huffman_encode(&every)).unwrap(), every);
        assert_eq!(huffman_decode(&[]).unwrap(), b"");
    }

    #[test]
    fn invalid_huffman_is_refused_not_guessed() {
        // Padding of 8 bits (a whole byte of ones).
        let mut long_pad = huffman_encode(b"a");
        long_pad.push(0xff);
        assert_eq!(huffman_decode(&long_pad), None);
        // Padding that is not all ones: 'a' is 00011, then 000 instead of 111.
        assert_eq!(huffman_decode(&[0b0001_1000]), None);
        // EOS (30 ones) inside the string.
        assert_eq!(huffman_decode(&[0xff, 0xff, 0xff, 0xff]), None);
    }

    // --- a reference HPACK codec, as the kubelet's (Go) encoder behaves ---

    const STATIC_VALUES: [&str; 61] = [
        "",
        "GET",
        "POST",
        "/",
        "/index.html",
        "http",
        "https",
        "200",
        "204",
        "206",
        "304",
        "400",
        "404",
        "500",
        "",
        "gzip, deflate",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
    ];

    #[derive(Default)]
    pub struct Table {
        entries: VecDeque<(String, String)>,
        pub max: usize,
    }

    impl Table {
        pub fn new() -> Self {
            Self {
                entries: VecDeque::new(),
                max: DEFAULT_TABLE_SIZE,
            }
        }
        fn size(&self) -> usize {
            self.entries
                .iter()
                .map(|(n, v)| n.len() + v.len() + 32)
                .sum()
        }
        fn evict(&mut self) {
            while self.size() > self.max {
                self.entries.pop_back();
            }
        }
        fn insert(&mut self, n: &str, v: &str) {
            self.entries.push_front((n.into(), v.into()));
            self.evict();
        }
        fn get(&self, i: usize) -> (String, String) {
            if i <= 61 {
                (STATIC_NAMES[i - 1].into(), STATIC_VALUES[i - 1].into())
            } else {
                self.entries[i - 62].clone()
            }
        }
        fn find(&self, n: &str, v: &str) -> (Option<usize>, Option<usize>) {
            let all = (1..=61).chain(62..62 + self.entries.len());
            let mut name = None;
            for i in all {
                let (en, ev) = self.get(i);
                if en == n && ev == v {
                    return (Some(i), None);
                }
                if en == n && name.is_none() {
                    name = Some(i);
                }
            }
            (None, name)
        }
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        let h = huffman_encode(s.as_bytes());
        if h.len() < s.len() {
            write_int(out, 0x80, 7, h.len() as u64);
            out.extend(h);
        } else {
            write_int(out, 0, 7, s.len() as u64);
            out.extend(s.as_bytes());
        }
    }

    /// Encodes a header list: indexed where the table has it, else a
    /// literal with incremental indexing (name by index where possible),
    /// Huffman where shorter.
    pub fn encode(t: &mut Table, headers: &[(&str, &str)], size_update: Option<usize>) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(s) = size_update {
            write_int(&mut out, 0x20, 5, s as u64);
            t.max = s;
            t.evict();
        }
        for (n, v) in headers {
            match t.find(n, v) {
                (Some(i), _) => write_int(&mut out, 0x80, 7, i as u64),
                (None, name) => {
                    write_int(&mut out, 0x40, 6, name.unwrap_or(0) as u64);
                    if name.is_none() {
                        string(&mut out, n);
                    }
                    string(&mut out, v);
                    t.insert(n, v);
                }
            }
        }
        out
    }

    /// Decodes a header block against `t`.
    pub fn decode(t: &mut Table, block: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < block.len() {
            let b = block[pos];
            if b & 0x80 != 0 {
                let i = read_int(block, &mut pos, 7).unwrap() as usize;
                out.push(t.get(i));
            } else if b & 0xe0 == 0x20 {
                t.max = read_int(block, &mut pos, 5).unwrap() as usize;
                t.evict();
            } else {
                let indexing = b & 0xc0 == 0x40;
                let i = read_int(block, &mut pos, if indexing { 6 } else { 4 }).unwrap() as usize;
                let name = if i == 0 {
                    String::from_utf8(read_string(block, &mut pos).unwrap()).unwrap()
                } else {
                    t.get(i).0
                };
                let value = String::from_utf8(read_string(block, &mut pos).unwrap()).unwrap();
                if indexing {
                    t.insert(&name, &value);
                }
                out.push((name, value));
            }
        }
        out
    }

    fn xs(s: &str) -> String {
        "x".repeat(s.len())
    }

    /// A long-lived connection as the kubelet's gRPC client makes one: the
    /// socket path as `:authority` (Huffman-coded, then indexed), a
    /// changing `grpc-timeout` that fills the table until it evicts, a
    /// table size update, and an `:authority` named by a dynamic index.
    #[test]
    fn a_long_connection_decodes_the_same_on_both_sides_but_the_authority() {
        let path = "/var/lib/kubelet/plugins/simulated-foo-dra.devplug.io/dra.sock";
        let mut client = Table::new();
        let mut server = Table::new();
        let mut mirror = Rewriter::default();
        for call in 0..400u32 {
            let timeout = format!("{}m", 10_000 + call * 7);
            let rpc = if call % 3 == 0 {
                "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodePrepareResources"
            } else {
                "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/NodeUnprepareResources"
            };
            let headers = [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", rpc),
                (":authority", path),
                ("content-type", "application/grpc"),
                ("user-agent", "grpc-go/1.72.1"),
                ("te", "trailers"),
                ("grpc-timeout", timeout.as_str()),
            ];
            let update = match call {
                100 => Some(1024),
                101 => Some(4096),
                _ => None,
            };
            let block = encode(&mut client, &headers, update);
            let out = mirror.rewrite(&block, b'x').unwrap();
            let got = decode(&mut server, &out);
            let want: Vec<(String, String)> = headers
                .iter()
                .map(|(n, v)| {
                    let v = if *n == ":authority" {
                        xs(v)
                    } else {
                        v.to_string()
                    };
                    (n.to_string(), v)
                })
                .collect();
            assert_eq!(got, want, "call {call}");
        }
        // Each call inserted a new grpc-timeout: the table evicted, the
        // authority's entry among others, so it was sent again as a literal.
        assert!(client.entries.len() < 100, "the table must have evicted");
        assert!(mirror.replaced > 1, "the authority was sent again");
        assert_eq!(mirror.first_authority.as_deref(), Some(path));
    }

    #[test]
    fn an_authority_named_by_a_dynamic_index_is_rewritten_too() {
        let mut client = Table::new();
        let mut server = Table::new();
        let mut mirror = Rewriter::default();
        // First request: :authority inserted at 62 (literal name, not index 1).
        let mut first = Vec::new();
        write_int(&mut first, 0x40, 6, 0);
        string(&mut first, ":authority");
        string(&mut first, "/a/b");
        client.insert(":authority", "/a/b");
        // Second: a literal without indexing whose name is entry 62.
        let mut second = Vec::new();
        write_int(&mut second, 0x00, 4, 62);
        string(&mut second, "/c/d/e");
        for (block, want) in [(first, "xxxx"), (second, "xxxxxx")] {
            let out = mirror.rewrite(&block, b'x').unwrap();
            let got = decode(&mut server, &out);
            assert_eq!(got, vec![(":authority".to_string(), want.to_string())]);
        }
    }

    #[test]
    fn malformed_blocks_are_refused_not_forwarded() {
        let mut m = Rewriter::default();
        assert!(m.rewrite(&[0x41, 0x7f], b'x').is_err());
        assert!(m.rewrite(&[0x41, 0x05, b'a'], b'x').is_err());
        assert!(m.rewrite(&[0xff; 10], b'x').is_err());
        // Index 0, and a dynamic index the table does not hold.
        assert_eq!(m.rewrite(&[0x80], b'x'), Err(BlockError::Index(0)));
        assert_eq!(m.rewrite(&[0xbe], b'x'), Err(BlockError::Index(62)));
        // A Huffman value with bad padding.
        assert!(m.rewrite(&[0x41, 0x81, 0b0001_1000], b'x').is_err());
    }
}
