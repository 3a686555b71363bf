//! The device's saved state: the spec-level facts of a virtio-net device (its MAC address and
//! link status, the receive modes, MAC and VLAN tables, the active queue pairs) and the
//! configuration they must be restored into, in one versioned blob (magic, version, fields,
//! CRC-32) that is refused whole if anything is off.
//!
//! Layout, little-endian: `"ONET"`, version (u16); configured MAC (6), MTU (u16), queue pairs
//! (u16); MAC (6), status (u16), receive modes (u8), active pairs (u16), unicast overflow (u8),
//! multicast overflow (u8), unicast count (u16), multicast count (u16), the addresses (6
//! each); the VLAN table (512); CRC-32 (IEEE) of everything before it (u32).

use crate::config::{MacAddress, STATUS_ANNOUNCE, STATUS_LINK_UP};
use crate::filter::{MacTable, RxMode, VlanTable, MAC_TABLE_ENTRIES, VLAN_IDS};

/// The blob's first four bytes.
const MAGIC: [u8; 4] = *b"ONET";
/// The only format version.
const VERSION: u16 = 1;
const FIXED_LEN: usize = 4 + 2 + 6 + 2 + 2 + 6 + 2 + 1 + 2 + 1 + 1 + 2 + 2;
const VLAN_LEN: usize = VLAN_IDS / 8;
/// The largest blob: a full MAC table.
pub const MAX_LEN: usize = FIXED_LEN + MAC_TABLE_ENTRIES * 6 + VLAN_LEN + 4;

/// What a virtio-net device saves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetState {
    /// The MAC address the device was configured with.
    pub config_mac: MacAddress,
    /// The configured MTU.
    pub mtu: u16,
    /// The configured number of queue pairs.
    pub max_pairs: u16,
    /// The MAC address in use (after `MAC_ADDR_SET`).
    pub mac: MacAddress,
    /// The status field.
    pub status: u16,
    /// The receive modes.
    pub mode: RxMode,
    /// The queue pairs the driver chose.
    pub pairs: u16,
    /// The MAC table.
    pub table: MacTable,
    /// The VLAN table.
    pub vlans: VlanTable,
}

/// Why a state blob was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// The blob's length does not match its content, or exceeds the cap.
    #[error("the state is {len} bytes, expected {expected}")]
    Length {
        /// Its length.
        len: usize,
        /// What its content implies (or the cap).
        expected: usize,
    },
    /// Not a virtio-net state.
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
    /// A field with an invalid value.
    #[error("field {field} has the invalid value {value}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// The state comes from a device configured differently.
    #[error("saved {field} {saved} does not match this device's {device}")]
    Mismatch {
        /// The field.
        field: &'static str,
        /// The saved value.
        saved: String,
        /// This device's value.
        device: String,
    },
}

/// CRC-32 with the IEEE polynomial (reflected), bit by bit: the blob is small.
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

/// Reads fields from the front of a byte slice whose length was checked.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        let mut out = [0u8; N];
        out.copy_from_slice(head);
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn mac(&mut self) -> MacAddress {
        MacAddress(self.take())
    }
}

fn flag(field: &'static str, value: u8) -> Result<bool, StateError> {
    match value {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(StateError::Invalid {
            field,
            value: value.into(),
        }),
    }
}

impl NetState {
    /// The blob.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.config_mac.0);
        out.extend_from_slice(&self.mtu.to_le_bytes());
        out.extend_from_slice(&self.max_pairs.to_le_bytes());
        out.extend_from_slice(&self.mac.0);
        out.extend_from_slice(&self.status.to_le_bytes());
        out.push(self.mode.bits());
        out.extend_from_slice(&self.pairs.to_le_bytes());
        out.push(u8::from(self.table.unicast_overflow));
        out.push(u8::from(self.table.multicast_overflow));
        out.extend_from_slice(&(self.table.unicast.len() as u16).to_le_bytes());
        out.extend_from_slice(&(self.table.multicast.len() as u16).to_le_bytes());
        for mac in self.table.unicast.iter().chain(&self.table.multicast) {
            out.extend_from_slice(&mac.0);
        }
        out.extend_from_slice(&self.vlans.to_bytes());
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads a blob written by [`NetState::encode`], checking its size, magic, version,
    /// checksum and every field.
    pub fn decode(blob: &[u8]) -> Result<Self, StateError> {
        if blob.len() < FIXED_LEN + VLAN_LEN + 4 || blob.len() > MAX_LEN {
            return Err(StateError::Length {
                len: blob.len(),
                expected: FIXED_LEN + VLAN_LEN + 4,
            });
        }
        let (content, crc) = blob.split_at(blob.len() - 4);
        let mut f = Fields(content);
        let magic = f.take::<4>();
        if magic != MAGIC {
            return Err(StateError::Magic { found: magic });
        }
        let version = f.u16();
        if version != VERSION {
            return Err(StateError::Version { found: version });
        }
        let found = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        let computed = crc32(content);
        if found != computed {
            return Err(StateError::Checksum { found, computed });
        }
        let config_mac = f.mac();
        let mtu = f.u16();
        let max_pairs = f.u16();
        let mac = f.mac();
        let status = f.u16();
        let mode_bits = f.u8();
        let pairs = f.u16();
        let unicast_overflow = flag("unicast_overflow", f.u8())?;
        let multicast_overflow = flag("multicast_overflow", f.u8())?;
        let unicast_count = usize::from(f.u16());
        let multicast_count = usize::from(f.u16());
        let invalid = |field: &'static str, value: u64| StateError::Invalid { field, value };
        if unicast_count + multicast_count > MAC_TABLE_ENTRIES {
            return Err(invalid("MAC table entries", (unicast_count + multicast_count) as u64));
        }
        let expected = FIXED_LEN + (unicast_count + multicast_count) * 6 + VLAN_LEN + 4;
        if blob.len() != expected {
            return Err(StateError::Length {
                len: blob.len(),
                expected,
            });
        }
        let unicast = (0..unicast_count).map(|_| f.mac()).collect();
        let multicast = (0..multicast_count).map(|_| f.mac()).collect();
        let vlans = VlanTable::from_bytes(&f.take::<VLAN_LEN>());
        let mode = RxMode::from_bits(mode_bits).ok_or(invalid("receive modes", mode_bits.into()))?;
        if status & !(STATUS_LINK_UP | STATUS_ANNOUNCE) != 0 {
            return Err(invalid("status", status.into()));
        }
        if mac.is_multicast() {
            return Err(invalid("mac (multicast)", 0));
        }
        if pairs == 0 || pairs > max_pairs {
            return Err(invalid("active queue pairs", pairs.into()));
        }
        Ok(NetState {
            config_mac,
            mtu,
            max_pairs,
            mac,
            status,
            mode,
            pairs,
            table: MacTable {
                unicast,
                multicast,
                unicast_overflow,
                multicast_overflow,
            },
            vlans,
        })
    }

