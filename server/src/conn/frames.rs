//! Websocket frame boundaries, read from the byte stream as it passes (RFC 6455, section 5.2).
//!
//! Only the headers are decoded: enough to refuse a frame or a fragmented message over the
//! limit from its header, before its payload is read, and to know whether the outgoing stream
//! stands between two frames (where a close frame may be inserted).

/// A frame or message declared larger than the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooBig {
    pub size: u64,
}

/// Follows one direction of a websocket byte stream.
#[derive(Debug, Default)]
pub struct FrameScanner {
    header: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame not yet seen.
    remaining: u64,
    /// Bytes of the data message being assembled from fragments.
    message: u64,
}

const CONTINUATION: u8 = 0;
const FIRST_CONTROL_OPCODE: u8 = 8;

impl FrameScanner {
    /// True between two frames.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }

    /// Follows `bytes`; refuses a frame, or a data message summed over its fragments, larger
    /// than `limit`.
    pub fn feed(&mut self, mut bytes: &[u8], limit: u64) -> Result<(), TooBig> {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let skip = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                self.remaining -= skip as u64;
                bytes = &bytes[skip..];
                continue;
            }
            let want = self.header_len();
            let take = (want - self.have).min(bytes.len());
            self.header[self.have..self.have + take].copy_from_slice(&bytes[..take]);
            self.have += take;
            bytes = &bytes[take..];
            // The header length depends on its second byte: ask again once it is known.
            if self.have == self.header_len() {
                self.end_header(limit)?;
            }
        }
        Ok(())
    }

    fn header_len(&self) -> usize {
        if self.have < 2 {
            return 2;
        }
        let extended = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        2 + extended + mask
    }

    fn end_header(&mut self, limit: u64) -> Result<(), TooBig> {
        let opcode = self.header[0] & 0x0f;
        let len = match self.header[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.header[2..10]);
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        };
        self.have = 0;
        self.remaining = len;
        if opcode < FIRST_CONTROL_OPCODE {
            self.message = if opcode == CONTINUATION {
                self.message.saturating_add(len)
            } else {
                len
            };
            if self.message > limit {
                return Err(TooBig { size: self.message });
            }
        } else if len > limit {
            return Err(TooBig { size: len });
        }
        Ok(())
    }
}

/// The close frame a server sends for a message too big to process (status 1009).
pub const CLOSE_MESSAGE_TOO_BIG: [u8; 4] = [0x88, 0x02, 0x03, 0xf1];

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame header (masked, as clients must send).
    fn header(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
        let mut h = vec![(u8::from(fin) << 7) | opcode];
        match len {
            0..=125 => h.push(0x80 | len as u8),
            126..=0xffff => {
                h.push(0x80 | 126);
                h.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                h.push(0x80 | 127);
                h.extend_from_slice(&len.to_be_bytes());
            }
        }
        h.extend_from_slice(&[1, 2, 3, 4]);
        h
    }

    fn frame(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
        let mut f = header(fin, opcode, len as u64);
        f.extend(std::iter::repeat_n(b'x', len));
        f
    }

    #[test]
    fn frames_under_the_limit_pass_in_any_split() {
        let mut stream = frame(true, 1, 10);
        stream.extend(frame(true, 2, 300));
        stream.extend(frame(true, 9, 4)); // ping
        stream.extend(frame(true, 1, 70_000));
        for chunk in [1, 2, 3, 7, 64, 4096, stream.len()] {
            let mut s = FrameScanner::default();
            for piece in stream.chunks(chunk) {
                s.feed(piece, 70_000).expect("within the limit");
            }
            assert!(s.at_boundary(), "chunk {chunk}");
        }
    }

    #[test]
    fn a_large_frame_is_refused_from_its_header() {
        let mut s = FrameScanner::default();
        let h = header(true, 2, 15 << 20);
        assert_eq!(s.feed(&h, 1 << 20), Err(TooBig { size: 15 << 20 }));
    }

    #[test]
    fn a_fragmented_message_is_summed() {
        let mut s = FrameScanner::default();
        s.feed(&frame(false, 1, 600), 1000).expect("first fragment");
        // A control frame between fragments does not end the message.
        s.feed(&frame(true, 9, 2), 1000).expect("ping");
        assert_eq!(
            s.feed(&header(true, 0, 500), 1000),
            Err(TooBig { size: 1100 })
        );
        // A new message starts from zero.
        let mut s = FrameScanner::default();
        s.feed(&frame(true, 1, 600), 1000).expect("whole message");
        s.feed(&frame(true, 1, 600), 1000).expect("next message");
    }

    #[test]
    fn the_boundary_is_known_mid_stream() {
        let mut s = FrameScanner::default();
        let f = frame(true, 1, 100);
        s.feed(&f[..50], 1000).expect("partial");
        assert!(!s.at_boundary());
        s.feed(&f[50..], 1000).expect("rest");
        assert!(s.at_boundary());
        // Unmasked server frames have no mask key.
        let mut server = vec![0x81, 3];
        server.extend_from_slice(b"abc");
        s.feed(&server, 1000).expect("server frame");
        assert!(s.at_boundary());
    }
}
