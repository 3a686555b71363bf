//! Placing one received packet into the driver's receive buffers, all or nothing
//! (VIRTIO 1.2, section 5.1.6.4).
//!
//! Without `VIRTIO_NET_F_MRG_RXBUF` a packet goes into one chain, which must hold it whole.
//! With it, the device takes chains until they hold the packet and writes `num_buffers` into the
//! header in the first. Chains are taken from the ring only once the packet is known to fit;
//! otherwise every chain taken is put back and the packet waits for the driver to add buffers.

use outboard_virtio::{ActiveQueue, GuestMemoryMmap};
use virtio_queue::QueueT;

use crate::chain::{write_across, ChainBuffers};
use crate::hdr::{VirtioNetHdr, HDR_LEN};

/// What became of a packet.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Placement {
    /// In the used ring, spanning this many chains.
    Placed(u16),
    /// Not enough buffers yet: nothing was taken.
    NoBuffers,
    /// The packet is larger than the driver's receive buffers can hold: dropped, nothing
    /// taken.
    TooBig,
    /// The driver offered unusable buffers (device-readable, outside memory, broken, or
    /// shorter than the header): they were returned empty and the packet dropped.
    BadBuffers(u16),
}

#[derive(Debug, Default)]
struct Taken {
    head: u16,
    buffers: ChainBuffers,
    capacity: usize,
}

/// What [`place`] keeps between packets so as not to allocate for each.
#[derive(Debug, Default)]
pub(crate) struct PlaceScratch {
    /// The chains taken for the packet being placed are the first ones; the rest keep their
    /// allocations for later packets.
    taken: Vec<Taken>,
}

