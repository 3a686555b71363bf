//! Split-ring tests against rust-vmm's device-side `virtio_queue::Queue` as the peer.

use super::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Chains seen by the device: (head, [(addr, len, writable)]).
type Seen = Vec<(u16, Vec<(u64, u32, bool)>)>;

struct Fixture {
    ram: GuestRam,
    q: DriverQueue,
    dev: Queue,
    mem: GuestMemoryMmap,
}

fn fixture(cfg: QueueConfig) -> Fixture {
    let mut ram = GuestRam::new(4 << 20).unwrap();
    let q = DriverQueue::new(&mut ram, 0, cfg).unwrap();
    let mut dev = Queue::new(cfg.size).unwrap();
    dev.set_size(cfg.size);
    dev.try_set_desc_table_address(GuestAddress(q.desc_table_gpa()))
        .unwrap();
    dev.try_set_avail_ring_address(GuestAddress(q.avail_ring_gpa()))
        .unwrap();
    dev.try_set_used_ring_address(GuestAddress(q.used_ring_gpa()))
        .unwrap();
    dev.set_event_idx(cfg.event_idx);
    dev.set_ready(true);
    let mem = ram.guest_memory();
    Fixture { ram, q, dev, mem }
}

fn cfg(size: u16) -> QueueConfig {
    QueueConfig {
        size,
        ..QueueConfig::default()
    }
}

impl Fixture {
    /// Device side: pops every available chain, fills its writable part with the head index
    /// and completes it with the number of bytes written. Returns the chains seen as
    /// (head, [(addr, len, writable)]).
    fn serve(&mut self) -> Seen {
        let mut seen = Vec::new();
        while let Some(chain) = self.dev.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let mut segs = Vec::new();
            let mut written = 0;
            for d in chain {
                if d.is_write_only() {
                    let fill = vec![head as u8; d.len() as usize];
                    self.mem.write_slice(&fill, d.addr()).unwrap();
                    written += d.len();
                }
                segs.push((d.addr().0, d.len(), d.is_write_only()));
            }
            self.dev.add_used(&self.mem, head, written).unwrap();
            seen.push((head, segs));
        }
        seen
    }
}

#[test]
fn chains_round_trip_through_the_rust_vmm_device_queue_across_index_wrap() {
    let mut f = fixture(cfg(8));
    let hdr = f.ram.alloc(16, 16).unwrap();
    let data = f.ram.alloc(64, 64).unwrap();
    let mut used = Vec::new();
    // 3 descriptors per chain, 2 chains per batch on an 8-entry ring; 40 rounds wrap the
    // 16-bit indices' ring slots many times.
    for round in 0..40u32 {
        for _ in 0..2 {
            f.q.add_chain(&[
                Segment::readable(&hdr),
                Segment::writable_part(&data, 0, 32),
                Segment::writable_part(&data, 32, 1),
            ])
            .unwrap();
        }
        assert_eq!(f.q.free_descriptors(), 2);
        f.q.kick().unwrap();
        let seen = f.serve();
        assert_eq!(seen.len(), 2, "round {round}");
        for (_, segs) in &seen {
            assert_eq!(
                segs,
                &vec![
                    (hdr.gpa(), 16, false),
                    (data.gpa(), 32, true),
                    (data.gpa() + 32, 1, true)
                ]
            );
        }
        used.clear();
        assert_eq!(f.q.poll_used(&mut used).unwrap(), 2);
        let heads: Vec<u32> = seen.iter().map(|(h, _)| u32::from(*h)).collect();
        assert_eq!(used.iter().map(|u| u.id).collect::<Vec<_>>(), heads);
        assert!(used.iter().all(|u| u.len == 33));
        assert_eq!(f.q.in_flight(), 0);
        assert_eq!(f.q.free_descriptors(), 8);
    }
    assert_eq!(f.q.avail_idx(), 80);
    assert_eq!(f.q.last_used(), 80);
    assert_eq!(data.read_u8(31), data.read_u8(32));
}

#[test]
fn a_batch_is_published_with_one_index_store_and_one_kick() {
    let mut f = fixture(cfg(16));
    let buf = f.ram.alloc(64, 64).unwrap();
    for _ in 0..5 {
        f.q.add_chain(&[Segment::writable(&buf)]).unwrap();
    }
    assert_eq!(
        f.dev.avail_idx(&f.mem, Ordering::Acquire).unwrap().0,
        0,
        "nothing is visible before the kick"
    );
    assert!(f.q.kick().unwrap());
    assert_eq!(f.dev.avail_idx(&f.mem, Ordering::Acquire).unwrap().0, 5);
    assert_eq!(f.q.kick_fd().read().unwrap(), 1);
    assert!(!f.q.kick().unwrap(), "nothing new, no kick");
    assert_eq!(f.q.stats().kicks, 1);
    assert_eq!(f.serve().len(), 5);
}

