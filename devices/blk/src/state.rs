//! The device's saved state: the spec-level facts a restored device must agree on, as a small
//! versioned payload written with the shared `outboard_virtio::state` codec.
//!
//! Layout, little-endian: `"OBLK"`, version (u16), writeback (bool), read_only (bool),
//! num_queues (u16), capacity in sectors (u64). The framework's state envelope around it carries
//! the format version, the device type, a CRC-32 and the size cap of the whole blob, so the
//! payload has neither; it is refused if it is truncated, too long, of another kind or version,
//! holds a boolean that is neither 0 nor 1, or comes from a device configured differently.

use outboard_virtio::state::{StateError, StateReader, StateWriter};

/// The payload's first four bytes.
const MAGIC: [u8; 4] = *b"OBLK";
/// The only payload version.
const VERSION: u16 = 1;
/// The payload's exact size.
const LEN: usize = 4 + 2 + 1 + 1 + 2 + 8;

/// What a virtio-blk device saves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkState {
    /// The `writeback` configuration field.
    pub writeback: bool,
    /// The capacity in 512-byte sectors.
    pub capacity: u64,
    /// Whether the device is read-only.
    pub read_only: bool,
    /// The number of request queues.
    pub num_queues: u16,
}

impl BlkState {
    /// The payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = StateWriter::new();
        w.u32(u32::from_le_bytes(MAGIC))
            .u16(VERSION)
            .bool(self.writeback)
            .bool(self.read_only)
            .u16(self.num_queues)
            .u64(self.capacity);
        w.finish()
    }

    /// Reads a payload written by [`BlkState::encode`], checking its size, magic, version and
    /// fields.
    pub fn decode(blob: &[u8]) -> Result<Self, StateError> {
        if blob.len() > LEN {
            return Err(StateError::Length {
                detail: format!("a virtio-blk state is {LEN} bytes, not {}", blob.len()),
            });
        }
        let mut r = StateReader::new(blob);
        if r.u32("magic")?.to_le_bytes() != MAGIC {
            return Err(StateError::BadMagic);
        }
        let version = r.u16("version")?;
        if version != VERSION {
            return Err(StateError::field(
                "version",
                format!("virtio-blk state version {version} is not supported (expected {VERSION})"),
            ));
        }
        let state = BlkState {
            writeback: r.bool("writeback")?,
            read_only: r.bool("read_only")?,
            num_queues: r.u16("num_queues")?,
            capacity: r.u64("capacity")?,
        };
        r.finish()?;
        Ok(state)
    }

    /// Refuses a state saved by a device configured unlike `device` (its own state).
    pub fn check_matches(&self, device: &BlkState) -> Result<(), StateError> {
        let fields = [
            ("capacity", self.capacity, device.capacity),
            (
                "num_queues",
                u64::from(self.num_queues),
                u64::from(device.num_queues),
            ),
            (
                "read_only",
                u64::from(self.read_only),
                u64::from(device.read_only),
            ),
        ];
        for (field, saved, device) in fields {
            if saved != device {
                return Err(StateError::field(
                    field,
                    format!("saved {saved}, but this device has {device}"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE: BlkState = BlkState {
        writeback: false,
        capacity: 2048,
        read_only: false,
        num_queues: 2,
    };

    #[test]
    fn state_round_trips() {
        let blob = STATE.encode();
        assert_eq!(blob.len(), LEN);
        assert_eq!(&blob[..4], b"OBLK");
        assert_eq!(BlkState::decode(&blob), Ok(STATE));
    }

    #[test]
    fn truncated_long_or_foreign_state_is_refused() {
        let blob = STATE.encode();
        for len in 0..LEN {
            let e = BlkState::decode(&blob[..len]);
            assert!(matches!(e, Err(StateError::Length { .. })), "{len}: {e:?}");
        }
        let mut long = blob.clone();
        long.push(0);
        assert!(matches!(
            BlkState::decode(&long),
            Err(StateError::Length { .. })
        ));
        let mut bad = blob.clone();
        bad[0] = b'X';
        assert_eq!(BlkState::decode(&bad), Err(StateError::BadMagic));
        let mut bad = blob.clone();
        bad[4] = 2;
        assert!(matches!(
            BlkState::decode(&bad),
            Err(StateError::Field {
                field: "version",
                ..
            })
        ));
    }

    #[test]
    fn invalid_flags_are_refused() {
        for at in [6, 7] {
            let mut blob = STATE.encode();
            blob[at] = 2;
            let e = BlkState::decode(&blob);
            assert!(matches!(e, Err(StateError::Field { .. })), "{at}: {e:?}");
        }
    }

    #[test]
    fn a_differently_configured_device_is_refused() {
        let other = BlkState {
            capacity: 4096,
            ..STATE
        };
        assert!(matches!(
            STATE.check_matches(&other),
            Err(StateError::Field {
                field: "capacity",
                ..
            })
        ));
        let other = BlkState {
            num_queues: 1,
            writeback: true,
            ..STATE
        };
        assert!(matches!(
            STATE.check_matches(&other),
            Err(StateError::Field {
                field: "num_queues",
                ..
            })
        ));
        let same_but_cache = BlkState {
            writeback: true,
            ..STATE
        };
        assert_eq!(STATE.check_matches(&same_but_cache), Ok(()));
    }
}
