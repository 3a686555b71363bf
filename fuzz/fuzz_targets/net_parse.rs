//! virtio-net parsers at the trust boundary, called directly through their public APIs:
//!
//! - `NetHdr::parse` of the `virtio_net_hdr` in front of every packet (both directions), then
//!   what the device does with a header it accepted: `complete_checksum` and `segment` (the
//!   software offloads, fed packets another guest sent through the switch);
//! - `CtrlCommand::parse` of control-queue commands against negotiated features;
//! - `RxFilter::accepts` on received frames.
//!
//! The first byte picks the parser. Besides never panicking, accepted input must keep the
//! promises the device relies on (checked below).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboard_fuzz::input::Input;
use outboard_net::ctrl::{CtrlCommand, MAX_COMMAND_LEN};
use outboard_net::filter::{MacTable, RxFilter, RxMode, VLAN_IDS};
use outboard_net::hdr::{NetHdr, VirtioNetHdr, HDR_LEN};
use outboard_net::offload::{complete_checksum, segment, MAX_SEGMENTS};
use outboard_net::{MacAddress, Negotiated, Offloads};

fn offloads(b: u8) -> Offloads {
    Offloads {
        csum: b & 1 != 0,
        tso4: b & 2 != 0,
        tso6: b & 4 != 0,
        ecn: b & 8 != 0,
    }
}

fn header(input: &mut Input) {
    let raw = input.array::<HDR_LEN>();
    let wire = VirtioNetHdr::from_bytes(&raw);
    assert_eq!(wire.to_bytes(), raw, "the wire header round-trips");
    let flags = input.u8();
    let allowed = offloads(flags);
    let receive = flags & 16 != 0;
    let frame = input.rest();
    let Ok(hdr) = NetHdr::parse(&wire, frame.len(), allowed, receive) else {
        return;
    };
    // What the device forwards is what it accepted.
    assert_eq!(
        NetHdr::parse(
            &hdr.to_wire(wire.num_buffers),
            frame.len(),
            allowed,
            receive
        ),
        Ok(hdr),
        "an accepted header survives re-encoding"
    );
    if let Some(csum) = hdr.csum {
        let mut f = frame.to_vec();
        complete_checksum(&mut f, csum);
        // Only the two checksum bytes may change.
        let at = usize::from(csum.start) + usize::from(csum.offset);
        assert_eq!(f[..at], frame[..at]);
        assert_eq!(f[at + 2..], frame[at + 2..]);
    }
    if let Some(gso) = hdr.gso {
        let mut out = Vec::new();
        if segment(frame, gso, &mut out).is_ok() {
            assert!(!out.is_empty() && out.len() <= MAX_SEGMENTS);
            for p in &out {
                let mut h = [0u8; HDR_LEN];
                h.copy_from_slice(&p[..HDR_LEN]);
                // Segments carry no offload: any receiver takes them as they are.
                let seg = NetHdr::parse(
                    &VirtioNetHdr::from_bytes(&h),
                    p.len() - HDR_LEN,
                    Offloads::default(),
                    true,
                );
                assert_eq!(seg, Ok(NetHdr::default()));
                assert!(p.len() - HDR_LEN <= frame.len() + usize::from(gso.size));
            }
        }
    }
}

fn ctrl(input: &mut Input) {
    let negotiated = Negotiated::from_features(input.u64());
    let max_pairs = input.u8() % 65;
    let bytes = input.rest();
    let bytes = &bytes[..bytes.len().min(MAX_COMMAND_LEN)];
    let Ok(command) = CtrlCommand::parse(bytes, &negotiated, u16::from(max_pairs)) else {
        return;
    };
    match command {
        CtrlCommand::RxMode { .. } => assert_eq!(bytes.len(), 3),
        CtrlCommand::MacTableSet { unicast, multicast } => {
            assert!(negotiated.ctrl_rx);
            assert_eq!(bytes.len(), 2 + 8 + 6 * (unicast.len() + multicast.len()));
        }
        CtrlCommand::MacAddrSet(mac) => {
            assert!(negotiated.ctrl_mac_addr && !mac.is_multicast());
        }
        CtrlCommand::VlanAdd(vid) | CtrlCommand::VlanDel(vid) => {
            assert!(negotiated.ctrl_vlan && usize::from(vid) < VLAN_IDS);
        }
        CtrlCommand::AnnounceAck => assert!(negotiated.announce),
        CtrlCommand::VqPairsSet(pairs) => {
            assert!(negotiated.mq && (1..=u16::from(max_pairs)).contains(&pairs));
        }
    }
}

fn mac(input: &mut Input) -> MacAddress {
    MacAddress(input.array())
}

fn filter(input: &mut Input) {
    let mut f = RxFilter::new(mac(input));
    let bits = input.u8();
    if let Some(mode) = RxMode::from_bits(bits) {
        assert_eq!(mode.bits(), bits, "receive modes round-trip");
        f.mode = mode;
    }
    let counts = input.u8();
    let unicast = (0..counts & 0xf).map(|_| mac(input)).collect();
    let multicast = (0..counts >> 4).map(|_| mac(input)).collect();
    f.table = MacTable::from_lists(unicast, multicast);
    let flags = input.u8();
    f.table.unicast_overflow |= flags & 1 != 0;
    f.table.multicast_overflow |= flags & 2 != 0;
    f.vlan_filtering = flags & 4 != 0;
    for _ in 0..flags >> 4 {
        let vid = input.u16();
        f.vlans.set(vid, true);
    }
    let bytes = f.vlans.to_bytes();
    assert_eq!(
        outboard_net::filter::VlanTable::from_bytes(&bytes).to_bytes(),
        bytes
    );
    let frame = input.rest();
    let _ = f.accepts(frame);
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    match input.u8() % 3 {
        0 => header(&mut input),
        1 => ctrl(&mut input),
        _ => filter(&mut input),
    }
});