#[test]
fn kicks_are_suppressed_while_the_device_sets_no_notify() {
    let mut f = fixture(cfg(16));
    let buf = f.ram.alloc(64, 64).unwrap();
    f.dev.disable_notification(&f.mem).unwrap();
    f.q.submit(&[Segment::writable(&buf)]).unwrap();
    assert_eq!(f.q.stats().kicks, 0);
    assert_eq!(f.q.stats().kicks_suppressed, 1);
    f.dev.enable_notification(&f.mem).unwrap();
    f.q.submit(&[Segment::writable(&buf)]).unwrap();
    assert_eq!(f.q.stats().kicks, 1);
}

#[test]
fn with_event_idx_kicks_follow_avail_event() {
    let mut f = fixture(QueueConfig {
        event_idx: true,
        ..cfg(16)
    });
    let buf = f.ram.alloc(64, 64).unwrap();
    // The device asks to be told when avail moves past 0.
    f.dev.enable_notification(&f.mem).unwrap();
    assert_eq!(f.q.avail_event(), 0);
    assert!(f.q.kick().is_ok());
    f.q.submit(&[Segment::writable(&buf)]).unwrap();
    assert_eq!(f.q.stats().kicks, 1);
    // The device has not caught up, so further chains need no kick.
    f.q.submit(&[Segment::writable(&buf)]).unwrap();
    f.q.submit(&[Segment::writable(&buf)]).unwrap();
    assert_eq!(f.q.stats().kicks, 1);
    assert_eq!(f.q.stats().kicks_suppressed, 2);
    // After the device consumed everything and re-armed, the next chain kicks again.
    assert_eq!(f.serve().len(), 3);
    f.dev.enable_notification(&f.mem).unwrap();
    assert_eq!(f.q.avail_event(), 3);
    f.q.submit(&[Segment::writable(&buf)]).unwrap();
    assert_eq!(f.q.stats().kicks, 2);
}

#[test]
fn with_event_idx_used_event_turns_device_interrupts_on_and_off() {
    let mut f = fixture(QueueConfig {
        event_idx: true,
        ..cfg(16)
    });
    let buf = f.ram.alloc(64, 64).unwrap();
    let mut used = Vec::new();
    for mode in [
        NotifyMode::Interrupt,
        NotifyMode::Poll,
        NotifyMode::Interrupt,
    ] {
        f.q.set_notify_mode(mode);
        f.q.submit(&[Segment::writable(&buf)]).unwrap();
        f.serve();
        let interrupt = f.dev.needs_notification(&f.mem).unwrap();
        assert_eq!(interrupt, mode == NotifyMode::Interrupt, "{mode:?}");
        f.q.poll_used(&mut used).unwrap();
    }
}

#[test]
fn without_event_idx_poll_mode_sets_no_interrupt() {
    let mut f = fixture(cfg(16));
    f.q.set_notify_mode(NotifyMode::Poll);
    let flags: u16 = f.mem.read_obj(GuestAddress(f.q.avail_ring_gpa())).unwrap();
    assert_eq!(flags, VRING_AVAIL_F_NO_INTERRUPT as u16);
    f.q.set_notify_mode(NotifyMode::Interrupt);
    let flags: u16 = f.mem.read_obj(GuestAddress(f.q.avail_ring_gpa())).unwrap();
    assert_eq!(flags, 0);
}

#[test]
fn wait_used_sleeps_until_the_call_eventfd_fires_and_times_out_otherwise() {
    let mut f = fixture(cfg(16));
    let buf = f.ram.alloc(64, 64).unwrap();
    let mut used = Vec::new();
    let err =
        f.q.wait_used(Duration::from_millis(20), &mut used)
            .unwrap_err();
    assert!(matches!(err, QueueError::Timeout { .. }), "{err}");
    f.q.submit(&[Segment::writable(&buf)]).unwrap();
    let call = f.q.call_fd().try_clone().unwrap();
    let Fixture { mut dev, mem, .. } = f;
    let device = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        let chain = dev.pop_descriptor_chain(&mem).unwrap();
        dev.add_used(&mem, chain.head_index(), 7).unwrap();
        call.write(1).unwrap();
    });
    let n = f.q.wait_used(Duration::from_secs(10), &mut used).unwrap();
    device.join().unwrap();
    assert_eq!(n, 1);
    assert_eq!(used, vec![Used { id: 0, len: 7 }]);
    assert!(f.q.stats().interrupt_waits >= 1);
}

#[test]
fn indirect_chains_take_one_ring_descriptor() {
    let mut f = fixture(QueueConfig {
        indirect_max: 4,
        ..cfg(4)
    });
    let a = f.ram.alloc(16, 16).unwrap();
    let b = f.ram.alloc(512, 512).unwrap();
    for _ in 0..4 {
        f.q.add_indirect_chain(&[
            Segment::readable(&a),
            Segment::writable(&b),
            Segment::writable_part(&b, 0, 1),
        ])
        .unwrap();
    }
    assert_eq!(f.q.free_descriptors(), 0);
    assert!(matches!(
        f.q.add_indirect_chain(&[Segment::readable(&a); 5]),
        Err(QueueError::IndirectTooLong { .. })
    ));
    f.q.kick().unwrap();
    let seen = f.serve();
    assert_eq!(seen.len(), 4);
    for (_, segs) in seen {
        assert_eq!(
            segs,
            vec![
                (a.gpa(), 16, false),
                (b.gpa(), 512, true),
                (b.gpa(), 1, true)
            ]
        );
    }
    let mut used = Vec::new();
    f.q.poll_used(&mut used).unwrap();
    assert_eq!(f.q.free_descriptors(), 4);
}

