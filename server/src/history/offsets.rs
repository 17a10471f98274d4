//! Offsets: where a message sits in a history, and where a client stands.
//!
//! Each Redis keeps its own sequence, so a message published on two Redis has a [`Stamp`] on
//! each. A client's offset is a [`Position`]: the last stamp this replica had taken from each
//! Redis when it handed the client its latest message. A message counts as received when one
//! of its stamps is at or before the position's stamp of the same Redis (the same epoch): the
//! replica takes every Redis's messages in that Redis's order, so everything up to those
//! stamps had reached it, and the client, by then. With one Redis a position is one stamp, and
//! the offset reads as it always has.

/// Stamps in one offset at most (one per Redis).
pub const MAX_STAMPS: usize = 8;

/// Where a room message sits in the app's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub epoch: u64,
    pub seq: u64,
    /// When it was stamped, in ms since the Unix epoch (Redis' clock, or this process').
    pub ms: u64,
}

impl Stamp {
    /// The offset clients receive and hand back to `resume`; opaque to them.
    pub fn offset(&self) -> String {
        format!("{:x}-{}-{}", self.epoch, self.seq, self.ms)
    }

    pub fn parse_offset(offset: &str) -> Option<Stamp> {
        let mut parts = offset.splitn(3, '-');
        let epoch = u64::from_str_radix(parts.next()?, 16).ok()?;
        let seq = parts.next()?.parse().ok()?;
        let ms = parts.next()?.parse().ok()?;
        Some(Stamp { epoch, seq, ms })
    }

    /// A stamped message as it travels on the bus and sits in a history:
    /// `s<offset>|<message JSON>`. Unstamped messages are their JSON alone.
    pub fn encode(&self, json: &str) -> String {
        format!("s{}|{json}", self.offset())
    }

    /// Splits a bus payload or history entry into its stamp (if any) and message JSON.
    pub fn decode(payload: &[u8]) -> (Option<Stamp>, &[u8]) {
        let Some(rest) = payload.strip_prefix(b"s") else {
            return (None, payload);
        };
        let Some(bar) = rest.iter().position(|b| *b == b'|') else {
            return (None, payload);
        };
        let stamp = std::str::from_utf8(&rest[..bar])
            .ok()
            .and_then(Stamp::parse_offset);
        match stamp {
            Some(stamp) => (Some(stamp), &rest[bar + 1..]),
            None => (None, payload),
        }
    }
}

/// Where a client stands: at most one stamp per epoch (per Redis), in no particular order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position(Vec<Stamp>);

impl Position {
    pub fn of(stamps: impl IntoIterator<Item = Stamp>) -> Self {
        let mut p = Self::default();
        for s in stamps {
            p.advance(s);
        }
        p
    }

    /// The offset clients hold: the stamps' offsets joined by `.`.
    pub fn offset(&self) -> String {
        let parts: Vec<String> = self.0.iter().map(Stamp::offset).collect();
        parts.join(".")
    }

    /// `None` for anything this server did not hand out.
    pub fn parse(offset: &str) -> Option<Self> {
        let parts: Vec<&str> = offset.split('.').collect();
        if parts.len() > MAX_STAMPS {
            return None;
        }
        let stamps = parts
            .into_iter()
            .map(Stamp::parse_offset)
            .collect::<Option<Vec<_>>>()?;
        Some(Self::of(stamps))
    }

    /// The stamp of `epoch`, if any.
    pub fn get(&self, epoch: u64) -> Option<Stamp> {
        self.0.iter().copied().find(|s| s.epoch == epoch)
    }

    pub fn stamps(&self) -> &[Stamp] {
        &self.0
    }

    /// Moves to `stamp` in its epoch (never back).
    pub fn advance(&mut self, stamp: Stamp) {
        match self.0.iter_mut().find(|s| s.epoch == stamp.epoch) {
            Some(s) if s.seq < stamp.seq => *s = stamp,
            Some(_) => {}
            None => self.0.push(stamp),
        }
    }

    /// The later of both, epoch by epoch.
    pub fn merge(&mut self, other: &Position) {
        for s in &other.0 {
            self.advance(*s);
        }
    }

    /// Whether a message with this stamp counts as received at this position.
    pub fn covers(&self, stamp: Stamp) -> bool {
        self.get(stamp.epoch).is_some_and(|s| stamp.seq <= s.seq)
    }
}

#[cfg(test)]
impl Stamp {
    /// A stamp for tests, its time following its sequence number.
    pub(crate) fn test(epoch: u64, seq: u64) -> Self {
        Stamp {
            epoch,
            seq,
            ms: 1000 + seq,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(epoch: u64, seq: u64) -> Stamp {
        Stamp::test(epoch, seq)
    }

    #[test]
    fn stamps_and_payloads_round_trip() {
        let s = st(7, 42);
        assert_eq!(Stamp::parse_offset(&s.offset()), Some(s));
        let encoded = s.encode(r#"{"a":"b|c"}"#);
        assert_eq!(
            Stamp::decode(encoded.as_bytes()),
            (Some(s), &br#"{"a":"b|c"}"#[..])
        );
        assert_eq!(Stamp::decode(b"{}"), (None, &b"{}"[..]));
        assert_eq!(Stamp::parse_offset("nope"), None);
        assert_eq!(Stamp::parse_offset("7-1"), None);
    }

    #[test]
    fn one_stamp_reads_as_a_plain_offset_and_several_join() {
        let one = Position::of([st(7, 42)]);
        assert_eq!(one.offset(), st(7, 42).offset());
        let two = Position::of([st(7, 42), st(9, 3)]);
        assert_eq!(
            two.offset(),
            format!("{}.{}", st(7, 42).offset(), st(9, 3).offset())
        );
        assert_eq!(Position::parse(&two.offset()), Some(two));
        assert_eq!(Position::parse("7-1-2.x"), None);
        assert_eq!(Position::parse(""), None);
        let many = vec![st(1, 1).offset(); MAX_STAMPS + 1].join(".");
        assert_eq!(Position::parse(&many), None);
    }

    #[test]
    fn positions_only_move_forward_per_epoch() {
        let mut p = Position::of([st(7, 5)]);
        p.advance(st(7, 3));
        p.advance(st(9, 1));
        p.merge(&Position::of([st(7, 8), st(9, 0)]));
        assert_eq!(p.get(7), Some(st(7, 8)));
        assert_eq!(p.get(9), Some(st(9, 1)));
        assert!(p.covers(st(7, 8)) && !p.covers(st(7, 9)));
        assert!(!p.covers(st(8, 1)), "another epoch is never covered");
    }
}
