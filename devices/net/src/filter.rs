//! Receive filtering (VIRTIO 1.2, section 5.1.6.5): the receive modes, the MAC address tables
//! and the VLAN table the driver sets through the control queue, and the decision, made in the
//! device for every packet whatever the packet backend, whether the driver wants a frame.

use crate::config::{MacAddress, ETH_HLEN};

/// How many MAC addresses the unicast and multicast tables hold together; a larger table turns
/// on the overflow mode of its kind (accept every address of that kind), as filtering is best
/// effort.
pub const MAC_TABLE_ENTRIES: usize = 64;
/// The number of VLAN IDs.
pub const VLAN_IDS: usize = 4096;

const ETH_P_8021Q: u16 = 0x8100;

/// The receive modes of `VIRTIO_NET_CTRL_RX`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxMode {
    /// Receive every frame.
    pub promisc: bool,
    /// Receive every multicast frame.
    pub allmulti: bool,
    /// Receive every unicast frame.
    pub alluni: bool,
    /// Receive no multicast frame (broadcast excepted).
    pub nomulti: bool,
    /// Receive no unicast frame.
    pub nouni: bool,
    /// Receive no broadcast frame.
    pub nobcast: bool,
}

impl RxMode {
    /// The mode after a reset: promiscuous, so that a driver without `VIRTIO_NET_F_CTRL_RX`
    /// receives what a plain Ethernet port would.
    pub fn initial() -> Self {
        RxMode {
            promisc: true,
            ..RxMode::default()
        }
    }

    /// The modes as bits (promisc, allmulti, alluni, nomulti, nouni, nobcast from bit 0), for
    /// saved state.
    pub fn bits(&self) -> u8 {
        [
            self.promisc,
            self.allmulti,
            self.alluni,
            self.nomulti,
            self.nouni,
            self.nobcast,
        ]
        .iter()
        .enumerate()
        .fold(0, |b, (i, &on)| b | (u8::from(on) << i))
    }

    /// The inverse of [`RxMode::bits`]; `None` if an unknown bit is set.
    pub fn from_bits(bits: u8) -> Option<Self> {
        if bits & !0x3f != 0 {
            return None;
        }
        let on = |i: u8| bits & (1 << i) != 0;
        Some(RxMode {
            promisc: on(0),
            allmulti: on(1),
            alluni: on(2),
            nomulti: on(3),
            nouni: on(4),
            nobcast: on(5),
        })
    }
}

/// The MAC filter table of `VIRTIO_NET_CTRL_MAC_TABLE_SET`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MacTable {
    /// Unicast addresses accepted besides the device's own.
    pub unicast: Vec<MacAddress>,
    /// Multicast addresses accepted.
    pub multicast: Vec<MacAddress>,
    /// The driver sent more unicast addresses than the table holds: accept every unicast frame.
    pub unicast_overflow: bool,
    /// The driver sent more multicast addresses than the table holds: accept every multicast
    /// frame.
    pub multicast_overflow: bool,
}

impl MacTable {
    /// Builds the table from the driver's lists; what does not fit overflows.
    pub fn from_lists(unicast: Vec<MacAddress>, multicast: Vec<MacAddress>) -> Self {
        let mut t = MacTable::default();
        if unicast.len() > MAC_TABLE_ENTRIES {
            t.unicast_overflow = true;
        } else {
            t.unicast = unicast;
        }
        if t.unicast.len() + multicast.len() > MAC_TABLE_ENTRIES {
            t.multicast_overflow = true;
        } else {
            t.multicast = multicast;
        }
        t
    }
}

/// The VLAN filter table: one bit per VLAN ID.
#[derive(Clone, PartialEq, Eq)]
pub struct VlanTable {
    bits: [u64; VLAN_IDS / 64],
}

impl std::fmt::Debug for VlanTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<u16> = (0..VLAN_IDS as u16).filter(|&v| self.contains(v)).collect();
        f.debug_set().entries(ids).finish()
    }
}

impl Default for VlanTable {
    fn default() -> Self {
        VlanTable {
            bits: [0; VLAN_IDS / 64],
        }
    }
}

