//! The device's configuration: what the operator asks for ([`NetConfig`]), its validated form
//! ([`DeviceSpec`]), the feature bits it offers, what the driver negotiated ([`Negotiated`],
//! with the spec's feature dependencies enforced), and the VIRTIO configuration space
//! (`struct virtio_net_config`, VIRTIO 1.2 section 5.1.4).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use outboard_virtio::features::bit;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_RX_EXTRA, VIRTIO_NET_F_CTRL_VLAN, VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_ANNOUNCE, VIRTIO_NET_S_LINK_UP,
};

use crate::NetError;

/// The most queue pairs a device may have: one worker thread each, and the switch keeps the
/// enabled pairs of a port in a 64-bit mask.
pub const MAX_QUEUE_PAIRS: u16 = 64;
/// The smallest MTU the spec allows a device to report.
pub const MIN_MTU: u16 = 68;
/// The length of an Ethernet header without a VLAN tag.
pub const ETH_HLEN: usize = 14;
/// The length of an 802.1Q tag.
pub const VLAN_HLEN: usize = 4;
/// The largest IP datagram, and so the largest payload a GSO packet may carry.
pub const MAX_GSO_PAYLOAD: usize = 65535;

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// The broadcast address.
    pub const BROADCAST: MacAddress = MacAddress([0xff; 6]);

    /// Whether the group bit is set (multicast, including broadcast).
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }

    /// Whether this is the broadcast address.
    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    /// The address `n` further on, as a 48-bit number (wrapping): `--mac` bases for switch ports.
    pub fn offset(&self, n: u64) -> MacAddress {
        let mut wide = [0u8; 8];
        wide[2..].copy_from_slice(&self.0);
        let value = u64::from_be_bytes(wide).wrapping_add(n) & 0xffff_ffff_ffff;
        let mut out = [0u8; 6];
        out.copy_from_slice(&value.to_be_bytes()[2..]);
        MacAddress(out)
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a MAC address string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{input:?} is not a MAC address (six hexadecimal octets separated by ':')")]
pub struct MacParseError {
    /// The text given.
    pub input: String,
}

impl FromStr for MacAddress {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError { input: s.into() };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(err)?;
            if part.is_empty() || part.len() > 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddress(out))
    }
}

/// What the operator configures. Build it with [`NetConfig::new`] and change fields as needed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The MAC address in configuration space (a unicast address).
    pub mac: MacAddress,
    /// The number of receive/transmit queue pairs (more than one offers `VIRTIO_NET_F_MQ`).
    pub queue_pairs: u16,
    /// The largest size of each queue (a power of two).
    pub queue_size: u16,
    /// The MTU reported with `VIRTIO_NET_F_MTU`; transmitted frames above it are dropped.
    pub mtu: u16,
    /// Whether the link starts up (`VIRTIO_NET_S_LINK_UP`).
    pub link_up: bool,
    /// Queue-pair workers busy-poll their queues and backend for this long after the last
    /// packet before they sleep (zero: never poll). Not guest-visible.
    pub poll: Duration,
}

/// The MAC address a device gets when none is configured (locally administered).
pub const DEFAULT_MAC: MacAddress = MacAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

impl NetConfig {
    /// A configuration with `mac` and the defaults: one queue pair of 256 entries, MTU 1500, the
    /// link up, no polling.
    pub fn new(mac: MacAddress) -> Self {
        NetConfig {
            mac,
            queue_pairs: 1,
            queue_size: 256,
            mtu: 1500,
            link_up: true,
            poll: Duration::ZERO,
        }
    }
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig::new(DEFAULT_MAC)
    }
}

/// A validated configuration and what the packet backend can carry: everything the device
/// reports to the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DeviceSpec {
    pub mac: MacAddress,
    pub pairs: u16,
    pub queue_size: u16,
    pub mtu: u16,
    pub link_up: bool,
    /// The backend carries `virtio_net_hdr` offload information (checksum and GSO).
    pub offloads: bool,
}

fn invalid(field: &'static str, reason: String) -> NetError {
    NetError::InvalidConfig { field, reason }
}

