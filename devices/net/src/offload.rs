//! Offloads the device performs itself when a received packet uses one the driver did not
//! negotiate: completing a partial checksum, and segmenting a TCP GSO packet into frames of at
//! most `gso_size` payload bytes with complete checksums. The packet comes from another guest
//! (through the switch) or the host, so every length and offset is checked; a packet that does
//! not parse is refused, never guessed at.

use crate::config::ETH_HLEN;
use crate::hdr::{Csum, Gso, GsoKind, NetHdr, HDR_LEN};

/// The most segments one GSO packet may be cut into (a 64 KiB packet with a 128-byte MSS).
pub const MAX_SEGMENTS: usize = 512;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Why a packet could not be fixed up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OffloadError {
    /// The frame's headers do not match its GSO type.
    #[error("a {kind:?} GSO frame has no valid {layer} header")]
    Headers {
        /// The GSO type.
        kind: GsoKind,
        /// The header that is missing or wrong.
        layer: &'static str,
    },
    /// Too many segments for the device to cut.
    #[error("{segments} segments of {size} bytes is more than {MAX_SEGMENTS}")]
    TooManySegments {
        /// How many it would be.
        segments: usize,
        /// The segment size.
        size: u16,
    },
}

/// The ones' complement sum of `data` (big-endian 16-bit words), not folded.
fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a sum to 16 bits and complements it.
fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Completes the partial checksum of `frame`: the checksum of everything from `csum.start`
/// (the field already holds the pseudo-header sum) stored at `csum.start + csum.offset`. The
/// header parser checked that the field lies in the frame.
pub fn complete_checksum(frame: &mut [u8], csum: Csum) {
    let start = usize::from(csum.start);
    let at = start + usize::from(csum.offset);
    let value = fold(sum(&frame[start..], 0));
    frame[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

/// Cuts the TCP GSO packet `frame` into complete frames, each pushed to `out` behind a virtio
/// header with no offload.
pub fn segment(frame: &[u8], gso: Gso, out: &mut Vec<Vec<u8>>) -> Result<(), OffloadError> {
    let bad = |layer| OffloadError::Headers {
        kind: gso.kind,
        layer,
    };
    if frame.len() < ETH_HLEN {
        return Err(bad("Ethernet"));
    }
    let mut l3 = ETH_HLEN;
    let mut ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype == 0x8100 {
        if frame.len() < ETH_HLEN + 4 {
            return Err(bad("VLAN"));
        }
        ethertype = u16::from_be_bytes([frame[16], frame[17]]);
        l3 += 4;
    }
    let ip = &frame[l3..];
    let l4 = match gso.kind {
        GsoKind::Tcp4 => {
            let ihl = ip.first().map_or(0, |b| usize::from(b & 0x0f) * 4);
            if ethertype != 0x0800
                || ip.len() < 20
                || ip[0] >> 4 != 4
                || ihl < 20
                || ip.len() < ihl
                || ip[9] != 6
            {
                return Err(bad("IPv4"));
            }
            l3 + ihl
        }
        GsoKind::Tcp6 => {
            if ethertype != 0x86dd || ip.len() < 40 || ip[0] >> 4 != 6 || ip[6] != 6 {
                return Err(bad("IPv6 (without extension headers)"));
            }
            l3 + 40
        }
    };
    let tcp = &frame[l4..];
    let doff = tcp.get(12).map_or(0, |b| usize::from(b >> 4) * 4);
    if tcp.len() < 20 || doff < 20 || tcp.len() < doff {
        return Err(bad("TCP"));
    }
    let headers = l4 + doff;
    let payload = &frame[headers..];
    let mss = usize::from(gso.size);
    let segments = payload.len().div_ceil(mss).max(1);
    if segments > MAX_SEGMENTS {
        return Err(OffloadError::TooManySegments {
            segments,
            size: gso.size,
        });
    }
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let flags = tcp[13];
    let ip_id = u16::from_be_bytes([ip[4], ip[5]]);
    let wire = NetHdr::default().to_wire(0).to_bytes();
    for (i, chunk) in payload
        .chunks(mss)
        .chain(payload.is_empty().then_some(&[][..]))
        .enumerate()
    {
        let mut p = Vec::with_capacity(HDR_LEN + headers + chunk.len());
        p.extend_from_slice(&wire);
        p.extend_from_slice(&frame[..headers]);
        p.extend_from_slice(chunk);
        let f = &mut p[HDR_LEN..];
        let tcp_len = doff + chunk.len();
        match gso.kind {
            GsoKind::Tcp4 => {
                let ihl = l4 - l3;
                let total = (ihl + tcp_len) as u16;
                f[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
                f[l3 + 4..l3 + 6].copy_from_slice(&ip_id.wrapping_add(i as u16).to_be_bytes());
                f[l3 + 10..l3 + 12].fill(0);
                let c = fold(sum(&f[l3..l4], 0));
                f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
            }
            GsoKind::Tcp6 => {
                f[l3 + 4..l3 + 6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
            }
        }
        let mut seg_flags = flags;
        if i + 1 < segments {
            seg_flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            seg_flags &= !TCP_CWR;
        }
        let seg_seq = seq.wrapping_add((i * mss) as u32);
        f[l4 + 4..l4 + 8].copy_from_slice(&seg_seq.to_be_bytes());
        f[l4 + 13] = seg_flags;
        f[l4 + 16..l4 + 18].fill(0);
        let pseudo = match gso.kind {
            GsoKind::Tcp4 => sum(&f[l3 + 12..l3 + 20], 6 + tcp_len as u64),
            GsoKind::Tcp6 => sum(&f[l3 + 8..l3 + 40], 6 + tcp_len as u64),
        };
        let c = fold(sum(&f[l4..], pseudo));
        f[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        out.push(p);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Whether the TCP checksum of an IPv4 or IPv6 frame (no VLAN) verifies.
    pub fn tcp_checksum_ok(f: &[u8]) -> bool {
        let v6 = f[12] == 0x86;
        let (l4, pseudo) = if v6 {
            (ETH_HLEN + 40, sum(&f[ETH_HLEN + 8..ETH_HLEN + 40], 6))
        } else {
            let ihl = usize::from(f[ETH_HLEN] & 0xf) * 4;
            (ETH_HLEN + ihl, sum(&f[ETH_HLEN + 12..ETH_HLEN + 20], 6))
        };
        fold(sum(&f[l4..], pseudo + (f.len() - l4) as u64)) == 0
    }

    /// An IPv4 (or IPv6) TCP frame with `payload` bytes, checksum field zero.
    pub fn tcp_frame(v6: bool, payload: usize, flags: u8) -> Vec<u8> {
        let mut f = vec![0x52, 0x54, 0, 0, 0, 2, 0x52, 0x54, 0, 0, 0, 1];
        if v6 {
            f.extend([0x86, 0xdd, 0x60, 0, 0, 0]);
            f.extend(((20 + payload) as u16).to_be_bytes());
            f.extend([6, 64]);
            f.extend([0xfd; 16]);
            f.extend([0xfe; 16]);
        } else {
            f.extend([0x08, 0x00, 0x45, 0]);
            f.extend(((40 + payload) as u16).to_be_bytes());
            f.extend([0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        }
        f.extend([0x30, 0x39, 0x00, 0x50]);
        f.extend(1000u32.to_be_bytes());
        f.extend(0u32.to_be_bytes());
        f.extend([0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend((0..payload).map(|i| (i * 7) as u8));
        f
    }

    #[test]
    fn checksums_match_the_rfc1071_example() {
        // RFC 1071's example words sum to 0xddf2 (folded); the checksum is its complement.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data, 0)), !0xddf2);
        assert_eq!(
            fold(sum(&[0xff], 0)),
            !0xff00,
            "an odd byte is the high half"
        );
    }

    #[test]
    fn a_partial_checksum_is_completed() {
        let mut f = tcp_frame(false, 100, 0x18);
        // The driver leaves the pseudo-header sum (not complemented) in the field.
        let pseudo = fold(sum(&f[26..34], 6 + 120));
        f[50..52].copy_from_slice(&(!pseudo).to_be_bytes());
        complete_checksum(
            &mut f,
            Csum {
                start: 34,
                offset: 16,
            },
        );
        assert!(tcp_checksum_ok(&f));
    }

    #[test]
    fn tcp_gso_packets_are_cut_into_valid_segments() {
        for v6 in [false, true] {
            let f = tcp_frame(v6, 3000, 0x19 | TCP_CWR);
            let gso = Gso {
                kind: if v6 { GsoKind::Tcp6 } else { GsoKind::Tcp4 },
                size: 1400,
                ecn: true,
                hdr_len: 0,
            };
            let mut out = Vec::new();
            segment(&f, gso, &mut out).unwrap();
            assert_eq!(out.len(), 3);
            let hdrs = if v6 { 74 } else { 54 };
            let mut payload = Vec::new();
            for (i, p) in out.iter().enumerate() {
                assert_eq!(&p[..HDR_LEN], &[0; HDR_LEN][..]);
                let s = &p[HDR_LEN..];
                assert!(tcp_checksum_ok(s), "segment {i} (v6 {v6})");
                let tcp = hdrs - 20;
                let seq = u32::from_be_bytes([s[tcp + 4], s[tcp + 5], s[tcp + 6], s[tcp + 7]]);
                assert_eq!(seq, 1000 + 1400 * i as u32);
                let flags = s[tcp + 13];
                assert_eq!(flags & TCP_FIN != 0, i == 2, "FIN only on the last");
                assert_eq!(flags & TCP_CWR != 0, i == 0, "CWR only on the first");
                if !v6 {
                    assert_eq!(fold(sum(&s[14..34], 0)), 0, "IPv4 header checksum");
                    let total = u16::from_be_bytes([s[16], s[17]]) as usize;
                    assert_eq!(total, s.len() - 14);
                } else {
                    let plen = u16::from_be_bytes([s[18], s[19]]) as usize;
                    assert_eq!(plen, s.len() - 54);
                }
                payload.extend_from_slice(&s[hdrs..]);
            }
            assert_eq!(payload, &f[hdrs..]);
        }
    }

    #[test]
    fn malformed_gso_packets_are_refused() {
        let gso = Gso {
            kind: GsoKind::Tcp4,
            size: 1,
            ecn: false,
            hdr_len: 0,
        };
        let f = tcp_frame(false, 3000, 0);
        assert!(matches!(
            segment(&f, gso, &mut Vec::new()),
            Err(OffloadError::TooManySegments { .. })
        ));
        let v6 = tcp_frame(true, 100, 0);
        let gso = Gso { size: 1000, ..gso };
        assert!(matches!(
            segment(&v6, gso, &mut Vec::new()),
            Err(OffloadError::Headers { .. })
        ));
        assert!(segment(&f[..40], gso, &mut Vec::new()).is_err());
        let mut bad_doff = f.clone();
        bad_doff[46] = 0x20;
        assert!(segment(&bad_doff, gso, &mut Vec::new()).is_err());
    }
}
