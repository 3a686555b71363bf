//! An in-process L2 switch between the virtio-net devices one process serves.
//!
//! Each port is a [`PacketBackend`] with one bounded ingress queue per queue pair. A frame a
//! port transmits is forwarded by destination MAC address: to the port that address was last
//! seen on (learned from source addresses), or flooded to every other port when it is
//! broadcast, multicast or unknown. Each receiving device then applies its own receive filter
//! and offload fixups, so ports that negotiated different offloads can talk.
//!
//! Nothing blocks: a queue that is full (its driver is slow or posts no buffers) drops what
//! arrives and counts it, so a slow port never holds up the others. Only when *no* other port
//! that is up has room does a sender's queue report congestion ([`PacketQueue::congested`]):
//! its device then leaves transmitted frames in the driver's ring until a receiver makes room
//! (or goes down) and wakes it, instead of copying them out for nothing. This backpressure never
//! holds a sender that has another place to go; with two ports, a receiver that is up but never
//! takes its frames holds the other port's transmissions until it does or goes down (they could
//! not be delivered anyway). The learning table is bounded too; a full table learns nothing new
//! until entries age out.
//!
//! The learning table is keyed by guest-chosen MAC addresses, so its hash must not let a guest
//! pick addresses that collide (which would turn every lookup of every port into a scan). It
//! is two folded 64×64→128-bit multiplies keyed with random 64-bit values per switch: as cheap
//! as FxHash (SipHash, std's default, was ~6 % of the switch's cycles), and a guest that does
//! not know the key cannot aim for collisions. The table's size bound caps the damage anyway.
//!
//! Packet buffers circulate: a receiving port's spent buffers go back to the ports that send
//! to it (taken under the ingress lock the sender holds anyway), so the steady state
//! allocates nothing per frame.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{BackendError, PacketBackend, PacketQueue, MAX_SPARES, SEND_BATCH};
use crate::config::{MacAddress, Offloads, ETH_HLEN, MAX_QUEUE_PAIRS};
use crate::hdr::HDR_LEN;

/// The sizes of the switch's queues and tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwitchConfig {
    /// Packets each ingress queue (one per port and queue pair) holds before it drops.
    pub queue_capacity: usize,
    /// MAC addresses the learning table holds.
    pub table_capacity: usize,
    /// How long a learned address stays without being seen again.
    pub aging: Duration,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig {
            queue_capacity: 1024,
            table_capacity: 4096,
            aging: Duration::from_secs(300),
        }
    }
}

/// Counters of one port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames queued for this port.
    pub delivered: u64,
    /// Frames dropped because this port's queue was full.
    pub dropped_full: u64,
    /// Frames dropped because no queue pair of this port was enabled.
    pub dropped_down: u64,
    /// Frames this port sent that could not be forwarded (runts, to itself).
    pub dropped_invalid: u64,
}

#[derive(Debug, Default)]
struct PortCounters {
    delivered: AtomicU64,
    dropped_full: AtomicU64,
    dropped_down: AtomicU64,
    dropped_invalid: AtomicU64,
}

#[derive(Debug, Default)]
struct IngressQueue {
    packets: VecDeque<Vec<u8>>,
    /// Buffers the receiver is done with, for senders to fill again.
    spares: Vec<Vec<u8>>,
}

#[derive(Debug)]
struct Ingress {
    queue: Mutex<IngressQueue>,
    /// `queue.packets.len()`, kept under the lock, for senders to read without it.
    len: AtomicUsize,
    /// Readable while `queue.packets` is not empty (written and read under the lock).
    ready: EventFd,
}

/// A queue pair's transmit side, as a sender the switch may have to wake.
#[derive(Debug, Default)]
struct Sender {
    /// Found every destination full and waits for room.
    blocked: AtomicBool,
    /// Written when room frees up while `blocked`.
    waker: Mutex<Option<EventFd>>,
}

#[derive(Debug)]
struct Port {
    pairs: Vec<Ingress>,
    senders: Vec<Sender>,
    /// Bit `i`: queue pair `i` receives.
    enabled: AtomicU64,
    counters: PortCounters,
}

#[derive(Debug)]
struct Learned {
    port: usize,
    seen: Instant,
}