impl VlanTable {
    /// Whether `vid` is in the table.
    pub fn contains(&self, vid: u16) -> bool {
        let v = usize::from(vid) % VLAN_IDS;
        self.bits[v / 64] & (1 << (v % 64)) != 0
    }

    /// Adds or removes `vid` (below 4096).
    pub fn set(&mut self, vid: u16, on: bool) {
        let v = usize::from(vid) % VLAN_IDS;
        if on {
            self.bits[v / 64] |= 1 << (v % 64);
        } else {
            self.bits[v / 64] &= !(1 << (v % 64));
        }
    }

    /// The table as 512 bytes (bit `v` of the table is bit `v % 8` of byte `v / 8`).
    pub fn to_bytes(&self) -> [u8; VLAN_IDS / 8] {
        let mut out = [0u8; VLAN_IDS / 8];
        for (chunk, word) in out.chunks_exact_mut(8).zip(self.bits) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        out
    }

    /// The inverse of [`VlanTable::to_bytes`].
    pub fn from_bytes(b: &[u8; VLAN_IDS / 8]) -> Self {
        let mut t = VlanTable::default();
        for (word, chunk) in t.bits.iter_mut().zip(b.chunks_exact(8)) {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            *word = u64::from_le_bytes(w);
        }
        t
    }
}

/// Everything that decides whether a received frame reaches the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxFilter {
    /// The device's own MAC address (the configuration space's, or `MAC_ADDR_SET`'s).
    pub mac: MacAddress,
    /// The receive modes.
    pub mode: RxMode,
    /// The MAC table.
    pub table: MacTable,
    /// The VLAN table.
    pub vlans: VlanTable,
    /// Whether the VLAN table applies (`VIRTIO_NET_F_CTRL_VLAN` negotiated); without it every
    /// VLAN passes.
    pub vlan_filtering: bool,
}

impl RxFilter {
    /// The filter after a reset: the configured MAC, promiscuous, empty tables.
    pub fn new(mac: MacAddress) -> Self {
        RxFilter {
            mac,
            mode: RxMode::initial(),
            table: MacTable::default(),
            vlans: VlanTable::default(),
            vlan_filtering: false,
        }
    }

