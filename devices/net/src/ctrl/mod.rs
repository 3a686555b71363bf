//! The control queue (VIRTIO 1.2, section 5.1.6.5): commands parsed at the trust boundary into
//! [`CtrlCommand`]s, checked against what the driver negotiated, then applied by the control
//! worker (`handler::CtrlHandler`).
//!
//! A command is `struct virtio_net_ctrl { u8 class; u8 command; u8 command-specific-data[];
//! u8 ack; }`: the class, command and data are the device-readable bytes of the chain (framed
//! freely across descriptors), the ack is the first device-writable byte. Anything malformed,
//! unknown or not negotiated is answered `VIRTIO_NET_ERR` and changes nothing.

pub(crate) mod handler;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI,
    VIRTIO_NET_CTRL_RX_ALLUNI, VIRTIO_NET_CTRL_RX_NOBCAST, VIRTIO_NET_CTRL_RX_NOMULTI,
    VIRTIO_NET_CTRL_RX_NOUNI, VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_CTRL_VLAN,
    VIRTIO_NET_CTRL_VLAN_ADD, VIRTIO_NET_CTRL_VLAN_DEL,
};

use crate::config::{MacAddress, Negotiated};
use crate::filter::VLAN_IDS;

/// The most command bytes (class, command and data) the device reads; a MAC table of about
/// 2,700 addresses. Longer commands are refused.
pub const MAX_COMMAND_LEN: usize = 16 * 1024;

/// One of the receive modes of the `VIRTIO_NET_CTRL_RX` class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxModeKind {
    /// `VIRTIO_NET_CTRL_RX_PROMISC`.
    Promisc,
    /// `VIRTIO_NET_CTRL_RX_ALLMULTI`.
    AllMulti,
    /// `VIRTIO_NET_CTRL_RX_ALLUNI`.
    AllUni,
    /// `VIRTIO_NET_CTRL_RX_NOMULTI`.
    NoMulti,
    /// `VIRTIO_NET_CTRL_RX_NOUNI`.
    NoUni,
    /// `VIRTIO_NET_CTRL_RX_NOBCAST`.
    NoBcast,
}

/// A validated control command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CtrlCommand {
    /// Turns a receive mode on or off.
    RxMode {
        /// Which mode.
        kind: RxModeKind,
        /// On or off.
        on: bool,
    },
    /// Replaces the MAC filter table.
    MacTableSet {
        /// Unicast addresses.
        unicast: Vec<MacAddress>,
        /// Multicast addresses.
        multicast: Vec<MacAddress>,
    },
    /// Sets the default MAC address.
    MacAddrSet(MacAddress),
    /// Adds a VLAN ID to the filter table.
    VlanAdd(u16),
    /// Removes a VLAN ID from the filter table.
    VlanDel(u16),
    /// The driver announced itself.
    AnnounceAck,
    /// Chooses how many queue pairs receive and transmit.
    VqPairsSet(u16),
}

/// Why a command was refused (it is answered `VIRTIO_NET_ERR`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CtrlError {
    /// Fewer than the two bytes of class and command.
    #[error("a command of {len} bytes has no class and command")]
    NoHeader {
        /// The bytes read.
        len: usize,
    },
    /// More bytes than the device reads.
    #[error("a command of {len} bytes exceeds the limit of {MAX_COMMAND_LEN}")]
    TooLong {
        /// The bytes in the chain.
        len: u64,
    },
    /// A class or command the device does not know.
    #[error("unknown command {command} of class {class}")]
    Unknown {
        /// The class.
        class: u8,
        /// The command.
        command: u8,
    },
    /// A command whose feature was not negotiated.
    #[error("{command:?} needs {feature}, which was not negotiated")]
    NotNegotiated {
        /// The command.
        command: &'static str,
        /// The feature.
        feature: &'static str,
    },
    /// The data has the wrong length.
    #[error("{command}: {len} data bytes, expected {expected}")]
    Length {
        /// The command.
        command: &'static str,
        /// The data's length.
        len: usize,
        /// What the command needs.
        expected: usize,
    },
    /// The command's buffers could not be read (a memory region went away under it).
    #[error("the command's {len} bytes could not be read from guest memory")]
    Unreadable {
        /// The bytes in the chain.
        len: u64,
    },
    /// A field out of range.
    #[error("{command}: {field} {value} is out of range")]
    Value {
        /// The command.
        command: &'static str,
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
}