#[derive(Debug)]
struct SwitchInner {
    ports: Vec<Port>,
    /// How many senders are blocked (so that receivers look for them only then).
    blocked: AtomicUsize,
    table: Mutex<HashMap<u64, Learned, MacHashKey>>,
    config: SwitchConfig,
    /// Room a queue must have for its port to count as a place to send to: a whole batch.
    headroom: usize,
}

/// The learning table's hash (see the module documentation): folded multiplies, keyed per
/// switch.
#[derive(Clone, Copy, Debug)]
struct MacHashKey {
    k0: u64,
    k1: u64,
    k2: u64,
}

impl MacHashKey {
    fn random() -> Self {
        // std's RandomState is seeded from the OS's randomness; two of its hashes make the key.
        let seed = RandomState::new();
        MacHashKey {
            k0: seed.hash_one(0x6d61_6373_7769_7463u64),
            k1: seed.hash_one(0x6b65_7931_0000_0001u64) | 1,
            k2: seed.hash_one(0x6b65_7932_0000_0002u64) | 1,
        }
    }
}

/// The 128-bit product of `a` and `b`, its halves XORed: every input bit reaches both halves.
fn folded_multiply(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

impl BuildHasher for MacHashKey {
    type Hasher = MacHasher;

    fn build_hasher(&self) -> MacHasher {
        MacHasher {
            key: *self,
            state: self.k0,
        }
    }
}

/// See [`MacHashKey`]. The table's keys are `u64`s ([`mac_key`]): two multiplies per lookup.
#[derive(Debug)]
struct MacHasher {
    key: MacHashKey,
    state: u64,
}

impl Hasher for MacHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.state = folded_multiply(self.state ^ v, self.key.k1);
    }

    fn finish(&self) -> u64 {
        // A second round: after one, the low bits (the table's bucket index) depend on the
        // key's high bits only through the product's high half.
        folded_multiply(self.state, self.key.k2)
    }
}

/// A MAC address as the learning table's key.
fn mac_key(mac: MacAddress) -> u64 {
    let m = mac.0;
    u64::from_le_bytes([m[0], m[1], m[2], m[3], m[4], m[5], 0, 0])
}

/// The switch. See the module documentation.
#[derive(Clone, Debug)]
pub struct Switch {
    inner: Arc<SwitchInner>,
}

fn mac_at(frame: &[u8], offset: usize) -> MacAddress {
    let mut m = [0u8; 6];
    m.copy_from_slice(&frame[offset..offset + 6]);
    MacAddress(m)
}

/// FNV-1a over the fields that identify a flow: the IP addresses and, for TCP and UDP, the
/// ports; the MAC addresses for anything else. Packets of one flow land on one queue pair.
fn flow_hash(frame: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    };
    let mut l3 = ETH_HLEN;
    let mut ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype == 0x8100 && frame.len() >= ETH_HLEN + 4 {
        ethertype = u16::from_be_bytes([frame[16], frame[17]]);
        l3 += 4;
    }
    let ip = &frame[l3.min(frame.len())..];
    let (addrs, proto, l4) = match ethertype {
        0x0800 if ip.len() >= 20 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
            (&ip[12..20], if fragment { 0 } else { ip[9] }, ihl)
        }
        0x86dd if ip.len() >= 40 => (&ip[8..40], ip[6], 40),
        _ => {
            eat(&frame[..12]);
            return h;
        }
    };
    eat(addrs);
    if matches!(proto, 6 | 17) && ip.len() >= l4 + 4 {
        eat(&ip[l4..l4 + 4]);
    }
    h
}

impl Switch {
    /// A switch of `ports` ports with `pairs` queue pairs each.
    pub fn new(ports: usize, pairs: u16, config: SwitchConfig) -> Result<Self, BackendError> {
        let unusable = |reason: String| BackendError::Unusable {
            what: "switch".into(),
            reason,
        };
        if pairs == 0 || pairs > MAX_QUEUE_PAIRS {
            return Err(unusable(format!(
                "{pairs} queue pairs (1..={MAX_QUEUE_PAIRS})"
            )));
        }
        if config.queue_capacity == 0 || config.table_capacity == 0 {
            return Err(unusable(
                "queue and table capacities must be nonzero".into(),
            ));
        }
        let mut all = Vec::with_capacity(ports);
        for p in 0..ports {
            let mut ingress = Vec::with_capacity(usize::from(pairs));
            for i in 0..pairs {
                let ready = EventFd::new(EFD_NONBLOCK).map_err(|source| BackendError::Io {
                    operation: "creating an eventfd",
                    what: format!("switch port {p} queue {i}"),
                    source,
                })?;
                ingress.push(Ingress {
                    queue: Mutex::new(IngressQueue::default()),
                    len: AtomicUsize::new(0),
                    ready,
                });
            }
            all.push(Port {
                pairs: ingress,
                senders: (0..pairs).map(|_| Sender::default()).collect(),
                enabled: AtomicU64::new(0),
                counters: PortCounters::default(),
            });
        }
        Ok(Switch {
            inner: Arc::new(SwitchInner {
                ports: all,
                blocked: AtomicUsize::new(0),
                table: Mutex::new(HashMap::with_hasher(MacHashKey::random())),
                headroom: SEND_BATCH.min(config.queue_capacity.div_ceil(2)),
                config,
            }),
        })
    }