impl DeviceSpec {
    pub fn new(config: &NetConfig, backend_pairs: u16, offloads: bool) -> Result<Self, NetError> {
        if config.mac.is_multicast() {
            return Err(invalid(
                "mac",
                format!("{} is a multicast address", config.mac),
            ));
        }
        if config.queue_pairs == 0 || config.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(invalid(
                "queue_pairs",
                format!("{} is not in 1..={MAX_QUEUE_PAIRS}", config.queue_pairs),
            ));
        }
        if backend_pairs != config.queue_pairs {
            return Err(invalid(
                "queue_pairs",
                format!(
                    "the device has {} queue pairs but the packet backend has {backend_pairs}",
                    config.queue_pairs
                ),
            ));
        }
        if !config.queue_size.is_power_of_two() || config.queue_size < 2 {
            return Err(invalid(
                "queue_size",
                format!("{} is not a power of two of at least 2", config.queue_size),
            ));
        }
        if config.mtu < MIN_MTU {
            return Err(invalid(
                "mtu",
                format!("{} is below the minimum of {MIN_MTU}", config.mtu),
            ));
        }
        Ok(DeviceSpec {
            mac: config.mac,
            pairs: config.queue_pairs,
            queue_size: config.queue_size,
            mtu: config.mtu,
            link_up: config.link_up,
            offloads,
        })
    }

    /// The device-specific features offered.
    pub fn features(&self) -> u64 {
        let mut f = [
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_NET_F_CTRL_RX,
            VIRTIO_NET_F_CTRL_RX_EXTRA,
            VIRTIO_NET_F_CTRL_VLAN,
            VIRTIO_NET_F_GUEST_ANNOUNCE,
            VIRTIO_NET_F_CTRL_MAC_ADDR,
        ]
        .iter()
        .fold(0, |f, &b| f | bit(b));
        if self.pairs > 1 {
            f |= bit(VIRTIO_NET_F_MQ);
        }
        if self.offloads {
            for b in [
                VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_GUEST_ECN,
                VIRTIO_NET_F_HOST_TSO4,
                VIRTIO_NET_F_HOST_TSO6,
                VIRTIO_NET_F_HOST_ECN,
            ] {
                f |= bit(b);
            }
        }
        f
    }

    /// The number of queues: a receive and a transmit queue per pair, and the control queue.
    pub fn num_queues(&self) -> usize {
        usize::from(self.pairs) * 2 + 1
    }

    /// The index of the control queue (the last one).
    pub fn ctrl_queue(&self) -> u16 {
        self.pairs * 2
    }

    /// The largest frame (without the virtio header) a driver may transmit without GSO.
    pub fn max_frame(&self) -> usize {
        usize::from(self.mtu) + ETH_HLEN + VLAN_HLEN
    }
}

/// Offloads in one direction, as negotiated (dependencies enforced).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Partial checksums (`NEEDS_CSUM`).
    pub csum: bool,
    /// TCP segmentation over IPv4.
    pub tso4: bool,
    /// TCP segmentation over IPv6.
    pub tso6: bool,
    /// TCP segmentation with ECN (the CWR flag).
    pub ecn: bool,
}

/// What the driver negotiated, with the dependencies of VIRTIO 1.2 section 5.1.3.1 enforced: a
/// feature acknowledged without the one it depends on is treated as not negotiated (the device
/// API gives a device no way to refuse FEATURES_OK).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// Receive buffers may be merged (`VIRTIO_NET_F_MRG_RXBUF`).
    pub mrg_rxbuf: bool,
    /// The link status field is used (`VIRTIO_NET_F_STATUS`).
    pub status: bool,
    /// The control queue exists (`VIRTIO_NET_F_CTRL_VQ`).
    pub ctrl_vq: bool,
    /// Promiscuous/all-multicast and MAC table commands (`VIRTIO_NET_F_CTRL_RX`).
    pub ctrl_rx: bool,
    /// All-unicast, no-multicast, no-unicast, no-broadcast (`VIRTIO_NET_F_CTRL_RX_EXTRA`).
    pub ctrl_rx_extra: bool,
    /// VLAN filtering (`VIRTIO_NET_F_CTRL_VLAN`).
    pub ctrl_vlan: bool,
    /// The driver announces itself on request (`VIRTIO_NET_F_GUEST_ANNOUNCE`).
    pub announce: bool,
    /// Queue pairs are chosen with `VQ_PAIRS_SET` (`VIRTIO_NET_F_MQ`).
    pub mq: bool,
    /// The default MAC can be set (`VIRTIO_NET_F_CTRL_MAC_ADDR`).
    pub ctrl_mac_addr: bool,
    /// What the driver may send (`CSUM`, `HOST_TSO4/6`, `HOST_ECN`).
    pub host: Offloads,
    /// What the device may deliver (`GUEST_CSUM`, `GUEST_TSO4/6`, `GUEST_ECN`).
    pub guest: Offloads,
}

