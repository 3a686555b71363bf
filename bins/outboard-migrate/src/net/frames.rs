//! The numbered frames of the net workload: a self-describing payload (magic, direction,
//! sequence number, length, CRC-32) behind an Ethernet header from one port's MAC to the other's,
//! of a length that varies with the number.

const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const MAGIC: &[u8; 4] = b"OBMN";
const HEADER: usize = 14;
/// magic (4), direction (1), sequence number (8), length (2), CRC-32 (4).
const RECORD: usize = 19;
const MIN_FRAME: usize = 60;
const MAX_FRAME: usize = 1514;

/// The MAC of port `i`.
pub fn mac(i: usize) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x6d, 0x69, 0x10 + i as u8]
}

fn frame_len(seq: u64) -> usize {
    MIN_FRAME + (seq as usize * 37) % (MAX_FRAME - MIN_FRAME + 1)
}

/// Frame `seq` of direction `dir` (0: port A to B, 1: B to A).
pub fn numbered_frame(dir: u8, seq: u64) -> Vec<u8> {
    let (src, dst) = (usize::from(dir), usize::from(1 - dir));
    let len = frame_len(seq);
    let mut f = Vec::with_capacity(len);
    f.extend(mac(dst));
    f.extend(mac(src));
    f.extend(ETHERTYPE);
    f.extend(MAGIC);
    f.push(dir);
    f.extend(seq.to_le_bytes());
    f.extend((len as u16).to_le_bytes());
    let crc_at = f.len();
    f.extend([0; 4]);
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while f.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f.push(x as u8);
    }
    let crc = checksum(&f, crc_at);
    f[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    f
}

fn checksum(f: &[u8], crc_at: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&f[HEADER..crc_at]);
    h.update(&f[crc_at + 4..]);
    h.finalize()
}

/// The direction and number of a received frame, or why it is not one of the runner's.
pub fn parse_frame(f: &[u8]) -> Result<(u8, u64), String> {
    if f.len() < HEADER + RECORD || f[12..14] != ETHERTYPE || &f[14..18] != MAGIC {
        return Err(format!("a {}-byte frame that is not the runner's", f.len()));
    }
    let dir = f[18];
    let seq = u64::from_le_bytes(f[19..27].try_into().expect("8 bytes"));
    let len = usize::from(u16::from_le_bytes([f[27], f[28]]));
    let crc = u32::from_le_bytes(f[29..33].try_into().expect("4 bytes"));
    if len != f.len() || dir > 1 {
        return Err(format!(
            "frame {seq}: {} bytes where it says {len} (direction {dir})",
            f.len()
        ));
    }
    if checksum(f, 29) != crc {
        return Err(format!(
            "frame {seq} of direction {dir}: bad CRC (corrupted)"
        ));
    }
    Ok((dir, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_frames_check_themselves() {
        for seq in [0, 1, 2, 77, 1 << 40] {
            for dir in [0, 1] {
                let f = numbered_frame(dir, seq);
                assert!((MIN_FRAME..=MAX_FRAME).contains(&f.len()));
                assert_eq!(parse_frame(&f), Ok((dir, seq)));
                let mut bad = f.clone();
                let last = bad.len() - 1;
                bad[last] ^= 1;
                assert!(parse_frame(&bad).unwrap_err().contains("bad CRC"));
                assert!(parse_frame(&f[..f.len() - 1]).is_err());
            }
        }
        assert_ne!(numbered_frame(0, 5), numbered_frame(0, 6));
        assert!(parse_frame(&[0u8; 64]).is_err());
    }
}