    /// The number of ports.
    pub fn ports(&self) -> usize {
        self.inner.ports.len()
    }

    /// The backend of port `index` (a device's packet backend).
    pub fn port(&self, index: usize) -> SwitchPort {
        assert!(index < self.ports(), "switch port {index} does not exist");
        SwitchPort {
            inner: self.inner.clone(),
            index,
        }
    }

    /// The counters of port `index`.
    pub fn port_stats(&self, index: usize) -> PortStats {
        let c = &self.inner.ports[index].counters;
        PortStats {
            delivered: c.delivered.load(Ordering::Relaxed),
            dropped_full: c.dropped_full.load(Ordering::Relaxed),
            dropped_down: c.dropped_down.load(Ordering::Relaxed),
            dropped_invalid: c.dropped_invalid.load(Ordering::Relaxed),
        }
    }

    /// The port `mac` was learned on, if any.
    pub fn lookup(&self, mac: MacAddress) -> Option<usize> {
        let table = self
            .inner
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        table.get(&mac_key(mac)).map(|l| l.port)
    }
}

impl SwitchInner {
    /// Whether a queue holding `len` packets has room for a sender's whole batch.
    fn has_room(&self, len: usize) -> bool {
        len + self.headroom <= self.config.queue_capacity
    }

    /// Whether some port but `from` receives and none of them has room for a batch: every
    /// queue pair they receive on is (nearly) full. Ports that are down do not count: what is
    /// sent to them is dropped, so waiting for them would only hold the sender up.
    fn no_room(&self, from: usize) -> bool {
        let mut receivers = 0;
        let all_full = self.ports.iter().enumerate().all(|(p, port)| {
            let mask = port.enabled.load(Ordering::SeqCst);
            if p == from || mask == 0 {
                return true;
            }
            receivers += 1;
            port.pairs.iter().enumerate().all(|(i, ingress)| {
                mask & (1 << i) == 0 || !self.has_room(ingress.len.load(Ordering::SeqCst))
            })
        });
        all_full && receivers > 0
    }

    /// Whether pair `pair` of port `from` must wait for room; if so it is woken when room
    /// frees up (it is marked blocked first and then looks again, so that a receiver making
    /// room in between either sees the mark or is seen).
    fn congested(&self, from: usize, pair: usize) -> bool {
        if !self.no_room(from) {
            return false;
        }
        let sender = &self.ports[from].senders[pair];
        if !sender.blocked.swap(true, Ordering::SeqCst) {
            self.blocked.fetch_add(1, Ordering::SeqCst);
        }
        if self.no_room(from) {
            return true;
        }
        if sender.blocked.swap(false, Ordering::SeqCst) {
            self.blocked.fetch_sub(1, Ordering::SeqCst);
        }
        false
    }

    /// Wakes every blocked sender except port `except`'s: there may be room for it now.
    fn wake_blocked(&self, except: usize) {
        if self.blocked.load(Ordering::SeqCst) == 0 {
            return;
        }
        for (p, port) in self.ports.iter().enumerate() {
            if p == except {
                continue;
            }
            for (pair, sender) in port.senders.iter().enumerate() {
                if sender.blocked.swap(false, Ordering::SeqCst) {
                    self.blocked.fetch_sub(1, Ordering::SeqCst);
                    let waker = sender.waker.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Some(Err(e)) = waker.as_ref().map(|w| w.write(1)) {
                        log::error!("switch port {p} queue {pair}: cannot wake the sender: {e}");
                    }
                }
            }
        }
    }