const CLASS_RX: u8 = VIRTIO_NET_CTRL_RX as u8;
const CLASS_MAC: u8 = VIRTIO_NET_CTRL_MAC as u8;
const CLASS_VLAN: u8 = VIRTIO_NET_CTRL_VLAN as u8;
const CLASS_ANNOUNCE: u8 = VIRTIO_NET_CTRL_ANNOUNCE as u8;
const CLASS_MQ: u8 = VIRTIO_NET_CTRL_MQ as u8;

fn exact<const N: usize>(command: &'static str, data: &[u8]) -> Result<[u8; N], CtrlError> {
    <[u8; N]>::try_from(data).map_err(|_| CtrlError::Length {
        command,
        len: data.len(),
        expected: N,
    })
}

fn needs(negotiated: bool, command: &'static str, feature: &'static str) -> Result<(), CtrlError> {
    if negotiated {
        Ok(())
    } else {
        Err(CtrlError::NotNegotiated { command, feature })
    }
}

/// Reads one `struct virtio_net_ctrl_mac` (le32 entries, then 6 bytes each) from the front of
/// `data`; returns the addresses and the rest.
fn mac_list<'a>(
    data: &'a [u8],
    which: &'static str,
) -> Result<(Vec<MacAddress>, &'a [u8]), CtrlError> {
    const COMMAND: &str = "MAC_TABLE_SET";
    let Some((count, rest)) = data.split_first_chunk::<4>() else {
        return Err(CtrlError::Length {
            command: COMMAND,
            len: data.len(),
            expected: 4,
        });
    };
    let count = u32::from_le_bytes(*count) as usize;
    let bytes = count
        .checked_mul(6)
        .filter(|&b| b <= rest.len())
        .ok_or(CtrlError::Value {
            command: COMMAND,
            field: which,
            value: count as u64,
        })?;
    let macs = rest[..bytes]
        .chunks_exact(6)
        .map(|c| {
            let mut m = [0u8; 6];
            m.copy_from_slice(c);
            MacAddress(m)
        })
        .collect();
    Ok((macs, &rest[bytes..]))
}

