//! Owned worker threads that run a device's queues.
//!
//! A [`QueueWorker`] is a thread that owns some of a device's [`ActiveQueue`]s and a
//! [`QueueHandler`] (the device-specific request logic). It waits on the queues' kick eventfds and
//! on the handler's completion fd, takes one guest-memory snapshot per batch of events, and hands
//! the work to the handler. [`QueueWorker::stop`] asks the handler to finish every request in
//! flight and returns the queues; dropping a worker does the same and drops them.
//!
//! With a poll interval the worker busy-polls its queues for that long after the last work it
//! found before it sleeps again, trading a CPU for latency. While it polls, the driver's
//! notifications are suppressed (a kick is a VM exit in a real guest, and the worker is looking
//! anyway); they are turned back on, with a last look at each queue, whenever the worker stops
//! polling. A polling worker leaves its poll loop every [`POLL_SLICE`] to take its events (a
//! stop request) and a fresh memory snapshot, however busy its queues are.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{ActiveQueue, GuestMemoryHandle, GuestMemoryMmap, Interrupt};

/// The longest a worker polls without looking at its events (stop requests) and taking a new
/// memory snapshot, however busy its queues are.
pub const POLL_SLICE: Duration = Duration::from_millis(1);

/// A function every worker thread runs first, before it touches a queue: the program installs
/// its sandbox for the worker role here, so that every device's workers are confined without the
/// device knowing. It returns an error to refuse to run (the worker then reports
/// DEVICE_NEEDS_RESET and serves nothing).
pub type ThreadStartHook = fn() -> Result<(), String>;

static THREAD_START_HOOK: std::sync::OnceLock<ThreadStartHook> = std::sync::OnceLock::new();

/// Sets the hook every worker thread runs at start. It can be set once per process; a second
/// call returns false and changes nothing.
pub fn set_thread_start_hook(hook: ThreadStartHook) -> bool {
    THREAD_START_HOOK.set(hook).is_ok()
}

/// The device-specific half of a worker.
///
/// Guest memory is passed as the snapshot of the current batch. A handler that leaves requests in
/// flight across calls (asynchronous I/O into guest buffers) keeps a clone of the `Arc` with each
/// request, so the mapping outlives a memory-table change until the request completes.
pub trait QueueHandler: Send + 'static {
    /// Queue `queue` may have buffers (after a kick, and once when the worker starts): take and
    /// process them. An error means the queue is unusable (a corrupt ring); the worker stops
    /// serving that queue and reports DEVICE_NEEDS_RESET.
    fn process_queue(
        &mut self,
        queue: &mut ActiveQueue,
        mem: &Arc<GuestMemoryMmap>,
        interrupt: &dyn Interrupt,
    ) -> Result<(), virtio_queue::Error>;

    /// A file descriptor that becomes readable when requests the handler submitted complete
    /// (an io_uring's eventfd), if the handler completes requests asynchronously.
    fn completion_fd(&self) -> Option<RawFd>;

    /// Publishes completed requests. Must not block. Returns whether it completed anything.
    fn process_completions(
        &mut self,
        queues: &mut [ActiveQueue],
        mem: &Arc<GuestMemoryMmap>,
        interrupt: &dyn Interrupt,
    ) -> bool;

    /// Waits for and publishes every request still in flight. Called before the queues are
    /// handed back, so that none is left half done.
    fn drain(
        &mut self,
        queues: &mut [ActiveQueue],
        mem: &Arc<GuestMemoryMmap>,
        interrupt: &dyn Interrupt,
    );

    /// Like [`QueueHandler::drain`], but requests whose work can be cancelled (storage I/O
    /// still in the kernel) are cancelled and dropped unanswered instead of waited for: they
    /// stay in the queues' inflight records, which resubmit them when the queues next start.
    /// Nothing may write guest memory for a dropped request once this returns. Called only when
    /// every queue has an inflight record. The default waits for everything, as `drain` does.
    fn suspend(
        &mut self,
        queues: &mut [ActiveQueue],
        mem: &Arc<GuestMemoryMmap>,
        interrupt: &dyn Interrupt,
    ) {
        self.drain(queues, mem, interrupt);
    }
}