    /// Whether the driver wants `frame` (an Ethernet frame without the virtio header).
    pub fn accepts(&self, frame: &[u8]) -> bool {
        if frame.len() < ETH_HLEN {
            return false;
        }
        if self.mode.promisc {
            return true;
        }
        if self.vlan_filtering && frame.len() >= ETH_HLEN + 2 {
            let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
            if ethertype == ETH_P_8021Q {
                let vid = u16::from_be_bytes([frame[14], frame[15]]) & 0x0fff;
                if !self.vlans.contains(vid) {
                    return false;
                }
            }
        }
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&frame[..6]);
        let dst = MacAddress(dst);
        if dst.is_broadcast() {
            return !self.mode.nobcast;
        }
        if dst.is_multicast() {
            if self.mode.nomulti {
                return false;
            }
            return self.mode.allmulti
                || self.table.multicast_overflow
                || self.table.multicast.contains(&dst);
        }
        if self.mode.nouni {
            return false;
        }
        self.mode.alluni
            || self.table.unicast_overflow
            || dst == self.mac
            || self.table.unicast.contains(&dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: MacAddress = MacAddress([0x52, 0x54, 0, 0, 0, 1]);
    const OTHER: MacAddress = MacAddress([0x52, 0x54, 0, 0, 0, 2]);
    const MCAST: MacAddress = MacAddress([0x01, 0x00, 0x5e, 0, 0, 1]);

    fn frame(dst: MacAddress, vlan: Option<u16>) -> Vec<u8> {
        let mut f = dst.0.to_vec();
        f.extend([0x52, 0x54, 0, 0, 0, 9]);
        if let Some(vid) = vlan {
            f.extend(ETH_P_8021Q.to_be_bytes());
            f.extend(vid.to_be_bytes());
        }
        f.extend([0x08, 0x00]);
        f.resize(60, 0);
        f
    }

    fn strict() -> RxFilter {
        RxFilter {
            mode: RxMode::default(),
            ..RxFilter::new(OWN)
        }
    }

    #[test]
    fn promiscuous_after_reset() {
        let f = RxFilter::new(OWN);
        assert!(f.accepts(&frame(OTHER, None)));
        assert!(!f.accepts(&[0u8; 13]), "a runt is never accepted");
    }

    #[test]
    fn unicast_needs_our_address_the_table_or_a_mode() {
        let mut f = strict();
        assert!(f.accepts(&frame(OWN, None)));
        assert!(!f.accepts(&frame(OTHER, None)));
        f.table = MacTable::from_lists(vec![OTHER], vec![]);
        assert!(f.accepts(&frame(OTHER, None)));
        f.table = MacTable::default();
        f.mode.alluni = true;
        assert!(f.accepts(&frame(OTHER, None)));
        f.mode.nouni = true;
        assert!(!f.accepts(&frame(OWN, None)), "nouni wins");
        f.mode = RxMode::default();
        f.table = MacTable::from_lists(vec![OTHER; MAC_TABLE_ENTRIES + 1], vec![]);
        assert!(f.table.unicast_overflow);
        assert!(f.accepts(&frame(MacAddress([2, 0, 0, 0, 0, 7]), None)));
    }

    #[test]
    fn multicast_and_broadcast_follow_their_modes() {
        let mut f = strict();
        assert!(f.accepts(&frame(MacAddress::BROADCAST, None)));
        assert!(!f.accepts(&frame(MCAST, None)));
        f.table = MacTable::from_lists(vec![], vec![MCAST]);
        assert!(f.accepts(&frame(MCAST, None)));
        f.mode.nomulti = true;
        assert!(!f.accepts(&frame(MCAST, None)));
        assert!(
            f.accepts(&frame(MacAddress::BROADCAST, None)),
            "broadcast is not multicast here"
        );
        f.mode = RxMode {
            allmulti: true,
            nobcast: true,
            ..RxMode::default()
        };
        f.table = MacTable::default();
        assert!(f.accepts(&frame(MCAST, None)));
        assert!(!f.accepts(&frame(MacAddress::BROADCAST, None)));
        f.mode = RxMode::default();
        f.table = MacTable::from_lists(vec![OTHER; 40], vec![MCAST; 30]);
        assert!(f.table.multicast_overflow && !f.table.unicast_overflow);
        assert!(f.accepts(&frame(MacAddress([3, 0, 0, 0, 0, 1]), None)));
    }

    #[test]
    fn vlan_table_filters_tagged_frames_when_negotiated() {
        let mut f = strict();
        assert!(
            f.accepts(&frame(OWN, Some(5))),
            "no VLAN filtering negotiated"
        );
        f.vlan_filtering = true;
        assert!(!f.accepts(&frame(OWN, Some(5))));
        assert!(f.accepts(&frame(OWN, None)), "untagged frames pass");
        f.vlans.set(5, true);
        assert!(f.accepts(&frame(OWN, Some(5))));
        assert!(
            f.accepts(&frame(OWN, Some(0x2005))),
            "priority bits are not the VID"
        );
        assert!(!f.accepts(&frame(OWN, Some(6))));
        f.vlans.set(5, false);
        assert!(!f.accepts(&frame(OWN, Some(5))));
        f.mode.promisc = true;
        assert!(
            f.accepts(&frame(OWN, Some(6))),
            "promiscuous passes every VLAN"
        );
    }

    #[test]
    fn modes_and_vlans_round_trip_through_bytes() {
        let m = RxMode {
            allmulti: true,
            nobcast: true,
            ..RxMode::default()
        };
        assert_eq!(RxMode::from_bits(m.bits()), Some(m));
        assert_eq!(RxMode::from_bits(0x40), None);
        let mut v = VlanTable::default();
        for vid in [0, 1, 63, 64, 4095] {
            v.set(vid, true);
        }
        assert_eq!(VlanTable::from_bytes(&v.to_bytes()), v);
        assert_eq!(format!("{v:?}"), "{0, 1, 63, 64, 4095}");
    }
}
