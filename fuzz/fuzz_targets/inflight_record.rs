//! The inflight region a frontend hands back (SET_INFLIGHT_FD) is shared memory the backend does
//! not trust: a hostile or confused frontend can write anything into it. The input is a queue
//! size, a used index and the bytes of one queue's record; recovering from it must never panic
//! and must only ever resubmit distinct heads inside the ring, at most a ring's worth, with the
//! ring continuing exactly that many entries after the used index. Recovering a second time
//! from the repaired record gives the same answer.
#![no_main]

use std::os::unix::fs::FileExt;

use libfuzzer_sys::fuzz_target;
use outboard_fuzz::input::Input;
use outboard_vhost_user::inflight::{InflightRegion, InflightShape};
use outboard_virtio::inflight::InflightSource;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let size = 1u16 << (1 + input.u8() % 8);
    let used = u16::from_le_bytes([input.u8(), input.u8()]);
    let shape = InflightShape::new(1, size, 1).expect("a valid shape");
    let region = InflightRegion::create(shape).expect("a memfd");
    let bytes = input.rest();
    let len = bytes.len().min(shape.size() as usize);
    region
        .file()
        .write_all_at(&bytes[..len], 0)
        .expect("write the record");
    let mut log = region.queue(0, size).expect("the record of queue 0");
    let first = log.recover(used);
    assert!(first.resubmit.len() <= usize::from(size));
    let mut seen = vec![false; usize::from(size)];
    for &h in &first.resubmit {
        assert!(h < size, "head {h} outside a ring of {size}");
        assert!(!seen[usize::from(h)], "head {h} resubmitted twice");
        seen[usize::from(h)] = true;
    }
    if let Some(next) = first.next_avail {
        assert_eq!(next, used.wrapping_add(first.resubmit.len() as u16));
    } else {
        assert!(first.resubmit.is_empty());
    }
    let mut again = region.queue(0, size).expect("the record of queue 0");
    let second = again.recover(used);
    assert_eq!(first.resubmit, second.resubmit);
});
