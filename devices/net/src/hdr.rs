//! The `virtio_net_hdr` that precedes every packet (VIRTIO 1.2, section 5.1.6), at the trust
//! boundary: [`VirtioNetHdr`] is the 12-byte wire form (integers only, `num_buffers` included as
//! VERSION_1 requires), [`NetHdr`] the validated form the device acts on.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};

use crate::config::Offloads;

/// The size of the header with VERSION_1 (`struct virtio_net_hdr_v1` without hash report).
pub const HDR_LEN: usize = 12;

const F_NEEDS_CSUM: u8 = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
const F_DATA_VALID: u8 = VIRTIO_NET_HDR_F_DATA_VALID as u8;
const GSO_NONE: u8 = VIRTIO_NET_HDR_GSO_NONE as u8;
const GSO_TCPV4: u8 = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
const GSO_TCPV6: u8 = VIRTIO_NET_HDR_GSO_TCPV6 as u8;
const GSO_ECN: u8 = VIRTIO_NET_HDR_GSO_ECN as u8;

/// The header as it is on the wire (little-endian fields).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`, with the ECN bit.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment (a hint).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where, after `csum_start`, the checksum goes.
    pub csum_offset: u16,
    /// How many receive buffers the packet spans (receive side only).
    pub num_buffers: u16,
}

impl VirtioNetHdr {
    /// Reads the wire bytes.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }

    /// The wire bytes.
    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }
}

/// Which segmentation a packet asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GsoKind {
    /// TCP over IPv4.
    Tcp4,
    /// TCP over IPv6.
    Tcp6,
}

/// Segmentation offload of one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gso {
    /// The protocol.
    pub kind: GsoKind,
    /// Payload bytes per segment (nonzero).
    pub size: u16,
    /// The sender set CWR on the first segment only (ECN).
    pub ecn: bool,
    /// The header length hint, passed on unchanged.
    pub hdr_len: u16,
}

/// A partial checksum the receiver (or the device) must complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Csum {
    /// Where checksumming starts.
    pub start: u16,
    /// The offset of the checksum field from `start`.
    pub offset: u16,
}

/// A validated header: what the device and the receiver may rely on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHdr {
    /// A checksum to complete (`NEEDS_CSUM`).
    pub csum: Option<Csum>,
    /// The checksum was validated (`DATA_VALID`, receive side only).
    pub data_valid: bool,
    /// Segmentation to perform.
    pub gso: Option<Gso>,
}

/// Why a header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HdrError {
    /// The packet is shorter than the header.
    #[error("a packet of {len} bytes is shorter than the {HDR_LEN}-byte header")]
    Short {
        /// The packet's length.
        len: usize,
    },
    /// A GSO type the device does not implement (UDP fragmentation, UDP segmentation, unknown).
    #[error("GSO type {gso_type:#x} is not supported")]
    UnsupportedGso {
        /// The field.
        gso_type: u8,
    },
    /// An offload the driver did not negotiate.
    #[error("{offload} was not negotiated")]
    NotNegotiated {
        /// The offload.
        offload: &'static str,
    },
    /// The checksum field lies outside the frame.
    #[error("checksum at {start}+{offset} lies outside the {len}-byte frame")]
    CsumOutOfFrame {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// The frame's length.
        len: usize,
    },
    /// GSO with a segment size of zero.
    #[error("GSO with a segment size of 0")]
    ZeroGsoSize,
}

impl NetHdr {
    /// Validates a header against the offloads that may be in it and the length of the frame it
    /// precedes. Flag bits the device does not know are ignored, as the spec requires; on the
    /// transmit side `DATA_VALID` means nothing and is dropped.
    pub fn parse(
        raw: &VirtioNetHdr,
        frame_len: usize,
        allowed: Offloads,
        receive: bool,
    ) -> Result<NetHdr, HdrError> {
        let csum = if raw.flags & F_NEEDS_CSUM != 0 {
            if !allowed.csum {
                return Err(HdrError::NotNegotiated {
                    offload: "checksum offload",
                });
            }
            let end = usize::from(raw.csum_start) + usize::from(raw.csum_offset) + 2;
            if end > frame_len {
                return Err(HdrError::CsumOutOfFrame {
                    start: raw.csum_start,
                    offset: raw.csum_offset,
                    len: frame_len,
                });
            }
            Some(Csum {
                start: raw.csum_start,
                offset: raw.csum_offset,
            })
        } else {
            None
        };
        let ecn = raw.gso_type & GSO_ECN != 0;
        let kind = match raw.gso_type & !GSO_ECN {
            GSO_NONE if ecn => {
                return Err(HdrError::UnsupportedGso {
                    gso_type: raw.gso_type,
                })
            }
            GSO_NONE => None,
            GSO_TCPV4 if allowed.tso4 => Some(GsoKind::Tcp4),
            GSO_TCPV6 if allowed.tso6 => Some(GsoKind::Tcp6),
            GSO_TCPV4 => {
                return Err(HdrError::NotNegotiated {
                    offload: "TSO over IPv4",
                })
            }
            GSO_TCPV6 => {
                return Err(HdrError::NotNegotiated {
                    offload: "TSO over IPv6",
                })
            }
            _ => {
                return Err(HdrError::UnsupportedGso {
                    gso_type: raw.gso_type,
                })
            }
        };
        if ecn && !allowed.ecn {
            return Err(HdrError::NotNegotiated {
                offload: "TSO with ECN",
            });
        }
        let gso = match kind {
            Some(_) if raw.gso_size == 0 => return Err(HdrError::ZeroGsoSize),
            Some(kind) => Some(Gso {
                kind,
                size: raw.gso_size,
                ecn,
                hdr_len: raw.hdr_len,
            }),
            None => None,
        };
        Ok(NetHdr {
            csum,
            data_valid: receive && raw.flags & F_DATA_VALID != 0,
            gso,
        })
    }

