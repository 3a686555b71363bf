//! The device's saved state: the spec-level facts of a virtio-net device (its MAC address and
//! link status, the receive modes, MAC and VLAN tables, the active queue pairs) and the
//! configuration they must be restored into, as a small versioned payload written with the
//! shared `outboard_virtio::state` codec.
//!
//! Layout, little-endian: `"ONET"`, version (u16); configured MAC (6), MTU (u16), queue pairs
//! (u16); MAC (6), status (u16), receive modes (u8), active pairs (u16), unicast overflow
//! (bool), multicast overflow (bool), unicast count (u16), multicast count (u16), the addresses
//! (6 each); the VLAN table (64 × u64). The framework's state envelope around it carries the
//! format version, the device type, a CRC-32 and the size cap of the whole blob, so the payload
//! has neither; it is refused if it is truncated, too long, of another kind or version, holds an
//! invalid field, or comes from a device configured differently.

pub use outboard_virtio::state::StateError;
use outboard_virtio::state::{StateReader, StateWriter};

use crate::config::{MacAddress, STATUS_ANNOUNCE, STATUS_LINK_UP};
use crate::filter::{MacTable, RxMode, VlanTable, MAC_TABLE_ENTRIES, VLAN_IDS};

/// The payload's first four bytes.
const MAGIC: [u8; 4] = *b"ONET";
/// The only payload version.
const VERSION: u16 = 1;
const FIXED_LEN: usize = 4 + 2 + 6 + 2 + 2 + 6 + 2 + 1 + 2 + 1 + 1 + 2 + 2;
const VLAN_LEN: usize = VLAN_IDS / 8;
/// The largest payload: a full MAC table.
pub const MAX_LEN: usize = FIXED_LEN + MAC_TABLE_ENTRIES * 6 + VLAN_LEN;

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

fn write_mac(w: &mut StateWriter, mac: MacAddress) {
    for b in mac.0 {
        w.u8(b);
    }
}

fn read_mac(r: &mut StateReader, field: &'static str) -> Result<MacAddress, StateError> {
    let mut m = [0u8; 6];
    for b in &mut m {
        *b = r.u8(field)?;
    }
    Ok(MacAddress(m))
}