#[test]
fn spin_used_reaps_without_interrupts() {
    let mut f = fixture(cfg(8));
    f.q.set_notify_mode(NotifyMode::Poll);
    let buf = f.ram.alloc(8, 8).unwrap();
    f.q.submit(&[Segment::writable(&buf)]).unwrap();
    f.serve();
    let mut used = Vec::new();
    assert_eq!(f.q.spin_used(Duration::from_secs(1), &mut used).unwrap(), 1);
    assert!(f.q.spin_used(Duration::from_millis(10), &mut used).is_err());
}

#[test]
fn device_returning_a_head_twice_or_a_runaway_used_idx_is_an_error() {
    let mut f = fixture(cfg(8));
    let buf = f.ram.alloc(8, 8).unwrap();
    let head = f.q.submit(&[Segment::writable(&buf)]).unwrap();
    f.serve();
    // A buggy device completes the same head again.
    f.dev.add_used(&f.mem, head, 0).unwrap();
    let mut used = Vec::new();
    let err = f.q.poll_used(&mut used).unwrap_err();
    assert!(
        matches!(err, QueueError::BadUsedId { id: 0, slot: 1, .. }),
        "{err}"
    );
    assert_eq!(used.len(), 1, "the valid completion was still reported");
    // used.idx jumping more than a ring ahead.
    let used_idx_gpa = GuestAddress(f.q.used_ring_gpa() + 2);
    f.mem.write_obj(100u16, used_idx_gpa).unwrap();
    assert!(matches!(
        f.q.poll_used(&mut used),
        Err(QueueError::UsedIdxRunaway { used_idx: 100, .. })
    ));
}

#[test]
fn raw_descriptors_and_heads_reach_the_device_as_written() {
    let mut f = fixture(cfg(8));
    let d = f.q.alloc_descs(2).unwrap();
    assert_eq!(d, vec![0, 1]);
    // A two-descriptor loop with an address outside guest memory.
    let flags = VRING_DESC_F_NEXT as u16;
    f.q.write_desc(
        d[0],
        RawDescriptor {
            addr: 1 << 40,
            len: 4096,
            flags,
            next: d[1],
        },
    )
    .unwrap();
    f.q.write_desc(
        d[1],
        RawDescriptor {
            addr: 0,
            len: 16,
            flags,
            next: d[0],
        },
    )
    .unwrap();
    assert_eq!(f.q.read_desc(d[1]).unwrap().next, d[0]);
    assert!(f.q.write_desc(8, RawDescriptor::default()).is_err());
    f.q.push_avail(d[0]);
    f.q.kick().unwrap();
    let chain = f.dev.pop_descriptor_chain(&f.mem).unwrap();
    assert_eq!(chain.head_index(), d[0]);
    // rust-vmm's iterator stops after at most queue-size descriptors on a loop.
    assert!(chain.count() <= 8);
    f.dev.add_used(&f.mem, d[0], 0).unwrap();
    let mut used = Vec::new();
    f.q.poll_used(&mut used).unwrap();
    assert_eq!(used, vec![Used { id: 0, len: 0 }]);
    assert_eq!(
        f.q.free_descriptors(),
        6,
        "raw descriptors stay with the test"
    );
    f.q.release_descs(&d);
    assert_eq!(f.q.free_descriptors(), 8);
    f.q.set_avail_idx(1000);
    assert_eq!(f.dev.avail_idx(&f.mem, Ordering::Acquire).unwrap().0, 1000);
}

#[test]
fn need_event_matches_the_spec_formula() {
    assert!(need_event(0, 1, 0));
    assert!(!need_event(0, 3, 1));
    assert!(need_event(0xffff, 1, 0xfffe), "wraps");
    assert!(!need_event(5, 5, 5));
}

#[test]
fn vring_setup_uses_our_mapping_addresses_by_default() {
    let f = fixture(cfg(8));
    let s = f.q.vring_setup(RingAddressing::UserAddress).unwrap();
    assert_eq!(s.desc_addr, f.ram.user_addr(f.q.desc_table_gpa()).unwrap());
    assert_eq!(s.used_addr, f.ram.user_addr(f.q.used_ring_gpa()).unwrap());
    let g = f.q.vring_setup(RingAddressing::GuestPhysical).unwrap();
    assert_eq!(g.avail_addr, f.q.avail_ring_gpa());
    assert_eq!(g.config().queue_size, 8);
}