    /// The wire form, with `num_buffers`.
    pub fn to_wire(&self, num_buffers: u16) -> VirtioNetHdr {
        let mut flags = 0;
        if self.csum.is_some() {
            flags |= F_NEEDS_CSUM;
        }
        if self.data_valid {
            flags |= F_DATA_VALID;
        }
        let (gso_type, gso_size, hdr_len) = match self.gso {
            None => (GSO_NONE, 0, 0),
            Some(g) => {
                let t = match g.kind {
                    GsoKind::Tcp4 => GSO_TCPV4,
                    GsoKind::Tcp6 => GSO_TCPV6,
                };
                (t | if g.ecn { GSO_ECN } else { 0 }, g.size, g.hdr_len)
            }
        };
        let (csum_start, csum_offset) = self.csum.map_or((0, 0), |c| (c.start, c.offset));
        VirtioNetHdr {
            flags,
            gso_type,
            hdr_len,
            gso_size,
            csum_start,
            csum_offset,
            num_buffers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Offloads = Offloads {
        csum: true,
        tso4: true,
        tso6: true,
        ecn: true,
    };

    #[test]
    fn wire_bytes_round_trip() {
        let h = VirtioNetHdr {
            flags: 1,
            gso_type: 0x81,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        let b = h.to_bytes();
        assert_eq!(b, [1, 0x81, 54, 0, 0xa8, 5, 34, 0, 16, 0, 3, 0]);
        assert_eq!(VirtioNetHdr::from_bytes(&b), h);
    }

    #[test]
    fn offloads_must_be_negotiated_and_consistent() {
        let csum = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..Default::default()
        };
        let none = Offloads::default();
        assert!(matches!(
            NetHdr::parse(&csum, 100, none, false),
            Err(HdrError::NotNegotiated { .. })
        ));
        let h = NetHdr::parse(&csum, 42, ALL, false).unwrap();
        assert_eq!(
            h.csum,
            Some(Csum {
                start: 34,
                offset: 6
            })
        );
        assert!(matches!(
            NetHdr::parse(&csum, 41, ALL, false),
            Err(HdrError::CsumOutOfFrame { .. })
        ));
        let tso = VirtioNetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 1448,
            ..csum
        };
        let h = NetHdr::parse(&tso, 9000, ALL, false).unwrap();
        assert_eq!(h.gso.unwrap().kind, GsoKind::Tcp4);
        let no_tso4 = Offloads { tso4: false, ..ALL };
        assert!(NetHdr::parse(&tso, 9000, no_tso4, false).is_err());
        let ecn = VirtioNetHdr {
            gso_type: GSO_TCPV6 | GSO_ECN,
            ..tso
        };
        assert!(NetHdr::parse(&ecn, 9000, Offloads { ecn: false, ..ALL }, false).is_err());
        assert!(
            NetHdr::parse(&ecn, 9000, ALL, false)
                .unwrap()
                .gso
                .unwrap()
                .ecn
        );
        let zero = VirtioNetHdr { gso_size: 0, ..tso };
        assert_eq!(
            NetHdr::parse(&zero, 9000, ALL, false),
            Err(HdrError::ZeroGsoSize)
        );
        for gso_type in [3, 5, 0x80, 0x42] {
            let h = VirtioNetHdr { gso_type, ..tso };
            assert!(
                matches!(
                    NetHdr::parse(&h, 9000, ALL, false),
                    Err(HdrError::UnsupportedGso { .. })
                ),
                "{gso_type:#x}"
            );
        }
    }

    #[test]
    fn unknown_flags_are_ignored_and_data_valid_only_received() {
        let h = VirtioNetHdr {
            flags: F_DATA_VALID | 0x70,
            ..Default::default()
        };
        assert_eq!(
            NetHdr::parse(&h, 60, ALL, false).unwrap(),
            NetHdr::default()
        );
        assert!(NetHdr::parse(&h, 60, ALL, true).unwrap().data_valid);
        let wire = NetHdr::parse(&h, 60, ALL, true).unwrap().to_wire(1);
        assert_eq!(wire.flags, F_DATA_VALID);
        assert_eq!(wire.num_buffers, 1);
    }
}