/// What every worker of a device shares.
#[derive(Clone, Debug)]
pub struct WorkerContext {
    /// Guest memory.
    pub memory: GuestMemoryHandle,
    /// The interrupt sink.
    pub interrupt: Arc<dyn Interrupt>,
    /// Busy-poll for this long after the last work found before sleeping (zero: never poll).
    pub poll: Duration,
}

/// Why a poll loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PollEnd {
    /// Nothing turned up for the poll interval: sleep until an event.
    Idle,
    /// The loop polled for a whole [`POLL_SLICE`]: look at the events and poll on, idle since
    /// this time.
    Slice {
        /// When the loop last found work.
        idle_since: Instant,
    },
}

/// Typed epoll tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    Stop,
    Completion,
    Kick(usize),
}

impl Token {
    fn encode(self) -> u64 {
        match self {
            Token::Stop => 0,
            Token::Completion => 1,
            Token::Kick(i) => 2 + i as u64,
        }
    }

    fn decode(v: u64) -> Token {
        match v {
            0 => Token::Stop,
            1 => Token::Completion,
            n => Token::Kick((n - 2) as usize),
        }
    }
}

/// A thread running some of a device's queues.
#[derive(Debug)]
pub struct QueueWorker {
    stop: EventFd,
    /// Set before `stop` is signalled: the worker suspends instead of draining.
    suspend: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<ActiveQueue>>>,
}

