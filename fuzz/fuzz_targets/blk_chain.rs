//! virtio-blk request parsing over arbitrary guest memory: descriptor tables and avail rings
//! written by the input, chains popped with virtio-queue, each run through
//! `BlkRequest::parse` and `locate_status` against limits the input chooses. Besides never
//! panicking, a request that parses must keep every promise the device relies on (checked
//! below): its status byte is where `locate_status` says, its data lies in guest memory, and its
//! sizes and ranges are within the limits and the capacity.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboard_blk::{
    locate_status, BlkRequest, RangeLimit, RequestKind, RequestLimits, SectorRange, Segment,
    SECTOR_SIZE,
};
use outboard_fuzz::guest;
use outboard_fuzz::input::Input;
use outboard_virtio::GuestMemoryMmap;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryBackend;

fn range_limit(input: &mut Input) -> Option<RangeLimit> {
    let b = input.u8();
    (b & 1 != 0).then(|| RangeLimit {
        max_sectors: input.u32() % (1 << 23),
        max_segments: u32::from(b >> 1) % 40,
    })
}

fn limits(input: &mut Input) -> RequestLimits {
    RequestLimits {
        capacity: input.u64() % (1 << 41),
        read_only: input.bool(),
        seg_max: u32::from(input.u16() % 1025),
        size_max: input.u32(),
        discard: range_limit(input),
        write_zeroes: range_limit(input),
    }
}

fn check_data(mem: &GuestMemoryMmap, data: &[Segment], sector: u64, limits: &RequestLimits) {
    let len: u64 = data.iter().map(|s| u64::from(s.len)).sum();
    assert_eq!(
        len % SECTOR_SIZE,
        0,
        "data of {len} bytes is not whole sectors"
    );
    assert!(data.len() <= limits.seg_max as usize, "too many segments");
    assert!(
        sector + len / SECTOR_SIZE <= limits.capacity,
        "beyond capacity"
    );
    for s in data {
        assert!(s.len <= limits.size_max, "segment too large");
        assert!(
            mem.check_range(s.addr, s.len as usize),
            "segment {s:?} is not in guest memory"
        );
    }
}

fn check_ranges(ranges: &[SectorRange], limit: Option<RangeLimit>, capacity: u64) {
    let limit = limit.expect("a range command that was not negotiated parsed");
    assert!(!ranges.is_empty());
    assert!(ranges.len() <= limit.max_segments as usize);
    for r in ranges {
        assert!(r.num_sectors <= limit.max_sectors);
        assert!(r.sector + u64::from(r.num_sectors) <= capacity);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let limits = limits(&mut input);
    let size = guest::queue_size(input.u8());
    let event_idx = input.bool();
    let next_avail = input.u16();
    let mem = guest::memory();
    guest::patch(&mem, &mut input, 64);
    let config = guest::queue_config(0, guest::MAX_QUEUE_SIZE, size, next_avail);
    let Ok(mut queue) = config.build(&mem, event_idx) else {
        return;
    };
    for _ in 0..2 * u32::from(size) {
        let Some(chain) = queue.pop_descriptor_chain(&mem) else {
            break;
        };
        let status = locate_status(chain.clone(), &mem);
        let head = chain.head_index();
        match BlkRequest::parse(chain, &mem, &limits) {
            Ok(request) => {
                assert_eq!(status, Some(request.status_addr()));
                assert_eq!(request.head(), head);
                let writes = matches!(
                    request.kind(),
                    RequestKind::Write { .. }
                        | RequestKind::Discard { .. }
                        | RequestKind::WriteZeroes { .. }
                );
                assert!(
                    !(writes && limits.read_only),
                    "a write parsed on a read-only device"
                );
                match request.kind() {
                    RequestKind::Read { sector, data } | RequestKind::Write { sector, data } => {
                        check_data(&mem, data, *sector, &limits)
                    }
                    RequestKind::Flush => {}
                    RequestKind::GetId { data } => {
                        assert!(data.iter().map(|s| u64::from(s.len)).sum::<u64>() >= 20);
                        for s in data {
                            assert!(mem.check_range(s.addr, s.len as usize));
                        }
                    }
                    RequestKind::Discard { ranges } => {
                        check_ranges(ranges, limits.discard, limits.capacity)
                    }
                    RequestKind::WriteZeroes { ranges } => {
                        check_ranges(ranges, limits.write_zeroes, limits.capacity)
                    }
                }
            }
            Err(e) => {
                // Every error has a status the driver can be told; reaching it must not panic.
                let _ = e.status();
            }
        }
        // The device answers every chain, whatever its fate.
        let _ = queue.add_used(&mem, head, 0);
    }
});