    /// Learns where `batch`'s sources are and queues each frame for its destination port(s);
    /// `out` is scratch space, `spares` receives buffers to reuse.
    fn forward(
        &self,
        from: usize,
        batch: &mut Vec<Vec<u8>>,
        out: &mut Vec<(usize, Vec<u8>)>,
        spares: &mut Vec<Vec<u8>>,
    ) {
        out.clear();
        {
            let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            for packet in batch.drain(..) {
                if packet.len() < HDR_LEN + ETH_HLEN {
                    self.ports[from]
                        .counters
                        .dropped_invalid
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let frame = &packet[HDR_LEN..];
                let src = mac_at(frame, 6);
                if !src.is_multicast() {
                    self.learn(&mut table, src, from, now);
                }
                let dst = mac_at(frame, 0);
                let known = if dst.is_multicast() {
                    None
                } else {
                    table
                        .get(&mac_key(dst))
                        .filter(|l| now.duration_since(l.seen) < self.config.aging)
                        .map(|l| l.port)
                };
                match known {
                    Some(port) if port == from => {
                        self.ports[from]
                            .counters
                            .dropped_invalid
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Some(port) => out.push((port, packet)),
                    None => {
                        // Flooded: a copy for every port up but the last, which gets the
                        // packet itself (no allocation with two ports).
                        let mut last = None;
                        for (p, port) in self.ports.iter().enumerate() {
                            if p == from {
                                continue;
                            }
                            if port.enabled.load(Ordering::Relaxed) == 0 {
                                port.counters.dropped_down.fetch_add(1, Ordering::Relaxed);
                            } else if let Some(previous) = last.replace(p) {
                                out.push((previous, packet.clone()));
                            }
                        }
                        if let Some(p) = last {
                            out.push((p, packet));
                        }
                    }
                }
            }
        }
        // Consecutive frames for the same queue are queued under one lock.
        let mut open: Option<Delivery<'_>> = None;
        for (port, packet) in out.drain(..) {
            let Some(pair) = self.pair_for(port, &packet) else {
                continue;
            };
            if open
                .as_ref()
                .is_some_and(|d| d.port != port || d.pair != pair)
            {
                if let Some(d) = open.take() {
                    d.close(spares);
                }
            }
            let d = open.get_or_insert_with(|| Delivery::open(self, port, pair));
            d.push(packet);
        }
        if let Some(d) = open {
            d.close(spares);
        }
    }

    fn learn(
        &self,
        table: &mut HashMap<u64, Learned, MacHashKey>,
        mac: MacAddress,
        port: usize,
        now: Instant,
    ) {
        let key = mac_key(mac);
        if let Some(entry) = table.get_mut(&key) {
            entry.port = port;
            entry.seen = now;
            return;
        }
        if table.len() >= self.config.table_capacity {
            let aging = self.config.aging;
            table.retain(|_, l| now.duration_since(l.seen) < aging);
            if table.len() >= self.config.table_capacity {
                return;
            }
        }
        table.insert(key, Learned { port, seen: now });
    }

    /// The enabled queue pair of `port` that `packet` goes to, chosen by flow; `None` (the
    /// packet counted as dropped) when the port is down.
    fn pair_for(&self, port: usize, packet: &[u8]) -> Option<usize> {
        let p = &self.ports[port];
        let mask = p.enabled.load(Ordering::Acquire);
        if mask == 0 {
            p.counters.dropped_down.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if mask.is_power_of_two() {
            return Some(mask.trailing_zeros() as usize);
        }
        // The pair from the hash's high half (multiply-shift): FNV-1a's low bits are weak, its
        // lowest one the parity of the input's bytes, so `hash % 2` put every TCP connection
        // of a Linux guest (even ephemeral ports) on one pair.
        let k = ((flow_hash(&packet[HDR_LEN..]) >> 32) * u64::from(mask.count_ones())) >> 32;
        let mut bits = mask;
        for _ in 0..k {
            bits &= bits - 1;
        }
        Some(bits.trailing_zeros() as usize)
    }
}

/// Frames being queued on one ingress queue, under its lock.
struct Delivery<'a> {
    inner: &'a SwitchInner,
    port: usize,
    pair: usize,
    queue: MutexGuard<'a, IngressQueue>,
    delivered: u64,
    dropped: u64,
}

impl<'a> Delivery<'a> {
    fn open(inner: &'a SwitchInner, port: usize, pair: usize) -> Self {
        let queue = inner.ports[port].pairs[pair]
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Delivery {
            inner,
            port,
            pair,
            queue,
            delivered: 0,
            dropped: 0,
        }
    }

    fn push(&mut self, packet: Vec<u8>) {
        if self.queue.packets.len() >= self.inner.config.queue_capacity {
            self.dropped += 1;
            return;
        }
        self.queue.packets.push_back(packet);
        self.delivered += 1;
    }

    /// Publishes the length, signals the receiver if the queue was empty, takes as many spare
    /// buffers as frames were queued, and unlocks.
    fn close(mut self, spares: &mut Vec<Vec<u8>>) {
        let p = &self.inner.ports[self.port];
        let ingress = &p.pairs[self.pair];
        let len = self.queue.packets.len();
        ingress.len.store(len, Ordering::SeqCst);
        if self.delivered > 0 && len as u64 == self.delivered {
            // It was empty: readable from now on (written under the lock, so that a receiver
            // that empties the queue reads it back in order).
            if let Err(e) = ingress.ready.write(1) {
                log::error!(
                    "switch port {} queue {}: cannot signal a packet: {e}",
                    self.port,
                    self.pair
                );
            }
        }
        let want = (self.delivered as usize).min(MAX_SPARES.saturating_sub(spares.len()));
        let available = self.queue.spares.len();
        spares.extend(self.queue.spares.drain(available - want.min(available)..));
        drop(self.queue);
        if self.delivered > 0 {
            p.counters
                .delivered
                .fetch_add(self.delivered, Ordering::Relaxed);
        }
        if self.dropped > 0 {
            p.counters
                .dropped_full
                .fetch_add(self.dropped, Ordering::Relaxed);
        }
    }
}

/// One port of a [`Switch`]: a device's packet backend.
#[derive(Debug)]
pub struct SwitchPort {
    inner: Arc<SwitchInner>,
    index: usize,
}

impl PacketBackend for SwitchPort {
    fn name(&self) -> String {
        format!("switch port {}", self.index)
    }

    fn offloads(&self) -> bool {
        true
    }

    fn into_queues(self: Box<Self>) -> Vec<Box<dyn PacketQueue>> {
        (0..self.inner.ports[self.index].pairs.len())
            .map(|pair| {
                Box::new(SwitchQueue {
                    inner: self.inner.clone(),
                    port: self.index,
                    pair,
                    has_waker: false,
                    out: Vec::new(),
                    spares: Vec::new(),
                }) as Box<dyn PacketQueue>
            })
            .collect()
    }
}

/// One queue pair of a switch port.
#[derive(Debug)]
struct SwitchQueue {
    inner: Arc<SwitchInner>,
    port: usize,
    pair: usize,
    /// A space waker was given: the queue may report congestion.
    has_waker: bool,
    /// Scratch space of [`SwitchInner::forward`].
    out: Vec<(usize, Vec<u8>)>,
    /// Buffers taken back from the queues this one sent to, for [`PacketQueue::reclaim`].
    spares: Vec<Vec<u8>>,
}

impl SwitchQueue {
    fn ingress(&self) -> &Ingress {
        &self.inner.ports[self.port].pairs[self.pair]
    }
}

impl PacketQueue for SwitchQueue {
    fn ready_fd(&self) -> RawFd {
        self.ingress().ready.as_raw_fd()
    }

    fn recv(&mut self, packet: &mut Vec<u8>) -> Result<bool, BackendError> {
        let ingress = self.ingress();
        let mut queue = ingress.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(mut next) = queue.packets.pop_front() else {
            return Ok(false);
        };
        let len = queue.packets.len();
        ingress.len.store(len, Ordering::SeqCst);
        if len == 0 {
            // Not readable again until a packet arrives; a failure means it was not readable.
            let _ = ingress.ready.read();
        }
        std::mem::swap(packet, &mut next);
        // `next` is now the caller's old buffer: back to the senders.
        if next.capacity() > 0 && queue.spares.len() < MAX_SPARES {
            next.clear();
            queue.spares.push(next);
        }
        drop(queue);
        if self.inner.has_room(len) {
            self.inner.wake_blocked(self.port);
        }
        Ok(true)
    }

    fn send(&mut self, batch: &mut Vec<Vec<u8>>) -> usize {
        self.inner
            .forward(self.port, batch, &mut self.out, &mut self.spares);
        0
    }

    fn reclaim(&mut self, spares: &mut Vec<Vec<u8>>) {
        let n = MAX_SPARES
            .saturating_sub(spares.len())
            .min(self.spares.len());
        spares.extend(self.spares.drain(..n));
    }

    fn congested(&mut self) -> bool {
        self.has_waker && self.inner.congested(self.port, self.pair)
    }

    fn set_space_waker(&mut self, waker: EventFd) {
        let sender = &self.inner.ports[self.port].senders[self.pair];
        *sender.waker.lock().unwrap_or_else(PoisonError::into_inner) = Some(waker);
        self.has_waker = true;
    }

    fn set_offloads(&mut self, _guest: Offloads) -> Result<(), BackendError> {
        // The receiving device completes what its driver did not negotiate.
        Ok(())
    }

    fn set_enabled(&mut self, enabled: bool) -> Result<(), BackendError> {
        let port = &self.inner.ports[self.port];
        let bit = 1u64 << self.pair;
        if enabled {
            port.enabled.fetch_or(bit, Ordering::AcqRel);
        } else {
            port.enabled.fetch_and(!bit, Ordering::AcqRel);
            let ingress = self.ingress();
            let mut queue = ingress.queue.lock().unwrap_or_else(PoisonError::into_inner);
            port.counters
                .dropped_down
                .fetch_add(queue.packets.len() as u64, Ordering::Relaxed);
            queue.packets.clear();
            ingress.len.store(0, Ordering::SeqCst);
            let _ = ingress.ready.read();
        }
        // Senders waiting for room: a queue came up, or one went down and was emptied.
        self.inner.wake_blocked(self.port);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(dst: [u8; 6], src: [u8; 6], payload: u8) -> Vec<u8> {
        let mut p = vec![0u8; HDR_LEN];
        p.extend(dst);
        p.extend(src);
        p.extend([0x08, 0x06]);
        p.resize(HDR_LEN + 60, payload);
        p
    }

    const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
    const C: [u8; 6] = [0x52, 0x54, 0, 0, 0, 3];

    fn queues(s: &Switch, port: usize) -> Vec<Box<dyn PacketQueue>> {
        let mut q = Box::new(s.port(port)).into_queues();
        for x in &mut q {
            x.set_enabled(true).unwrap();
        }
        q
    }

    fn received(q: &mut Box<dyn PacketQueue>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut p = Vec::new();
        while q.recv(&mut p).unwrap() {
            out.push(std::mem::take(&mut p));
        }
        out
    }

    #[test]
    fn unknown_destinations_flood_and_learned_ones_do_not() {
        let s = Switch::new(3, 1, SwitchConfig::default()).unwrap();
        let (mut a, mut b, mut c) = (queues(&s, 0), queues(&s, 1), queues(&s, 2));
        a[0].send(&mut vec![packet(B, A, 1)]);
        assert_eq!(received(&mut b[0]).len(), 1);
        assert_eq!(received(&mut c[0]).len(), 1, "unknown destination: flooded");
        assert!(received(&mut a[0]).is_empty(), "never back to the sender");
        assert_eq!(s.lookup(MacAddress(A)), Some(0));
        b[0].send(&mut vec![packet(A, B, 2)]);
        assert_eq!(received(&mut a[0]), [packet(A, B, 2)]);
        assert!(received(&mut c[0]).is_empty(), "A was learned");
        a[0].send(&mut vec![packet(B, A, 3), packet([0xff; 6], A, 4)]);
        assert_eq!(received(&mut b[0]).len(), 2);
        assert_eq!(
            received(&mut c[0]),
            [packet([0xff; 6], A, 4)],
            "broadcast floods"
        );
    }

    #[test]
    fn a_full_queue_drops_without_blocking_the_sender() {
        let config = SwitchConfig {
            queue_capacity: 4,
            ..SwitchConfig::default()
        };
        let s = Switch::new(2, 1, config).unwrap();
        let (mut a, mut b) = (queues(&s, 0), queues(&s, 1));
        let mut batch: Vec<Vec<u8>> = (0..10).map(|i| packet(B, A, i)).collect();
        a[0].send(&mut batch);
        assert!(batch.is_empty());
        assert_eq!(received(&mut b[0]).len(), 4);
        let stats = s.port_stats(1);
        assert_eq!((stats.delivered, stats.dropped_full), (4, 6));
    }

    #[test]
    fn a_sender_waits_only_while_no_other_port_has_room_and_is_woken() {
        let config = SwitchConfig {
            queue_capacity: 2,
            ..SwitchConfig::default()
        };
        let s = Switch::new(3, 1, config).unwrap();
        let (mut a, mut b, mut c) = (queues(&s, 0), queues(&s, 1), queues(&s, 2));
        let waker = EventFd::new(EFD_NONBLOCK).unwrap();
        let woken = || waker.read().is_ok();
        // Fill B and C (broadcasts reach both): without a waker, never congested.
        a[0].send(&mut vec![packet([0xff; 6], A, 1), packet([0xff; 6], A, 2)]);
        assert!(!a[0].congested(), "no waker: no backpressure");
        a[0].set_space_waker(waker.try_clone().unwrap());
        assert!(a[0].congested(), "both full");
        assert!(!woken());
        b[0].set_space_waker(EventFd::new(EFD_NONBLOCK).unwrap());
        assert!(!b[0].congested(), "B can still send to A");
        let mut p = Vec::new();
        assert!(c[0].recv(&mut p).unwrap());
        assert!(woken(), "C made room");
        assert!(!a[0].congested());
        c[0].set_enabled(false).unwrap();
        assert!(a[0].congested(), "B full and C down");
        received(&mut b[0]);
        assert!(woken(), "B made room");
        assert!(!a[0].congested());
        a[0].send(&mut vec![packet(B, A, 3), packet(B, A, 4)]);
        assert!(a[0].congested(), "B full again");
        b[0].set_enabled(false).unwrap();
        assert!(woken(), "B went down");
        assert!(
            !a[0].congested(),
            "nobody receives: frames are dropped, not held"
        );
    }

    #[test]
    fn the_ready_fd_follows_the_queue() {
        let s = Switch::new(2, 1, SwitchConfig::default()).unwrap();
        let (mut a, mut b) = (queues(&s, 0), queues(&s, 1));
        let readable = |q: &dyn PacketQueue| {
            let mut fds = [libc::pollfd {
                fd: q.ready_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: poll reads and writes the one pollfd given, which outlives the call.
            #[allow(unsafe_code)]
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
            n == 1
        };
        assert!(!readable(b[0].as_ref()));
        a[0].send(&mut vec![packet(B, A, 1), packet(B, A, 2)]);
        assert!(readable(b[0].as_ref()));
        let mut p = Vec::new();
        assert!(b[0].recv(&mut p).unwrap());
        assert!(readable(b[0].as_ref()), "one packet left");
        assert!(b[0].recv(&mut p).unwrap());
        assert!(!readable(b[0].as_ref()));
    }

    #[test]
    fn flows_spread_over_enabled_pairs_only() {
        let s = Switch::new(2, 4, SwitchConfig::default()).unwrap();
        let mut a = queues(&s, 0);
        let mut b = queues(&s, 1);
        b[1].set_enabled(false).unwrap();
        b[3].set_enabled(false).unwrap();
        let mut batch = Vec::new();
        for port in 0..64u16 {
            // IPv4/UDP frames with varying source ports.
            let mut p = vec![0u8; HDR_LEN];
            p.extend(B);
            p.extend(A);
            p.extend([
                0x08, 0x00, 0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
            ]);
            p.extend(port.to_be_bytes());
            p.extend([0, 53, 0, 8, 0, 0]);
            batch.push(p);
        }
        a[0].send(&mut batch);
        let counts: Vec<usize> = b.iter_mut().map(|q| received(q).len()).collect();
        assert_eq!(counts.iter().sum::<usize>(), 64);
        assert_eq!((counts[1], counts[3]), (0, 0), "{counts:?}");
        assert!(counts[0] > 0 && counts[2] > 0, "{counts:?}");
        for q in &mut b {
            q.set_enabled(false).unwrap();
        }
        a[0].send(&mut vec![packet(B, A, 1)]);
        assert_eq!(s.port_stats(1).dropped_down, 1);
    }

    #[test]
    fn connections_from_even_ports_spread_over_two_pairs() {
        // Linux gives connect() even ephemeral ports, consecutive ones close together: flows
        // that differ in the low bits of the source port only must still use both pairs.
        let s = Switch::new(2, 2, SwitchConfig::default()).unwrap();
        let mut a = queues(&s, 0);
        let mut b = queues(&s, 1);
        let mut batch = Vec::new();
        for port in (40_000..40_032u16).step_by(2) {
            let mut p = vec![0u8; HDR_LEN];
            p.extend(B);
            p.extend(A);
            p.extend([
                0x08, 0x00, 0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1,
            ]);
            p.extend(port.to_be_bytes());
            p.extend(5003u16.to_be_bytes());
            p.extend([0; 16]);
            batch.push(p);
        }
        a[0].send(&mut batch);
        let counts: Vec<usize> = b.iter_mut().map(|q| received(q).len()).collect();
        assert_eq!(counts.iter().sum::<usize>(), 16);
        assert!(
            counts.iter().all(|&c| c >= 3),
            "16 flows over 2 pairs: {counts:?}"
        );
    }

    #[test]
    fn spent_receive_buffers_go_back_to_the_sender() {
        let s = Switch::new(2, 1, SwitchConfig::default()).unwrap();
        let (mut a, mut b) = (queues(&s, 0), queues(&s, 1));
        a[0].send(&mut vec![packet([0xff; 6], A, 1), packet([0xff; 6], A, 2)]);
        // B hands in a buffer of its own with the first receive, and the first packet's
        // buffer with the second.
        let mut p = Vec::with_capacity(4000);
        assert!(b[0].recv(&mut p).unwrap());
        assert_eq!(p[HDR_LEN + 14], 1);
        assert!(b[0].recv(&mut p).unwrap());
        assert_eq!(p[HDR_LEN + 14], 2);
        let mut spares = Vec::new();
        a[0].reclaim(&mut spares);
        assert!(spares.is_empty(), "nothing sent since: nothing taken back");
        a[0].send(&mut vec![packet(B, A, 3)]);
        a[0].reclaim(&mut spares);
        assert_eq!(spares.len(), 1, "one frame queued, one buffer back");
        a[0].send(&mut vec![packet(B, A, 4)]);
        a[0].reclaim(&mut spares);
        assert_eq!(spares.len(), 2);
        assert!(spares.iter().all(|b| b.is_empty()));
        let mut capacities: Vec<usize> = spares.iter().map(|b| b.capacity()).collect();
        capacities.sort();
        assert!(
            capacities[0] >= HDR_LEN + 60 && capacities[1] >= 4000,
            "the first packet's buffer and B's own: {capacities:?}"
        );
        a[0].send(&mut vec![packet(B, A, 5)]);
        a[0].reclaim(&mut spares);
        assert_eq!(spares.len(), 2, "B has none left");
        let got: Vec<u8> = received(&mut b[0])
            .iter()
            .map(|p| p[HDR_LEN + 14])
            .collect();
        assert_eq!(got, [3, 4, 5]);
    }

    #[test]
    fn the_learning_table_hash_is_keyed_and_spreads_guest_chosen_addresses() {
        let (k1, k2) = (MacHashKey::random(), MacHashKey::random());
        let mac = mac_key(MacAddress(A));
        assert_ne!(k1.hash_one(mac), k2.hash_one(mac), "a key per switch");
        // Addresses that differ in one byte only (a guest picks them) fill 4096 buckets of
        // the low bits about as well as random hashes would (~2590 distinct).
        for key in [k1, k2] {
            let mut seen = std::collections::HashSet::new();
            for i in 0..4096u64 {
                let m = MacAddress([0x52, 0x54, 0, 0, (i >> 8) as u8, i as u8]);
                seen.insert(key.hash_one(mac_key(m)) & 4095);
            }
            assert!(seen.len() > 2400, "{} distinct buckets", seen.len());
        }
    }

    #[test]
    fn the_learning_table_is_bounded() {
        let config = SwitchConfig {
            table_capacity: 2,
            ..SwitchConfig::default()
        };
        let s = Switch::new(2, 1, config).unwrap();
        let mut a = queues(&s, 0);
        let _b = queues(&s, 1);
        for i in 0..5u8 {
            a[0].send(&mut vec![packet(C, [2, 0, 0, 0, 0, i], 0)]);
        }
        assert_eq!(s.lookup(MacAddress([2, 0, 0, 0, 0, 0])), Some(0));
        assert_eq!(s.lookup(MacAddress([2, 0, 0, 0, 0, 4])), None);
    }
}