/// A feature bit and its name in the specification.
type Named = (u32, &'static str);

/// The offload dependencies of the virtio-net specification (5.1.3.1): a feature and the
/// features of which it needs at least one. A device asked to segment or checksum without the
/// feature that makes such frames valid would carry out something the driver cannot mean.
///
/// The control-queue dependencies (CTRL_RX, CTRL_VLAN, GUEST_ANNOUNCE, MQ, CTRL_MAC_ADDR need
/// CTRL_VQ) are not enforced: over vhost-user the frontend may keep the control queue to itself
/// and still pass those bits on (QEMU 7.2 sends GUEST_ANNOUNCE without CTRL_VQ); the device then
/// treats them as off.
const DEPENDENCIES: &[(u32, &str, &[Named])] = &[
    (
        VIRTIO_NET_F_GUEST_TSO4,
        "GUEST_TSO4",
        &[(VIRTIO_NET_F_GUEST_CSUM, "GUEST_CSUM")],
    ),
    (
        VIRTIO_NET_F_GUEST_TSO6,
        "GUEST_TSO6",
        &[(VIRTIO_NET_F_GUEST_CSUM, "GUEST_CSUM")],
    ),
    (
        VIRTIO_NET_F_GUEST_UFO,
        "GUEST_UFO",
        &[(VIRTIO_NET_F_GUEST_CSUM, "GUEST_CSUM")],
    ),
    (
        VIRTIO_NET_F_GUEST_ECN,
        "GUEST_ECN",
        &[
            (VIRTIO_NET_F_GUEST_TSO4, "GUEST_TSO4"),
            (VIRTIO_NET_F_GUEST_TSO6, "GUEST_TSO6"),
        ],
    ),
    (
        VIRTIO_NET_F_HOST_TSO4,
        "HOST_TSO4",
        &[(VIRTIO_NET_F_CSUM, "CSUM")],
    ),
    (
        VIRTIO_NET_F_HOST_TSO6,
        "HOST_TSO6",
        &[(VIRTIO_NET_F_CSUM, "CSUM")],
    ),
    (
        VIRTIO_NET_F_HOST_UFO,
        "HOST_UFO",
        &[(VIRTIO_NET_F_CSUM, "CSUM")],
    ),
    (
        VIRTIO_NET_F_HOST_ECN,
        "HOST_ECN",
        &[
            (VIRTIO_NET_F_HOST_TSO4, "HOST_TSO4"),
            (VIRTIO_NET_F_HOST_TSO6, "HOST_TSO6"),
        ],
    ),
];

/// Why a driver's feature set breaks an offload dependency of the specification (5.1.3.1: "the
/// driver MUST NOT negotiate" such a set), if it does. The device then refuses FEATURES_OK.
pub fn feature_dependency_violation(acked: u64) -> Option<String> {
    let has = |b: u32| acked & bit(b) != 0;
    DEPENDENCIES.iter().find_map(|(feature, name, needs)| {
        (has(*feature) && !needs.iter().any(|(n, _)| has(*n))).then(|| {
            let names: Vec<&str> = needs.iter().map(|(_, n)| *n).collect();
            format!("{name} needs {}", names.join(" or "))
        })
    })
}

impl Negotiated {
    /// Reads the acknowledged feature bits.
    pub fn from_features(acked: u64) -> Self {
        let has = |b: u32| acked & bit(b) != 0;
        let ctrl_vq = has(VIRTIO_NET_F_CTRL_VQ);
        let ctrl_rx = ctrl_vq && has(VIRTIO_NET_F_CTRL_RX);
        let host_csum = has(VIRTIO_NET_F_CSUM);
        let host_tso4 = host_csum && has(VIRTIO_NET_F_HOST_TSO4);
        let host_tso6 = host_csum && has(VIRTIO_NET_F_HOST_TSO6);
        let guest_csum = has(VIRTIO_NET_F_GUEST_CSUM);
        let guest_tso4 = guest_csum && has(VIRTIO_NET_F_GUEST_TSO4);
        let guest_tso6 = guest_csum && has(VIRTIO_NET_F_GUEST_TSO6);
        Negotiated {
            mrg_rxbuf: has(VIRTIO_NET_F_MRG_RXBUF),
            status: has(VIRTIO_NET_F_STATUS),
            ctrl_vq,
            ctrl_rx,
            ctrl_rx_extra: ctrl_rx && has(VIRTIO_NET_F_CTRL_RX_EXTRA),
            ctrl_vlan: ctrl_vq && has(VIRTIO_NET_F_CTRL_VLAN),
            announce: ctrl_vq && has(VIRTIO_NET_F_GUEST_ANNOUNCE),
            mq: ctrl_vq && has(VIRTIO_NET_F_MQ),
            ctrl_mac_addr: ctrl_vq && has(VIRTIO_NET_F_CTRL_MAC_ADDR),
            host: Offloads {
                csum: host_csum,
                tso4: host_tso4,
                tso6: host_tso6,
                ecn: (host_tso4 || host_tso6) && has(VIRTIO_NET_F_HOST_ECN),
            },
            guest: Offloads {
                csum: guest_csum,
                tso4: guest_tso4,
                tso6: guest_tso6,
                ecn: (guest_tso4 || guest_tso6) && has(VIRTIO_NET_F_GUEST_ECN),
            },
        }
    }
}

/// The link status bits of the configuration space.
pub(crate) const STATUS_LINK_UP: u16 = VIRTIO_NET_S_LINK_UP as u16;
/// The driver is asked to announce itself.
pub(crate) const STATUS_ANNOUNCE: u16 = VIRTIO_NET_S_ANNOUNCE as u16;

/// `struct virtio_net_config` up to `supported_hash_types`, as the driver sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConfigSpace {
    pub mac: MacAddress,
    pub status: u16,
    pub max_virtqueue_pairs: u16,
    pub mtu: u16,
}

