//! Saved-state loading, the migration trust boundary (a state blob arrives from the frontend on
//! SET_DEVICE_STATE_FD). The first byte picks the layer:
//!
//! 0. `SavedState::decode` of a raw blob;
//! 1. a blob with a valid header and checksum around the input (so that the fuzzer reaches the
//!    payload rather than the CRC), decoded and loaded by `Framework::load_state` into a blk or
//!    net device, fresh or with features negotiated;
//! 2. `VirtioDevice::load_state` of a virtio-blk device payload;
//! 3. `VirtioDevice::load_state` of a virtio-net device payload.
//!
//! Besides never panicking: a decoded blob re-encodes to itself, and a device that accepted a
//! payload saves what it loaded.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use outboard_blk::{Blk, BlkConfig, BlkState};
use outboard_fuzz::guest::CountingInterrupt;
use outboard_fuzz::input::Input;
use outboard_net::backend::switch::{Switch, SwitchConfig};
use outboard_net::{Net, NetConfig, NetState, DEFAULT_MAC};
use outboard_virtio::state::{SavedState, FORMAT_VERSION, STATE_MAGIC};
use outboard_virtio::{Framework, VirtioDevice};

/// `VIRTIO_NET_S_ANNOUNCE`: a loaded state never keeps it (the device asks again).
const STATUS_ANNOUNCE: u16 = 2;

fn blk(input: &mut Input) -> Blk {
    let b = input.u8();
    let mut config = BlkConfig::null((u64::from(b >> 2) + 1) << 20);
    config.num_queues = 1 + u16::from(b & 1);
    config.read_only = b & 2 != 0;
    Blk::new(config).expect("a valid null configuration")
}

fn net(input: &mut Input) -> Net {
    let b = input.u8();
    let pairs = 1 + u16::from(b & 1);
    let mut config = NetConfig::new(DEFAULT_MAC);
    config.queue_pairs = pairs;
    config.mtu = if b & 2 != 0 { 9000 } else { 1500 };
    let switch = Switch::new(1, pairs, SwitchConfig::default()).expect("a valid switch");
    Net::new(config, Box::new(switch.port(0))).expect("a valid configuration")
}

fn raw_blob(blob: &[u8]) {
    let Ok(state) = SavedState::decode(blob) else {
        return;
    };
    let again = state.encode().expect("a decoded state encodes");
    assert_eq!(again, blob, "a decoded blob re-encodes to itself");
}

fn framework_load(input: &mut Input) {
    let flags = input.u8();
    let compat = u16::from(input.u8() % 4);
    let device: Box<dyn VirtioDevice> = if flags & 1 != 0 {
        Box::new(net(input))
    } else {
        Box::new(blk(input))
    };
    let payload = input.rest();
    let mut blob = Vec::new();
    blob.extend_from_slice(&STATE_MAGIC);
    blob.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    blob.extend_from_slice(&device.device_type().id().to_le_bytes());
    blob.extend_from_slice(&compat.to_le_bytes());
    blob.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    blob.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    blob.extend_from_slice(payload);
    raw_blob(&blob);
    let Ok(state) = SavedState::decode(&blob) else {
        return;
    };
    let mut fw = Framework::new(device, Arc::new(CountingInterrupt::default()));
    if flags & 2 != 0 && fw.set_features(fw.offered_features()).is_err() {
        return;
    }
    if fw.load_state(&state, &[1, 2]).is_ok() {
        let saved = fw
            .save_state(state.compat_version)
            .expect("a loaded device saves");
        assert_eq!(saved.device_type, state.device_type);
        assert_eq!(
            saved.framework.queues.len(),
            state.framework.queues.len(),
            "the queue count was checked"
        );
    }
    fw.reset();
}

fn blk_payload(input: &mut Input) {
    let mut device = blk(input);
    let payload = input.rest();
    if device.load_state(payload).is_ok() {
        assert!(BlkState::decode(payload).is_ok());
        assert_eq!(
            device.save_state().expect("saves"),
            payload,
            "the device saves what it loaded"
        );
    }
}

fn net_payload(input: &mut Input) {
    let mut device = net(input);
    let payload = input.rest();
    if device.load_state(payload).is_ok() {
        let loaded = NetState::decode(payload).expect("a loaded payload decodes");
        let mut saved = NetState::decode(&device.save_state().expect("saves")).expect("decodes");
        assert_eq!(saved.status, loaded.status & !STATUS_ANNOUNCE);
        saved.status = loaded.status;
        assert_eq!(saved, loaded, "the device saves what it loaded");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    match input.u8() % 4 {
        0 => raw_blob(input.rest()),
        1 => framework_load(&mut input),
        2 => blk_payload(&mut input),
        _ => net_payload(&mut input),
    }
});