    /// Refuses a state saved by a device configured unlike `device` (its own state).
    pub fn check_matches(&self, device: &NetState) -> Result<(), StateError> {
        let mismatch = |field, saved: String, device: String| {
            Err(StateError::Mismatch {
                field,
                saved,
                device,
            })
        };
        if self.config_mac != device.config_mac {
            return mismatch(
                "configured MAC",
                self.config_mac.to_string(),
                device.config_mac.to_string(),
            );
        }
        if self.mtu != device.mtu {
            return mismatch("MTU", self.mtu.to_string(), device.mtu.to_string());
        }
        if self.max_pairs != device.max_pairs {
            return mismatch(
                "queue pairs",
                self.max_pairs.to_string(),
                device.max_pairs.to_string(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> NetState {
        let mut vlans = VlanTable::default();
        vlans.set(10, true);
        vlans.set(4095, true);
        NetState {
            config_mac: MacAddress([0x52, 0x54, 0, 0, 0, 1]),
            mtu: 1500,
            max_pairs: 4,
            mac: MacAddress([0x52, 0x54, 0, 0, 0, 9]),
            status: STATUS_LINK_UP | STATUS_ANNOUNCE,
            mode: RxMode {
                allmulti: true,
                ..RxMode::default()
            },
            pairs: 3,
            table: MacTable::from_lists(
                vec![MacAddress([2, 0, 0, 0, 0, 1])],
                vec![MacAddress([1, 0, 0x5e, 0, 0, 1]), MacAddress([1, 0, 0x5e, 0, 0, 2])],
            ),
            vlans,
        }
    }

    fn reseal(blob: &mut [u8]) {
        let n = blob.len() - 4;
        let crc = crc32(&blob[..n]);
        blob[n..].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn state_round_trips() {
        let s = state();
        let blob = s.encode();
        assert_eq!(blob.len(), FIXED_LEN + 18 + VLAN_LEN + 4);
        assert_eq!(NetState::decode(&blob), Ok(s));
    }

    #[test]
    fn corrupt_truncated_or_oversized_state_is_refused() {
        let blob = state().encode();
        for i in 0..blob.len() {
            let mut bad = blob.clone();
            bad[i] ^= 0x10;
            assert!(NetState::decode(&bad).is_err(), "flipped byte {i} accepted");
        }
        assert!(NetState::decode(&blob[..blob.len() - 1]).is_err());
        assert!(NetState::decode(&[]).is_err());
        let mut long = blob.clone();
        long.extend([0; 6]);
        reseal(&mut long);
        assert!(matches!(NetState::decode(&long), Err(StateError::Length { .. })));
        assert!(NetState::decode(&vec![0; MAX_LEN + 1]).is_err());
    }

    #[test]
    fn invalid_fields_are_refused_even_with_a_valid_checksum() {
        let blob = state().encode();
        let field_at = |offset: usize, value: u8| {
            let mut b = blob.clone();
            b[offset] = value;
            reseal(&mut b);
            NetState::decode(&b)
        };
        // status at 22..24, mode bits at 24, pairs at 25..27, overflow flags at 27 and 28,
        // the unicast count at 29..31.
        assert!(matches!(field_at(24, 0x40), Err(StateError::Invalid { .. })), "modes");
        assert!(matches!(field_at(25, 0), Err(StateError::Invalid { .. })), "no pairs");
        assert!(matches!(field_at(25, 5), Err(StateError::Invalid { .. })), "too many pairs");
        assert!(matches!(field_at(27, 2), Err(StateError::Invalid { .. })), "overflow flag");
        assert!(matches!(field_at(22, 4), Err(StateError::Invalid { .. })), "status");
        assert!(matches!(field_at(16, 1), Err(StateError::Invalid { .. })), "multicast MAC");
        assert!(matches!(field_at(29, 65), Err(StateError::Invalid { .. })), "table size");
    }

    #[test]
    fn a_differently_configured_device_is_refused() {
        let s = state();
        for other in [
            NetState { mtu: 9000, ..state() },
            NetState { max_pairs: 2, ..state() },
            NetState {
                config_mac: MacAddress([0x52, 0x54, 0, 0, 0, 2]),
                ..state()
            },
        ] {
            assert!(matches!(s.check_matches(&other), Err(StateError::Mismatch { .. })));
        }
        let same_config = NetState {
            pairs: 1,
            mode: RxMode::default(),
            ..state()
        };
        assert_eq!(s.check_matches(&same_config), Ok(()));
    }
}