/// Places `packet` (virtio header, then frame; the header's `num_buffers` is set here) into
/// the receive queue `rx`.
pub(crate) fn place(
    rx: &mut ActiveQueue,
    mem: &GuestMemoryMmap,
    packet: &mut [u8],
    mrg_rxbuf: bool,
    scratch: &mut PlaceScratch,
) -> Result<Placement, virtio_queue::Error> {
    let need = packet.len();
    let all = &mut scratch.taken;
    let mut n = 0usize;
    let mut capacity = 0usize;
    while capacity < need {
        if !mrg_rxbuf && n > 0 {
            // One chain must hold the packet: put it back, and leave the buffer to a smaller
            // packet.
            rx.put_back();
            return Ok(Placement::TooBig);
        }
        let Some(chain) = rx.pop(mem)? else {
            for _ in 0..n {
                rx.put_back();
            }
            return Ok(Placement::NoBuffers);
        };
        let head = chain.head_index();
        if n == all.len() {
            all.push(Taken::default());
        }
        let t = &mut all[n];
        let usable = t.buffers.walk_into(chain, mem).is_ok()
            && t.buffers.readable.is_empty()
            && (n > 0 || t.buffers.writable_len() >= HDR_LEN as u64);
        if !usable {
            // Give back everything taken for this packet, empty, and drop the packet: the
            // driver broke the ring's contract.
            let mut returned = 0u16;
            for t in all[..n].iter().map(|t| t.head).chain(std::iter::once(head)) {
                rx.add_used(mem, t, 0)?;
                returned += 1;
            }
            return Ok(Placement::BadBuffers(returned));
        }
        let cap = usize::try_from(t.buffers.writable_len()).unwrap_or(usize::MAX);
        capacity = capacity.saturating_add(cap);
        t.head = head;
        t.capacity = cap;
        n += 1;
        if n > usize::from(rx.queue().size()) {
            // Cannot happen with a ring of this size; keep `num_buffers` honest regardless.
            break;
        }
    }
    if capacity < need {
        for _ in 0..n {
            rx.put_back();
        }
        return Ok(Placement::TooBig);
    }
    let taken = &all[..n];
    let count = n as u16;
    let mut hdr_bytes = [0u8; HDR_LEN];
    hdr_bytes.copy_from_slice(&packet[..HDR_LEN]);
    let mut hdr = VirtioNetHdr::from_bytes(&hdr_bytes);
    hdr.num_buffers = count;
    packet[..HDR_LEN].copy_from_slice(&hdr.to_bytes());
    let mut rest: &[u8] = packet;
    for t in taken {
        let n = rest.len().min(t.capacity);
        let written = match write_across(mem, &t.buffers.writable, &rest[..n]) {
            Ok(w) => w,
            Err(e) => {
                // The buffers were checked against this memory snapshot: this does not happen.
                log::error!("virtio-net: cannot write a received packet: {e}");
                0
            }
        };
        rest = &rest[n..];
        rx.add_used(mem, t.head, written as u32)?;
    }
    Ok(Placement::Placed(count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    fn packet(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; HDR_LEN];
        p.extend((0..len).map(|i| i as u8));
        p
    }

    #[test]
    fn a_packet_fills_one_chain_without_mergeable_buffers() {
        let mem = memory();
        let mut d = MockDriver::new(&mem, 1);
        let b = d.rx_buffer(0, 2048);
        let mut q = d.queue(0);
        let mut p = packet(100);
        assert_eq!(
            place(&mut q, &mem, &mut p, false, &mut PlaceScratch::default()).unwrap(),
            Placement::Placed(1)
        );
        let used = d.used(0);
        assert_eq!(used, [(u32::from(b.0), 112)]);
        let got = d.read(b.1, 112);
        assert_eq!(&got[10..12], &[1, 0], "num_buffers is 1");
        assert_eq!(&got[12..], &p[12..]);
    }

    #[test]
    fn mergeable_buffers_span_chains_and_count_them() {
        let mem = memory();
        let mut d = MockDriver::new(&mem, 1);
        let bufs: Vec<_> = (0..4).map(|_| d.rx_buffer(0, 512)).collect();
        let mut q = d.queue(0);
        let mut p = packet(1200);
        assert_eq!(
            place(&mut q, &mem, &mut p, true, &mut PlaceScratch::default()).unwrap(),
            Placement::Placed(3)
        );
        let used = d.used(0);
        assert_eq!(used.len(), 3);
        assert_eq!(
            used.iter().map(|u| u.1).collect::<Vec<_>>(),
            [512, 512, 188]
        );
        let mut got = Vec::new();
        for (i, u) in used.iter().enumerate() {
            got.extend(d.read(bufs[i].1, u.1 as usize));
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
        assert_eq!(&got[12..], &p[12..]);
    }

    #[test]
    fn nothing_is_taken_when_the_packet_does_not_fit_yet() {
        let mem = memory();
        let mut d = MockDriver::new(&mem, 1);
        d.rx_buffer(0, 512);
        d.rx_buffer(0, 512);
        let mut q = d.queue(0);
        let mut p = packet(1500);
        assert_eq!(
            place(&mut q, &mem, &mut p, true, &mut PlaceScratch::default()).unwrap(),
            Placement::NoBuffers
        );
        assert_eq!(q.queue().next_avail(), 0, "both chains were put back");
        assert!(d.used(0).is_empty());
        assert_eq!(
            place(&mut q, &mem, &mut p, false, &mut PlaceScratch::default()).unwrap(),
            Placement::TooBig
        );
        assert_eq!(q.queue().next_avail(), 0);
        let mut small = packet(60);
        assert_eq!(
            place(
                &mut q,
                &mem,
                &mut small,
                false,
                &mut PlaceScratch::default()
            )
            .unwrap(),
            Placement::Placed(1)
        );
    }

    #[test]
    fn unusable_buffers_are_returned_empty() {
        let mem = memory();
        let mut d = MockDriver::new(&mem, 1);
        d.rx_buffer(0, 8);
        let mut q = d.queue(0);
        let mut p = packet(60);
        assert_eq!(
            place(&mut q, &mem, &mut p, true, &mut PlaceScratch::default()).unwrap(),
            Placement::BadBuffers(1)
        );
        assert_eq!(d.used(0), [(0, 0)]);
    }
}
