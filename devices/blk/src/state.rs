//! The device's saved state: the spec-level facts a restored device must agree on, in a small
//! versioned blob (magic, version, fields, CRC-32), refused whole if anything is off.
//!
//! Layout, little-endian: `"OBLK"`, version (u16), writeback (u8, 0 or 1), read_only (u8, 0 or
//! 1), num_queues (u16), capacity in sectors (u64), CRC-32 (IEEE) of everything before it (u32).

/// The blob's first four bytes.
const MAGIC: [u8; 4] = *b"OBLK";
/// The only format version.
const VERSION: u16 = 1;
/// The blob's exact size: its size cap, too.
const LEN: usize = 4 + 2 + 1 + 1 + 2 + 8 + 4;

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

/// Why a state blob was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// The blob is truncated or too long.
    #[error("the state is {len} bytes, expected {LEN}")]
    Length {
        /// Its length.
        len: usize,
    },
    /// Not a virtio-blk state.
    #[error("bad magic {found:02x?}")]
    Magic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// A format version this code does not read.
    #[error("state version {found} is not supported (expected {VERSION})")]
    Version {
        /// The blob's version.
        found: u16,
    },
    /// The blob was corrupted.
    #[error("checksum {found:#010x} does not match the content ({computed:#010x})")]
    Checksum {
        /// The stored checksum.
        found: u32,
        /// The checksum of the content.
        computed: u32,
    },
    /// A boolean field that is neither 0 nor 1.
    #[error("field {field} has the invalid value {value}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u8,
    },
    /// The state comes from a device configured differently.
    #[error("saved {field} {saved} does not match this device's {device}")]
    Mismatch {
        /// The field.
        field: &'static str,
        /// The saved value.
        saved: u64,
        /// This device's value.
        device: u64,
    },
}

/// CRC-32 with the IEEE polynomial (reflected), bit by bit: the blob is a few bytes.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

fn flag(field: &'static str, value: u8) -> Result<bool, StateError> {
    match value {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(StateError::Invalid { field, value }),
    }
}

impl BlkState {
    /// The blob.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(u8::from(self.writeback));
        out.push(u8::from(self.read_only));
        out.extend_from_slice(&self.num_queues.to_le_bytes());
        out.extend_from_slice(&self.capacity.to_le_bytes());
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads a blob written by [`BlkState::encode`], checking its length, magic, version,
    /// checksum and fields.
    pub fn decode(blob: &[u8]) -> Result<Self, StateError> {
        let Ok(b) = <&[u8; LEN]>::try_from(blob) else {
            return Err(StateError::Length { len: blob.len() });
        };
        let [m0, m1, m2, m3, v0, v1, writeback, read_only, q0, q1, c0, c1, c2, c3, c4, c5, c6, c7, k0, k1, k2, k3] =
            *b;
        if [m0, m1, m2, m3] != MAGIC {
            return Err(StateError::Magic {
                found: [m0, m1, m2, m3],
            });
        }
        let version = u16::from_le_bytes([v0, v1]);
        if version != VERSION {
            return Err(StateError::Version { found: version });
        }
        let found = u32::from_le_bytes([k0, k1, k2, k3]);
        let computed = crc32(&b[..LEN - 4]);
        if found != computed {
            return Err(StateError::Checksum { found, computed });
        }
        Ok(BlkState {
            writeback: flag("writeback", writeback)?,
            read_only: flag("read_only", read_only)?,
            num_queues: u16::from_le_bytes([q0, q1]),
            capacity: u64::from_le_bytes([c0, c1, c2, c3, c4, c5, c6, c7]),
        })
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
                return Err(StateError::Mismatch {
                    field,
                    saved,
                    device,
                });
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
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn state_round_trips() {
        let blob = STATE.encode();
        assert_eq!(blob.len(), LEN);
        assert_eq!(BlkState::decode(&blob), Ok(STATE));
    }

    #[test]
    fn corrupt_or_truncated_state_is_refused() {
        let blob = STATE.encode();
        assert_eq!(
            BlkState::decode(&blob[..LEN - 1]),
            Err(StateError::Length { len: LEN - 1 })
        );
        let mut long = blob.clone();
        long.push(0);
        assert!(matches!(
            BlkState::decode(&long),
            Err(StateError::Length { .. })
        ));
        for i in 0..LEN {
            let mut bad = blob.clone();
            bad[i] ^= 0x10;
            assert!(BlkState::decode(&bad).is_err(), "flipped byte {i} accepted");
        }
        let mut bad = blob.clone();
        bad[0] = b'X';
        assert!(matches!(
            BlkState::decode(&bad),
            Err(StateError::Magic { .. })
        ));
    }

    #[test]
    fn invalid_flags_are_refused_even_with_a_valid_checksum() {
        let mut blob = STATE.encode();
        blob[6] = 2;
        let crc = crc32(&blob[..LEN - 4]);
        blob[LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            BlkState::decode(&blob),
            Err(StateError::Invalid {
                field: "writeback",
                value: 2
            })
        );
    }

    #[test]
    fn a_differently_configured_device_is_refused() {
        let other = BlkState {
            capacity: 4096,
            ..STATE
        };
        assert!(matches!(
            STATE.check_matches(&other),
            Err(StateError::Mismatch {
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
            Err(StateError::Mismatch {
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