impl QueueWorker {
    /// Starts a thread named `name` that serves `queues` with `handler`.
    pub fn spawn<H: QueueHandler>(
        name: String,
        queues: Vec<ActiveQueue>,
        handler: H,
        ctx: WorkerContext,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_rx = stop.try_clone()?;
        let suspend = Arc::new(AtomicBool::new(false));
        let suspend_rx = suspend.clone();
        let epoll = Epoll::new()?;
        let add = |fd: RawFd, token: Token| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token.encode()),
            )
        };
        add(stop_rx.as_raw_fd(), Token::Stop)?;
        if let Some(fd) = handler.completion_fd() {
            add(fd, Token::Completion)?;
        }
        for (i, q) in queues.iter().enumerate() {
            add(q.kick().as_raw_fd(), Token::Kick(i))?;
        }
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            if let Some(hook) = THREAD_START_HOOK.get() {
                if let Err(e) = hook() {
                    log::error!("queue worker refuses to start: {e}");
                    ctx.interrupt.signal_needs_reset();
                    return queues;
                }
            }
            let mut w = WorkerLoop {
                epoll,
                _stop: stop_rx,
                suspend: suspend_rx,
                queues,
                broken: Vec::new(),
                handler,
                ctx,
            };
            w.run();
            w.finish()
        })?;
        Ok(QueueWorker {
            stop,
            suspend,
            thread: Some(thread),
        })
    }

    /// Stops the thread after it has completed every request in flight, and returns its queues.
    pub fn stop(mut self) -> Vec<ActiveQueue> {
        self.stop_inner()
    }

    /// Stops the thread without waiting for work that can be cancelled (see
    /// [`QueueHandler::suspend`]), and returns its queues. Only for queues with inflight records.
    pub fn suspend(mut self) -> Vec<ActiveQueue> {
        self.suspend.store(true, Ordering::SeqCst);
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Vec<ActiveQueue> {
        let Some(thread) = self.thread.take() else {
            return Vec::new();
        };
        if let Err(e) = self.stop.write(1) {
            log::error!("cannot signal a queue worker to stop: {e}");
        }
        match thread.join() {
            Ok(queues) => queues,
            Err(_) => {
                log::error!("a queue worker panicked; its queues are lost");
                Vec::new()
            }
        }
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

struct WorkerLoop<H> {
    epoll: Epoll,
    _stop: EventFd,
    suspend: Arc<AtomicBool>,
    queues: Vec<ActiveQueue>,
    broken: Vec<bool>,
    handler: H,
    ctx: WorkerContext,
}

impl<H: QueueHandler> WorkerLoop<H> {
    fn run(&mut self) {
        self.broken = vec![false; self.queues.len()];
        // A frontend need not kick a queue it starts with buffers in it: look once.
        let mem = self.ctx.memory.memory().into_inner();
        for i in 0..self.queues.len() {
            self.process(i, &mem);
        }
        drop(mem);
        let mut events = vec![EpollEvent::default(); self.queues.len() + 2];
        // Set while polling goes on across slices: when the worker last found work.
        let mut polling: Option<Instant> = None;
        loop {
            // Sleep until an event, or only look when polling goes on.
            let timeout = if polling.is_some() { 0 } else { -1 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("queue worker: epoll_wait failed: {e}");
                    self.ctx.interrupt.signal_needs_reset();
                    return;
                }
            };
            let mem = self.ctx.memory.memory().into_inner();
            for ev in &events[..n] {
                match Token::decode(ev.data()) {
                    Token::Stop => return,
                    Token::Completion => {
                        self.handler.process_completions(
                            &mut self.queues,
                            &mem,
                            self.ctx.interrupt.as_ref(),
                        );
                    }
                    Token::Kick(i) => {
                        // Reading resets the counter; a failure only means no kick was pending.
                        let _ = self.queues[i].kick().read();
                        self.process(i, &mem);
                    }
                }
            }
            if n > 0 {
                polling = None;
            }
            if !self.ctx.poll.is_zero() {
                let idle_since = polling.unwrap_or_else(Instant::now);
                polling = match self.poll(&mem, idle_since) {
                    PollEnd::Idle => None,
                    PollEnd::Slice { idle_since } => Some(idle_since),
                };
            }
        }
    }

    /// Busy-polls every queue and the completions until nothing has turned up for `ctx.poll`
    /// since `idle_since`, or for at most [`POLL_SLICE`].
    ///
    /// The driver's notifications stay parked while the worker polls (see
    /// [`park_notifications`]) and are turned back on before it returns, with a last look at
    /// each queue. When the handler completes requests asynchronously, an idle round yields the
    /// CPU instead of spinning: the kernel threads that carry out its I/O (io_uring's io-wq
    /// workers, which inherit this thread's CPU affinity) may be waiting for this very CPU.
    /// A handler that completes everything inline has nobody to yield to, and spins.
    fn poll(&mut self, mem: &Arc<GuestMemoryMmap>, mut idle_since: Instant) -> PollEnd {
        let yield_when_idle = self.handler.completion_fd().is_some();
        // The snapshot can change while the worker polls (a region added or removed): every
        // request is parsed in a snapshot taken after the request was seen, so that memory the
        // frontend was told is mapped (the reply to ADD_MEM_REG) is there for it.
        let mut mem = mem.clone();
        let mem = &mut mem;
        for i in 0..self.queues.len() {
            self.park(i, mem);
        }
        let started = Instant::now();
        let end = loop {
            let mut found = self.handler.process_completions(
                &mut self.queues,
                mem,
                self.ctx.interrupt.as_ref(),
            );
            for i in 0..self.queues.len() {
                if !self.broken[i] && self.queues[i].has_available(mem).unwrap_or(false) {
                    self.refresh(mem);
                    self.process(i, mem);
                    // Processing turned notifications back on.
                    self.park(i, mem);
                    found = true;
                }
            }
            let now = Instant::now();
            if found {
                idle_since = now;
            } else if now - idle_since >= self.ctx.poll {
                break PollEnd::Idle;
            }
            if now - started >= POLL_SLICE {
                break PollEnd::Slice { idle_since };
            }
            if !found {
                if yield_when_idle {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        };
        for i in 0..self.queues.len() {
            if self.broken[i] {
                continue;
            }
            // Buffers made available while notifications were parked came without a kick.
            match self.queues[i].queue_mut().enable_notification(mem.as_ref()) {
                Ok(false) => {}
                Ok(true) => {
                    self.refresh(mem);
                    self.process(i, mem)
                }
                Err(e) => self.fail(i, &e),
            }
        }
        end
    }

    /// Replaces `mem` with the current snapshot if the memory table changed since it was taken.
    fn refresh(&self, mem: &mut Arc<GuestMemoryMmap>) {
        let current = self.ctx.memory.memory();
        if !std::ptr::eq(&*current, Arc::as_ptr(mem)) {
            *mem = current.into_inner();
        }
    }

    /// Parks the driver's notifications of queue `i` while the worker polls it.
    fn park(&mut self, i: usize, mem: &Arc<GuestMemoryMmap>) {
        if self.broken[i] {
            return;
        }
        if let Err(e) = park_notifications(&mut self.queues[i], mem) {
            self.fail(i, &e);
        }
    }

    /// Stops serving queue `i` after a ring error and asks for a reset.
    fn fail(&mut self, i: usize, e: &virtio_queue::Error) {
        log::error!(
            "queue {}: {e}; the queue is stopped until reset",
            self.queues[i].index()
        );
        self.broken[i] = true;
        self.ctx.interrupt.signal_needs_reset();
    }

    fn process(&mut self, i: usize, mem: &Arc<GuestMemoryMmap>) {
        if self.broken[i] {
            return;
        }
        let q = &mut self.queues[i];
        if let Err(e) = self
            .handler
            .process_queue(q, mem, self.ctx.interrupt.as_ref())
        {
            self.fail(i, &e);
        }
    }

    fn finish(mut self) -> Vec<ActiveQueue> {
        let mem = self.ctx.memory.memory().into_inner();
        // A request dropped from a queue without a record would never be answered.
        let recorded = self.queues.iter().all(ActiveQueue::has_inflight);
        if self.suspend.load(Ordering::SeqCst) && recorded {
            self.handler
                .suspend(&mut self.queues, &mem, self.ctx.interrupt.as_ref());
        } else {
            self.handler
                .drain(&mut self.queues, &mem, self.ctx.interrupt.as_ref());
        }
        self.queues
    }
}

/// Asks the driver not to notify about queue `queue` until notifications are enabled again
/// (`enable_notification`, which also reports buffers that arrived meanwhile). Notifications
/// are hints: a driver that races with this and notifies anyway costs one spurious wake-up.
///
/// Without `VIRTIO_RING_F_EVENT_IDX` this is the `VRING_USED_F_NO_NOTIFY` flag. With it,
/// `virtio_queue`'s `disable_notification` does nothing and leaves `avail_event` where the last
/// `enable_notification` put it, at `next_avail`, so the driver's next buffer still notifies.
/// Parking `avail_event` one behind `next_avail`, at an index the driver has already passed,
/// keeps it quiet.
// TODO: this writes the used ring beside `virtio_queue`; it belongs on `ActiveQueue`, whose
// `take_available` could then leave notifications parked instead of turning them on for each
// batch (the worker re-parks them after every batch, which leaves a short window).
fn park_notifications(
    queue: &mut ActiveQueue,
    mem: &GuestMemoryMmap,
) -> Result<(), virtio_queue::Error> {
    let q = queue.queue_mut();
    if !q.event_idx_enabled() {
        return q.disable_notification(mem);
    }
    // The used ring: flags (2 bytes), idx (2), `size` elements of 8, then avail_event (2).
    let offset = 4 + 8 * u64::from(q.size());
    let addr = q
        .used_ring()
        .checked_add(offset)
        .ok_or(virtio_queue::Error::AddressOverflow)?;
    let parked = q.next_avail().wrapping_sub(1);
    mem.store(parked.to_le(), GuestAddress(addr), Ordering::Relaxed)
        .map_err(virtio_queue::Error::GuestMemory)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    use vm_memory::GuestMemoryAtomic;

    use super::*;
    use crate::queue::QueueConfig;

    const SIZE: u16 = 16;
    const DESC: u64 = 0x0;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;
    const BUFS: u64 = 0x10000;
    const VRING_DESC_F_WRITE: u16 = 2;
    const VRING_USED_F_NO_NOTIFY: u16 = 1;

    /// The driver side of one split queue whose every descriptor is a one-buffer chain.
    struct Driver {
        mem: GuestMemoryMmap,
        kick: EventFd,
        avail_idx: u16,
    }

    impl Driver {
        fn new(mem: &GuestMemoryMmap, kick: &EventFd) -> Driver {
            for i in 0..u64::from(SIZE) {
                let desc = GuestAddress(DESC + 16 * i);
                mem.write_obj((BUFS + 512 * i).to_le(), desc).unwrap();
                mem.write_obj(512u32.to_le(), GuestAddress(desc.0 + 8))
                    .unwrap();
                mem.write_obj(VRING_DESC_F_WRITE.to_le(), GuestAddress(desc.0 + 12))
                    .unwrap();
            }
            Driver {
                mem: mem.clone(),
                kick: kick.try_clone().unwrap(),
                avail_idx: 0,
            }
        }

        fn load(&self, addr: u64) -> u16 {
            u16::from_le(
                self.mem
                    .load(GuestAddress(addr), Ordering::Acquire)
                    .unwrap(),
            )
        }

        /// Makes the next descriptor available, without notifying.
        fn offer(&mut self) {
            let slot = self.avail_idx % SIZE;
            self.mem
                .write_obj(slot.to_le(), GuestAddress(AVAIL + 4 + 2 * u64::from(slot)))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.mem
                .store(
                    self.avail_idx.to_le(),
                    GuestAddress(AVAIL + 2),
                    Ordering::Release,
                )
                .unwrap();
        }

        fn notify(&self) {
            self.kick.write(1).unwrap();
        }

        /// Makes the next descriptor available and notifies if the device asked for it
        /// (EVENT_IDX: `avail_event` is the index just passed), as a driver must.
        fn offer_and_notify_if_asked(&mut self) {
            let old = self.avail_idx;
            self.offer();
            std::sync::atomic::fence(Ordering::SeqCst);
            if self.avail_event() == old {
                self.notify();
            }
        }

        fn used_idx(&self) -> u16 {
            self.load(USED + 2)
        }

        fn used_flags(&self) -> u16 {
            self.load(USED)
        }

        fn avail_event(&self) -> u16 {
            self.load(USED + 4 + 8 * u64::from(SIZE))
        }
    }

    /// Completes every chain at once, publishing after `take_available` as devices do.
    #[derive(Debug, Default)]
    struct Completer {
        heads: Vec<u16>,
    }

    impl QueueHandler for Completer {
        fn process_queue(
            &mut self,
            queue: &mut ActiveQueue,
            mem: &Arc<GuestMemoryMmap>,
            interrupt: &dyn Interrupt,
        ) -> Result<(), virtio_queue::Error> {
            queue.take_available(mem, |_, chain| self.heads.push(chain.head_index()))?;
            for head in self.heads.drain(..) {
                queue.add_used(mem, head, 0)?;
            }
            queue.notify(mem, interrupt);
            Ok(())
        }

        fn completion_fd(&self) -> Option<RawFd> {
            None
        }

        fn process_completions(
            &mut self,
            _: &mut [ActiveQueue],
            _: &Arc<GuestMemoryMmap>,
            _: &dyn Interrupt,
        ) -> bool {
            false
        }

        fn drain(&mut self, _: &mut [ActiveQueue], _: &Arc<GuestMemoryMmap>, _: &dyn Interrupt) {}
    }

    #[derive(Debug, Default)]
    struct Resets(AtomicUsize);

    impl Interrupt for Resets {
        fn signal_queue(&self, _: u16) {}
        fn signal_config(&self) {}
        fn signal_needs_reset(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A worker polling one queue for `poll`, and the queue's driver.
    fn start(event_idx: bool, poll: Duration) -> (QueueWorker, Driver, Arc<Resets>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let config = QueueConfig {
            max_size: SIZE,
            size: SIZE,
            desc_table: DESC,
            avail_ring: AVAIL,
            used_ring: USED,
            next_avail: 0,
        };
        let queue = config.build(&mem, event_idx).unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let driver = Driver::new(&mem, &kick);
        let resets = Arc::new(Resets::default());
        let ctx = WorkerContext {
            memory: GuestMemoryAtomic::new(mem),
            interrupt: resets.clone(),
            poll,
        };
        let worker = QueueWorker::spawn(
            "test-worker".into(),
            vec![ActiveQueue::new(0, queue, kick)],
            Completer::default(),
            ctx,
        )
        .unwrap();
        (worker, driver, resets)
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn polling_parks_notifications_and_turns_them_back_on(event_idx: bool) {
        let poll = Duration::from_millis(500);
        let (worker, mut d, resets) = start(event_idx, poll);
        for _ in 0..3 {
            d.offer();
        }
        d.notify();
        wait_until("the kicked buffers are used", || d.used_idx() == 3);
        // Published after take_available turned notifications on: parked now means the
        // poll loop parked them.
        if event_idx {
            // Enabled would be next_avail (3); parked is one behind.
            wait_until("avail_event is parked", || d.avail_event() == 2);
        } else {
            wait_until("NO_NOTIFY is set", || {
                d.used_flags() & VRING_USED_F_NO_NOTIFY != 0
            });
        }
        // While polling, the worker serves buffers nobody notified it about.
        d.offer();
        wait_until("an unannounced buffer is used", || d.used_idx() == 4);
        // Idle for the poll interval, it turns notifications back on and sleeps...
        std::thread::sleep(3 * poll);
        if event_idx {
            assert_eq!(d.avail_event(), 4, "avail_event back at next_avail");
        } else {
            assert_eq!(d.used_flags(), 0, "NO_NOTIFY cleared");
        }
        // ... so a buffer now waits for its notification.
        d.offer();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            d.used_idx(),
            4,
            "served without a notification while asleep"
        );
        d.notify();
        wait_until("the notified buffer is used", || d.used_idx() == 5);
        assert_eq!(worker.stop().len(), 1);
        assert_eq!(resets.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn polling_parks_avail_event_and_turns_it_back_on() {
        polling_parks_notifications_and_turns_them_back_on(true);
    }

    #[test]
    fn polling_sets_no_notify_and_clears_it() {
        polling_parks_notifications_and_turns_them_back_on(false);
    }

    #[test]
    fn stop_returns_while_the_driver_keeps_a_polled_queue_busy() {
        // Polling for long after the last buffer, so that only leaving the poll loop while
        // busy, not a pause of the driver thread, lets the worker see the stop request soon.
        let (worker, mut d, resets) = start(true, Duration::from_secs(10));
        let done = AtomicBool::new(false);
        let used = AtomicUsize::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                // Keep the ring full for up to 10 s.
                let give_up = Instant::now() + Duration::from_secs(10);
                d.offer();
                d.notify();
                while !done.load(Ordering::SeqCst) && Instant::now() < give_up {
                    let used_idx = d.used_idx();
                    used.store(usize::from(used_idx), Ordering::SeqCst);
                    if d.avail_idx.wrapping_sub(used_idx) < SIZE {
                        d.offer_and_notify_if_asked();
                    } else {
                        std::hint::spin_loop();
                    }
                }
            });
            wait_until("the load runs", || used.load(Ordering::SeqCst) > 1000);
            let asked = Instant::now();
            let queues = worker.stop();
            let took = asked.elapsed();
            done.store(true, Ordering::SeqCst);
            assert_eq!(queues.len(), 1);
            assert!(
                took < Duration::from_secs(2),
                "stop took {took:?} while the queue was busy"
            );
        });
        assert_eq!(resets.0.load(Ordering::SeqCst), 0);
    }
}