impl CtrlCommand {
    /// Parses the readable bytes of a control chain (class, command, data) and checks the
    /// command against the negotiated features and the device's `max_pairs`.
    pub fn parse(bytes: &[u8], n: &Negotiated, max_pairs: u16) -> Result<Self, CtrlError> {
        let [class, command, data @ ..] = bytes else {
            return Err(CtrlError::NoHeader { len: bytes.len() });
        };
        let (class, command) = (*class, *command);
        let unknown = CtrlError::Unknown { class, command };
        match class {
            CLASS_RX => {
                let (kind, name, extra) = match u32::from(command) {
                    VIRTIO_NET_CTRL_RX_PROMISC => (RxModeKind::Promisc, "RX_PROMISC", false),
                    VIRTIO_NET_CTRL_RX_ALLMULTI => (RxModeKind::AllMulti, "RX_ALLMULTI", false),
                    VIRTIO_NET_CTRL_RX_ALLUNI => (RxModeKind::AllUni, "RX_ALLUNI", true),
                    VIRTIO_NET_CTRL_RX_NOMULTI => (RxModeKind::NoMulti, "RX_NOMULTI", true),
                    VIRTIO_NET_CTRL_RX_NOUNI => (RxModeKind::NoUni, "RX_NOUNI", true),
                    VIRTIO_NET_CTRL_RX_NOBCAST => (RxModeKind::NoBcast, "RX_NOBCAST", true),
                    _ => return Err(unknown),
                };
                if extra {
                    needs(n.ctrl_rx_extra, name, "VIRTIO_NET_F_CTRL_RX_EXTRA")?;
                } else {
                    needs(n.ctrl_rx, name, "VIRTIO_NET_F_CTRL_RX")?;
                }
                let [on] = exact::<1>(name, data)?;
                if on > 1 {
                    return Err(CtrlError::Value {
                        command: name,
                        field: "on",
                        value: on.into(),
                    });
                }
                Ok(CtrlCommand::RxMode { kind, on: on == 1 })
            }
            CLASS_MAC => match u32::from(command) {
                VIRTIO_NET_CTRL_MAC_TABLE_SET => {
                    needs(n.ctrl_rx, "MAC_TABLE_SET", "VIRTIO_NET_F_CTRL_RX")?;
                    let (unicast, rest) = mac_list(data, "unicast entries")?;
                    let (multicast, rest) = mac_list(rest, "multicast entries")?;
                    if !rest.is_empty() {
                        return Err(CtrlError::Length {
                            command: "MAC_TABLE_SET",
                            len: data.len(),
                            expected: data.len() - rest.len(),
                        });
                    }
                    Ok(CtrlCommand::MacTableSet { unicast, multicast })
                }
                VIRTIO_NET_CTRL_MAC_ADDR_SET => {
                    needs(
                        n.ctrl_mac_addr,
                        "MAC_ADDR_SET",
                        "VIRTIO_NET_F_CTRL_MAC_ADDR",
                    )?;
                    let mac = MacAddress(exact::<6>("MAC_ADDR_SET", data)?);
                    if mac.is_multicast() {
                        return Err(CtrlError::Value {
                            command: "MAC_ADDR_SET",
                            field: "a multicast address",
                            value: 0,
                        });
                    }
                    Ok(CtrlCommand::MacAddrSet(mac))
                }
                _ => Err(unknown),
            },
            CLASS_VLAN => {
                let name = match u32::from(command) {
                    VIRTIO_NET_CTRL_VLAN_ADD => "VLAN_ADD",
                    VIRTIO_NET_CTRL_VLAN_DEL => "VLAN_DEL",
                    _ => return Err(unknown),
                };
                needs(n.ctrl_vlan, name, "VIRTIO_NET_F_CTRL_VLAN")?;
                let vid = u16::from_le_bytes(exact::<2>(name, data)?);
                if usize::from(vid) >= VLAN_IDS {
                    return Err(CtrlError::Value {
                        command: name,
                        field: "VLAN ID",
                        value: vid.into(),
                    });
                }
                Ok(if u32::from(command) == VIRTIO_NET_CTRL_VLAN_ADD {
                    CtrlCommand::VlanAdd(vid)
                } else {
                    CtrlCommand::VlanDel(vid)
                })
            }
            CLASS_ANNOUNCE if u32::from(command) == VIRTIO_NET_CTRL_ANNOUNCE_ACK => {
                needs(n.announce, "ANNOUNCE_ACK", "VIRTIO_NET_F_GUEST_ANNOUNCE")?;
                exact::<0>("ANNOUNCE_ACK", data)?;
                Ok(CtrlCommand::AnnounceAck)
            }
            CLASS_MQ if u32::from(command) == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET => {
                needs(n.mq, "VQ_PAIRS_SET", "VIRTIO_NET_F_MQ")?;
                let pairs = u16::from_le_bytes(exact::<2>("VQ_PAIRS_SET", data)?);
                if pairs == 0 || pairs > max_pairs {
                    return Err(CtrlError::Value {
                        command: "VQ_PAIRS_SET",
                        field: "virtqueue_pairs",
                        value: pairs.into(),
                    });
                }
                Ok(CtrlCommand::VqPairsSet(pairs))
            }
            _ => Err(unknown),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outboard_virtio::features::bit;
    use virtio_bindings::virtio_net::*;

    fn all() -> Negotiated {
        Negotiated::from_features(
            bit(VIRTIO_NET_F_CTRL_VQ)
                | bit(VIRTIO_NET_F_CTRL_RX)
                | bit(VIRTIO_NET_F_CTRL_RX_EXTRA)
                | bit(VIRTIO_NET_F_CTRL_VLAN)
                | bit(VIRTIO_NET_F_GUEST_ANNOUNCE)
                | bit(VIRTIO_NET_F_MQ)
                | bit(VIRTIO_NET_F_CTRL_MAC_ADDR),
        )
    }

    fn parse(bytes: &[u8]) -> Result<CtrlCommand, CtrlError> {
        CtrlCommand::parse(bytes, &all(), 4)
    }

    #[test]
    fn every_command_parses() {
        assert_eq!(
            parse(&[0, 0, 1]),
            Ok(CtrlCommand::RxMode {
                kind: RxModeKind::Promisc,
                on: true
            })
        );
        assert_eq!(
            parse(&[0, 5, 0]),
            Ok(CtrlCommand::RxMode {
                kind: RxModeKind::NoBcast,
                on: false
            })
        );
        let mut table = 1u32.to_le_bytes().to_vec();
        table.extend([0x52, 0x54, 0, 0, 0, 7]);
        table.extend(2u32.to_le_bytes());
        table.extend([1, 0, 0x5e, 0, 0, 1, 1, 0, 0x5e, 0, 0, 2]);
        let mut cmd = vec![1, 0];
        cmd.extend(&table);
        let CtrlCommand::MacTableSet { unicast, multicast } = parse(&cmd).unwrap() else {
            panic!("not a MAC table");
        };
        assert_eq!(unicast, [MacAddress([0x52, 0x54, 0, 0, 0, 7])]);
        assert_eq!(multicast.len(), 2);
        assert_eq!(
            parse(&[1, 1, 0x52, 0x54, 0, 0, 0, 9]),
            Ok(CtrlCommand::MacAddrSet(MacAddress([
                0x52, 0x54, 0, 0, 0, 9
            ])))
        );
        assert_eq!(parse(&[2, 0, 0xff, 0x0f]), Ok(CtrlCommand::VlanAdd(4095)));
        assert_eq!(parse(&[2, 1, 5, 0]), Ok(CtrlCommand::VlanDel(5)));
        assert_eq!(parse(&[3, 0]), Ok(CtrlCommand::AnnounceAck));
        assert_eq!(parse(&[4, 0, 4, 0]), Ok(CtrlCommand::VqPairsSet(4)));
    }

    #[test]
    fn malformed_commands_are_refused() {
        for bad in [
            &[][..],
            &[0],
            &[0, 0],
            &[0, 0, 1, 0],
            &[0, 0, 2],
            &[0, 6, 1],
            &[1, 0, 0, 0, 0],
            &[1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
            &[1, 0, 0xff, 0xff, 0xff, 0xff],
            &[1, 1, 1, 0, 0, 0, 0, 1],
            &[1, 1, 2, 0, 0],
            &[1, 2],
            &[2, 0, 0, 0x10],
            &[2, 0, 1],
            &[2, 2, 1, 0],
            &[3, 0, 0],
            &[3, 1],
            &[4, 0, 0, 0],
            &[4, 0, 5, 0],
            &[4, 0, 1],
            &[4, 1, 1, 0],
            &[5, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[0xff, 0xff],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn commands_need_their_features() {
        let none = Negotiated::from_features(bit(VIRTIO_NET_F_CTRL_VQ));
        for cmd in [
            &[0, 0, 1][..],
            &[0, 2, 1],
            &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[1, 1, 0x52, 0, 0, 0, 0, 1],
            &[2, 0, 1, 0],
            &[3, 0],
            &[4, 0, 1, 0],
        ] {
            assert!(
                matches!(
                    CtrlCommand::parse(cmd, &none, 4),
                    Err(CtrlError::NotNegotiated { .. })
                ),
                "{cmd:?}"
            );
        }
        let rx_only =
            Negotiated::from_features(bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_CTRL_RX));
        assert!(CtrlCommand::parse(&[0, 0, 1], &rx_only, 1).is_ok());
        assert!(
            CtrlCommand::parse(&[0, 3, 1], &rx_only, 1).is_err(),
            "NOMULTI needs RX_EXTRA"
        );
    }
}