/// The size of the configuration space: through `supported_hash_types`, so that a frontend
/// reading the whole structure is answered (the fields past `mtu` are those of features this
/// device does not offer: speed and duplex unknown, no RSS).
pub(crate) const CONFIG_SIZE: usize = 24;

impl ConfigSpace {
    /// The little-endian bytes.
    pub fn to_bytes(self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        b[0..6].copy_from_slice(&self.mac.0);
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..10].copy_from_slice(&self.max_virtqueue_pairs.to_le_bytes());
        b[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        // speed: unknown.
        b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        // duplex: unknown.
        b[16] = 0xff;
        // rss_max_key_size, rss_max_indirection_table_length, supported_hash_types: no RSS.
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_parse_print_and_count() {
        let mac: MacAddress = "52:54:00:ab:CD:0f".parse().unwrap();
        assert_eq!(mac.0, [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        assert_eq!(mac.offset(1).to_string(), "52:54:00:ab:cd:10");
        assert_eq!(
            MacAddress([0, 0, 0, 0, 0, 0xff]).offset(1),
            MacAddress([0, 0, 0, 0, 1, 0])
        );
        assert_eq!(
            MacAddress::BROADCAST.offset(1),
            MacAddress([0; 6]),
            "wraps at 48 bits"
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:11",
            "52:54:00:ab:cd:xx",
            "525:4:00:ab:cd:0f",
        ] {
            assert!(bad.parse::<MacAddress>().is_err(), "{bad:?}");
        }
        assert!(MacAddress::BROADCAST.is_multicast() && MacAddress::BROADCAST.is_broadcast());
        assert!(!mac.is_multicast());
    }

    #[test]
    fn configuration_is_validated() {
        let ok = NetConfig::default();
        assert!(DeviceSpec::new(&ok, 1, true).is_ok());
        let bad = |c: NetConfig, pairs: u16, field: &str| {
            let e = DeviceSpec::new(&c, pairs, true).unwrap_err();
            assert!(
                matches!(&e, NetError::InvalidConfig { field: f, .. } if *f == field),
                "{e}"
            );
        };
        bad(NetConfig::new(MacAddress::BROADCAST), 1, "mac");
        bad(
            NetConfig {
                queue_pairs: 0,
                ..ok.clone()
            },
            0,
            "queue_pairs",
        );
        bad(
            NetConfig {
                queue_pairs: 65,
                ..ok.clone()
            },
            65,
            "queue_pairs",
        );
        bad(
            NetConfig {
                queue_pairs: 2,
                ..ok.clone()
            },
            1,
            "queue_pairs",
        );
        bad(
            NetConfig {
                queue_size: 100,
                ..ok.clone()
            },
            1,
            "queue_size",
        );
        bad(
            NetConfig {
                mtu: 67,
                ..ok.clone()
            },
            1,
            "mtu",
        );
    }

    #[test]
    fn features_follow_the_configuration_and_the_backend() {
        let spec = DeviceSpec::new(&NetConfig::default(), 1, false).unwrap();
        let f = spec.features();
        assert_ne!(f & bit(VIRTIO_NET_F_CTRL_VQ), 0);
        assert_eq!(f & bit(VIRTIO_NET_F_MQ), 0, "one pair: no MQ");
        assert_eq!(
            f & bit(VIRTIO_NET_F_CSUM),
            0,
            "no offloads without the backend"
        );
        let config = NetConfig {
            queue_pairs: 4,
            ..NetConfig::default()
        };
        let spec = DeviceSpec::new(&config, 4, true).unwrap();
        let f = spec.features();
        assert_ne!(f & bit(VIRTIO_NET_F_MQ), 0);
        assert_ne!(f & bit(VIRTIO_NET_F_HOST_TSO6), 0);
        assert_eq!(spec.num_queues(), 9);
        assert_eq!(spec.ctrl_queue(), 8);
    }

    #[test]
    fn dependent_features_without_their_dependency_are_off() {
        let n = Negotiated::from_features(
            bit(VIRTIO_NET_F_CTRL_RX)
                | bit(VIRTIO_NET_F_MQ)
                | bit(VIRTIO_NET_F_GUEST_TSO4)
                | bit(VIRTIO_NET_F_HOST_ECN)
                | bit(VIRTIO_NET_F_CSUM),
        );
        assert!(!n.ctrl_rx && !n.mq, "no CTRL_VQ");
        assert!(!n.guest.tso4, "no GUEST_CSUM");
        assert!(n.host.csum && !n.host.ecn, "ECN needs TSO");
        let n = Negotiated::from_features(
            bit(VIRTIO_NET_F_CTRL_VQ)
                | bit(VIRTIO_NET_F_CTRL_RX)
                | bit(VIRTIO_NET_F_CTRL_RX_EXTRA)
                | bit(VIRTIO_NET_F_GUEST_CSUM)
                | bit(VIRTIO_NET_F_GUEST_TSO6)
                | bit(VIRTIO_NET_F_GUEST_ECN),
        );
        assert!(n.ctrl_rx && n.ctrl_rx_extra);
        assert!(n.guest.tso6 && n.guest.ecn && !n.guest.tso4);
    }

    #[test]
    fn config_space_layout_matches_the_spec() {
        let c = ConfigSpace {
            mac: MacAddress([1, 2, 3, 4, 5, 6]),
            status: 3,
            max_virtqueue_pairs: 4,
            mtu: 9000,
        };
        let b = c.to_bytes();
        assert_eq!(&b[..6], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(u16::from_le_bytes([b[6], b[7]]), 3);
        assert_eq!(u16::from_le_bytes([b[8], b[9]]), 4);
        assert_eq!(u16::from_le_bytes([b[10], b[11]]), 9000);
        assert_eq!(&b[12..17], &[0xff; 5]);
    }
}