impl NetState {
    /// The payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = StateWriter::new();
        w.u32(u32::from_le_bytes(MAGIC)).u16(VERSION);
        write_mac(&mut w, self.config_mac);
        w.u16(self.mtu).u16(self.max_pairs);
        write_mac(&mut w, self.mac);
        w.u16(self.status)
            .u8(self.mode.bits())
            .u16(self.pairs)
            .bool(self.table.unicast_overflow)
            .bool(self.table.multicast_overflow)
            .u16(self.table.unicast.len() as u16)
            .u16(self.table.multicast.len() as u16);
        for mac in self.table.unicast.iter().chain(&self.table.multicast) {
            write_mac(&mut w, *mac);
        }
        for chunk in self.vlans.to_bytes().chunks_exact(8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            w.u64(u64::from_le_bytes(word));
        }
        w.finish()
    }

    /// Reads a payload written by [`NetState::encode`], checking its size, magic, version and
    /// every field.
    pub fn decode(blob: &[u8]) -> Result<Self, StateError> {
        if blob.len() > MAX_LEN {
            return Err(StateError::Length {
                detail: format!(
                    "a virtio-net state is at most {MAX_LEN} bytes, not {}",
                    blob.len()
                ),
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
                format!("virtio-net state version {version} is not supported (expected {VERSION})"),
            ));
        }
        let config_mac = read_mac(&mut r, "configured MAC")?;
        let mtu = r.u16("MTU")?;
        let max_pairs = r.u16("queue pairs")?;
        let mac = read_mac(&mut r, "MAC")?;
        let status = r.u16("status")?;
        let mode_bits = r.u8("receive modes")?;
        let pairs = r.u16("active queue pairs")?;
        let unicast_overflow = r.bool("unicast overflow")?;
        let multicast_overflow = r.bool("multicast overflow")?;
        let unicast_count = usize::from(r.u16("unicast entries")?);
        let multicast_count = usize::from(r.u16("multicast entries")?);
        if unicast_count + multicast_count > MAC_TABLE_ENTRIES {
            return Err(StateError::field(
                "MAC table",
                format!(
                    "{} entries exceed the table's {MAC_TABLE_ENTRIES}",
                    unicast_count + multicast_count
                ),
            ));
        }
        let unicast = (0..unicast_count)
            .map(|_| read_mac(&mut r, "unicast entry"))
            .collect::<Result<_, _>>()?;
        let multicast = (0..multicast_count)
            .map(|_| read_mac(&mut r, "multicast entry"))
            .collect::<Result<_, _>>()?;
        let mut vlan_bytes = [0u8; VLAN_LEN];
        for chunk in vlan_bytes.chunks_exact_mut(8) {
            chunk.copy_from_slice(&r.u64("VLAN table")?.to_le_bytes());
        }
        r.finish()?;
        let mode = RxMode::from_bits(mode_bits).ok_or_else(|| {
            StateError::field("receive modes", format!("unknown bits in {mode_bits:#x}"))
        })?;
        if status & !(STATUS_LINK_UP | STATUS_ANNOUNCE) != 0 {
            return Err(StateError::field(
                "status",
                format!("unknown bits in {status:#x}"),
            ));
        }
        if mac.is_multicast() {
            return Err(StateError::field(
                "MAC",
                format!("{mac} is a multicast address"),
            ));
        }
        if pairs == 0 || pairs > max_pairs {
            return Err(StateError::field(
                "active queue pairs",
                format!("{pairs} is not in 1..={max_pairs}"),
            ));
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
            vlans: VlanTable::from_bytes(&vlan_bytes),
        })
    }

    /// Refuses a state saved by a device configured unlike `device` (its own state).
    pub fn check_matches(&self, device: &NetState) -> Result<(), StateError> {
        let mismatch = |field, saved: String, device: String| {
            Err(StateError::field(
                field,
                format!("saved {saved}, but this device has {device}"),
            ))
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
                vec![
                    MacAddress([1, 0, 0x5e, 0, 0, 1]),
                    MacAddress([1, 0, 0x5e, 0, 0, 2]),
                ],
            ),
            vlans,
        }
    }

    #[test]
    fn state_round_trips() {
        let s = state();
        let blob = s.encode();
        assert_eq!(blob.len(), FIXED_LEN + 18 + VLAN_LEN);
        assert_eq!(&blob[..4], b"ONET");
        assert_eq!(NetState::decode(&blob), Ok(s));
    }

    #[test]
    fn truncated_long_or_foreign_state_is_refused() {
        let blob = state().encode();
        for len in 0..blob.len() {
            assert!(
                NetState::decode(&blob[..len]).is_err(),
                "{len} bytes accepted"
            );
        }
        let mut long = blob.clone();
        long.push(0);
        assert!(matches!(
            NetState::decode(&long),
            Err(StateError::Length { .. })
        ));
        assert!(matches!(
            NetState::decode(&vec![0; MAX_LEN + 1]),
            Err(StateError::Length { .. })
        ));
        let mut bad = blob.clone();
        bad[0] = b'X';
        assert_eq!(NetState::decode(&bad), Err(StateError::BadMagic));
        let mut bad = blob.clone();
        bad[4] = 2;
        assert!(matches!(
            NetState::decode(&bad),
            Err(StateError::Field {
                field: "version",
                ..
            })
        ));
    }

    #[test]
    fn invalid_fields_are_refused() {
        let blob = state().encode();
        let field_at = |offset: usize, value: u8| {
            let mut b = blob.clone();
            b[offset] = value;
            NetState::decode(&b)
        };
        // status at 22..24, modes at 24, pairs at 25..27, overflow flags at 27 and 28, the
        // unicast count at 29..31.
        for (offset, value, what) in [
            (24, 0x40, "modes"),
            (25, 0, "no pairs"),
            (25, 5, "more pairs than the device has"),
            (27, 2, "overflow flag"),
            (22, 4, "status"),
            (16, 1, "multicast MAC"),
            (29, 65, "table size"),
        ] {
            assert!(
                matches!(field_at(offset, value), Err(StateError::Field { .. })),
                "{what}"
            );
        }
    }

    #[test]
    fn a_differently_configured_device_is_refused() {
        let s = state();
        for other in [
            NetState {
                mtu: 9000,
                ..state()
            },
            NetState {
                max_pairs: 2,
                ..state()
            },
            NetState {
                config_mac: MacAddress([0x52, 0x54, 0, 0, 0, 2]),
                ..state()
            },
        ] {
            assert!(matches!(
                s.check_matches(&other),
                Err(StateError::Field { .. })
            ));
        }
        let same_config = NetState {
            pairs: 1,
            mode: RxMode::default(),
            ..state()
        };
        assert_eq!(s.check_matches(&same_config), Ok(()));
    }
}
