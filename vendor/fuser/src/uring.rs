//! FUSE over io_uring (kmsfs patch; Linux 6.14+ with `fuse.enable_uring=1`).
//!
//! The kernel keeps one request queue per possible CPU and hands a request
//! to the queue of the CPU its caller runs on. Each queue here is served by
//! `n_threads` threads pinned to that CPU, so a request and its reply stay
//! on the caller's CPU instead of waking a reader thread elsewhere (see
//! docs.kernel.org/filesystems/fuse-io-uring.html).
//!
//! Each thread has a ring of its own with a single entry registered: the
//! kernel gives a request only to an entry that is waiting, so a thread
//! held in a request (a write paused by a snapshot's freeze) takes no more
//! requests, and its queue's other threads serve the next ones, as the
//! `/dev/fuse` workers do. With several entries per thread, requests would
//! wait behind a held one on the same thread.
//!
//! Each ring entry owns a header buffer (`struct fuse_uring_req_header`) and
//! a payload buffer. The kernel writes a request's `fuse_in_header` and
//! per-op header into the header buffer and the rest (write data, names)
//! into the payload; the reply goes back the same way. The payload buffer
//! has room in front of it so the two headers can be copied there and the
//! whole request parsed as one contiguous slice, as `/dev/fuse` delivers it,
//! without copying the payload.
//!
//! `FORGET`, `INTERRUPT` and notifications still travel over `/dev/fuse`,
//! and so does every request until all queues have registered.

use std::io;
use std::io::IoSlice;
use std::mem::size_of;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::os::fd::FromRawFd;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::error;
use log::warn;
use parking_lot::Condvar;
use parking_lot::Mutex;

use crate::Filesystem;
use crate::ReplyEmpty;
use crate::channel::Channel;
use crate::ll::Operation;
use crate::ll::fuse_abi as abi;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

/// `FUSE_URING_IN_OUT_HEADER_SZ`: room for `fuse_in_header` / `fuse_out_header`.
const IN_OUT_SZ: usize = 128;
/// `FUSE_URING_OP_IN_OUT_SZ`: room for the per-op header.
const OP_IN_SZ: usize = 128;
/// `FUSE_IO_URING_CMD_REGISTER`
const CMD_REGISTER: u32 = 1;
/// `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// `FUSE_URING_IOV_SEGS`: header and payload.
const IOV_SEGS: u32 = 2;
const IN_HEADER_SZ: usize = size_of::<abi::fuse_in_header>();
const OUT_HEADER_SZ: usize = size_of::<abi::fuse_out_header>();
/// Room in front of the payload for the in header and the per-op header.
const PREFIX: usize = (IN_HEADER_SZ + OP_IN_SZ).next_multiple_of(8);
/// Entries per thread (see the module comment for why one).
const QUEUE_DEPTH: usize = 1;
/// `user_data` of the poll on the stop eventfd.
const STOP_TOKEN: u64 = u64::MAX;

static URING_REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Requests answered over io_uring by this process, all sessions together.
pub fn uring_requests() -> u64 {
    URING_REQUESTS.load(Ordering::Relaxed)
}

/// `struct fuse_uring_req_header` (include/uapi/linux/fuse.h).
#[repr(C, align(8))]
#[allow(dead_code)] // flags, padding and reserved are the kernel's
struct ReqHeader {
    in_out: [u8; IN_OUT_SZ],
    op_in: [u8; OP_IN_SZ],
    // struct fuse_uring_ent_in_out
    flags: u64,
    commit_id: u64,
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

/// What the session negotiated for the ring.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UringParams {
    /// Payload buffer size the kernel requires: at least
    /// max(8 KiB, max_write, max_pages * page size).
    pub(crate) payload_size: usize,
}

/// Number of queues the kernel expects: one per possible CPU.
pub(crate) fn queue_count() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut highest = None;
    for part in text.trim().split(',') {
        let last = part.rsplit('-').next().unwrap_or(part);
        let n: usize = last
            .parse()
            .map_err(|_| io::Error::other(format!("cannot parse possible CPUs {text:?}")))?;
        highest = highest.max(Some(n));
    }
    highest
        .map(|n| n + 1)
        .ok_or_else(|| io::Error::other("no possible CPUs"))
}

/// One ring entry's buffers. They are shared with the kernel, which writes
/// them only between our registering (or committing) the entry and the
/// completion that hands it back, so they are reached through raw pointers.
struct RingEntry {
    header: *mut ReqHeader,
    /// `PREFIX` bytes of room, then the payload buffer; 8-byte aligned.
    buf: *mut u64,
    words: usize,
    iov: Box<[libc::iovec; 2]>,
    commit_id: u64,
    last_cmd: u32,
}

impl RingEntry {
    fn new(payload_size: usize) -> RingEntry {
        let header = Box::into_raw(Box::new(ReqHeader {
            in_out: [0; IN_OUT_SZ],
            op_in: [0; OP_IN_SZ],
            flags: 0,
            commit_id: 0,
            payload_sz: 0,
            padding: 0,
            reserved: 0,
        }));
        let words = (PREFIX + payload_size).div_ceil(8);
        let buf = Box::into_raw(vec![0u64; words].into_boxed_slice()).cast::<u64>();
        // SAFETY: `buf` points at `words` u64s, more than PREFIX bytes.
        let payload = unsafe { buf.cast::<u8>().add(PREFIX) };
        let iov = Box::new([
            libc::iovec {
                iov_base: header.cast(),
                iov_len: size_of::<ReqHeader>(),
            },
            libc::iovec {
                iov_base: payload.cast(),
                iov_len: payload_size,
            },
        ]);
        RingEntry {
            header,
            buf,
            words,
            iov,
            commit_id: 0,
            last_cmd: CMD_REGISTER,
        }
    }

    fn payload(&self) -> *mut u8 {
        // SAFETY: see `new`.
        unsafe { self.buf.cast::<u8>().add(PREFIX) }
    }

    fn payload_cap(&self) -> usize {
        self.iov[1].iov_len
    }

    fn sqe(&self, fd: types::Fd, qid: u16, index: usize) -> squeue::Entry128 {
        // struct fuse_uring_cmd_req in the SQE's 80-byte command area.
        let mut cmd = [0u8; 80];
        let commit_id = if self.last_cmd == CMD_REGISTER {
            0
        } else {
            self.commit_id
        };
        cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
        let mut op = opcode::UringCmd80::new(fd, self.last_cmd).cmd(cmd);
        if self.last_cmd == CMD_REGISTER {
            op = op.addr(Some(self.iov.as_ptr() as u64));
        }
        let sqe = op.build().user_data(index as u64);
        if self.last_cmd == CMD_REGISTER {
            with_len(sqe, IOV_SEGS)
        } else {
            sqe
        }
    }
}

impl Drop for RingEntry {
    fn drop(&mut self) {
        // SAFETY: both were made by Box::into_raw in `new` with these sizes,
        // and the ring that lent them to the kernel is gone (see `run_queue`).
        unsafe {
            drop(Box::from_raw(self.header));
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.buf, self.words,
            )));
        }
    }
}

/// Sets the SQE's `len` field, which the io-uring crate's `UringCmd80`
/// leaves at 0 but `FUSE_IO_URING_CMD_REGISTER` needs as the iovec count.
fn with_len(sqe: squeue::Entry128, len: u32) -> squeue::Entry128 {
    const _: () = assert!(size_of::<squeue::Entry128>() == 128);
    // SAFETY: Entry128 is repr(C): a repr(C) io_uring_sqe (64 bytes) then
    // 64 command bytes; `len` is the u32 at byte 24 of io_uring_sqe
    // (include/uapi/linux/io_uring.h). Every bit pattern is a valid value.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

/// Where one request's reply goes: straight into the ring entry's buffers,
/// or, when the request itself lies in the payload buffer, into a staging
/// vector copied over once the request is no longer borrowed.
#[derive(Debug)]
pub(crate) struct ReplySlot {
    state: Mutex<SlotState>,
    done: Condvar,
}

struct SlotState {
    out_header: *mut u8,
    payload: *mut u8,
    cap: usize,
    /// The request's id, for an error reply made here.
    unique: u64,
    direct: bool,
    staged: Vec<u8>,
    /// Payload length of the reply, once sent.
    sent: Option<usize>,
    /// Set when the entry went back to the kernel: the pointers are stale.
    closed: bool,
}

/// Says where the reply stands, never what it holds: a reply carries file
/// contents and names in plaintext.
impl std::fmt::Debug for SlotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotState")
            .field("unique", &self.unique)
            .field("direct", &self.direct)
            .field("sent", &self.sent)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

// SAFETY: the raw pointers name the ring entry's buffers, which outlive the
// slot's open period; they are only written while `closed` is false, under
// the mutex, and the queue thread waits for the reply before reusing them.
unsafe impl Send for SlotState {}

impl ReplySlot {
    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        let mut st = self.state.lock();
        if st.closed || st.sent.is_some() {
            return Err(io::Error::other("io_uring reply sent twice or too late"));
        }
        let total: usize = data.iter().map(|d| d.len()).sum();
        let mut header = [0u8; OUT_HEADER_SZ];
        let mut at = 0;
        for d in data {
            let take = (OUT_HEADER_SZ - at).min(d.len());
            header[at..at + take].copy_from_slice(&d[..take]);
            at += take;
            if at == OUT_HEADER_SZ {
                break;
            }
        }
        let len = total.saturating_sub(OUT_HEADER_SZ);
        let fits = total >= OUT_HEADER_SZ && len <= st.cap;
        if !fits {
            // The kernel sized the buffer for the largest reply it accepts;
            // anything else is a bug, and the caller gets EIO, not a hang.
            error!(
                "io_uring reply of {total} bytes does not fit a {} byte buffer",
                st.cap
            );
            header = error_header(st.unique, libc::EIO);
        }
        // SAFETY: `out_header` points at the entry's 128-byte in_out area,
        // which no one else reads or writes until the entry is committed.
        unsafe { std::ptr::copy_nonoverlapping(header.as_ptr(), st.out_header, OUT_HEADER_SZ) };
        let mut written = 0;
        let mut skip = OUT_HEADER_SZ;
        for d in data.iter().filter(|_| fits) {
            let from = skip.min(d.len());
            skip -= from;
            let part = &d[from..];
            if st.direct {
                // SAFETY: `written + part.len() <= len <= cap`, and the
                // request did not borrow the payload buffer (`direct`).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        part.as_ptr(),
                        st.payload.add(written),
                        part.len(),
                    )
                };
            } else {
                st.staged.extend_from_slice(part);
            }
            written += part.len();
        }
        st.sent = Some(written);
        self.done.notify_all();
        Ok(())
    }

    /// Waits for the reply (a filesystem may answer from another thread),
    /// moves a staged reply into the payload buffer, and returns its length.
    fn finish(&self) -> usize {
        let mut st = self.state.lock();
        while st.sent.is_none() {
            self.done.wait(&mut st);
        }
        let len = st.sent.unwrap_or(0);
        if !st.direct && !st.staged.is_empty() {
            // SAFETY: `staged.len() == len <= cap`, and the request that
            // borrowed the payload buffer has been dropped.
            unsafe {
                std::ptr::copy_nonoverlapping(st.staged.as_ptr(), st.payload, st.staged.len())
            };
        }
        st.closed = true;
        len
    }
}

/// Wakes every queue thread once the session is over: /dev/fuse is closed
/// by then, while the kernel may take a while to end the ring entries.
#[derive(Debug)]
pub(crate) struct StopSignal(OwnedFd);

impl StopSignal {
    pub(crate) fn new() -> io::Result<StopSignal> {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(StopSignal(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes the eventfd readable for good: every poll on it completes.
    pub(crate) fn stop(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

/// Serves requests of queue `qid` on this thread's own ring until the
/// connection ends or `stop` fires.
pub(crate) fn run_queue<FS: Filesystem>(
    qid: u16,
    params: UringParams,
    ch: Channel,
    se: SessionEventLoop<FS>,
    stop: Arc<StopSignal>,
) -> io::Result<()> {
    pin_to_cpu(usize::from(qid));
    // Declared before the ring so that they are dropped after it: closing
    // the ring ends the kernel's use of their buffers.
    let mut entries: Vec<RingEntry> = (0..QUEUE_DEPTH)
        .map(|_| RingEntry::new(params.payload_size))
        .collect();
    let mut ring: IoUring<squeue::Entry128, cqueue::Entry> = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .build(QUEUE_DEPTH as u32 + 1)?;
    let fd = types::Fd(ch.as_fd().as_raw_fd());
    for (i, e) in entries.iter().enumerate() {
        let sqe = e.sqe(fd, qid, i);
        // SAFETY: the iovecs and the buffers they name live in `entries`,
        // which outlives the ring.
        unsafe { ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
    }
    let poll = opcode::PollAdd::new(types::Fd(stop.0.as_raw_fd()), libc::POLLIN as u32)
        .build()
        .user_data(STOP_TOKEN);
    // SAFETY: the poll names only the eventfd, which `stop` keeps open.
    unsafe { ring.submission().push(&poll.into()) }
        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
    let sender = ch.sender();
    let mut live = entries.len();
    let mut done: Vec<(usize, i32)> = Vec::with_capacity(QUEUE_DEPTH);
    let mut scratch: Vec<u64> = Vec::new();
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
            Err(e) => return Err(e),
        }
        done.clear();
        done.extend(
            ring.completion()
                .map(|c| (c.user_data() as usize, c.result())),
        );
        for &(i, res) in &done {
            if i as u64 == STOP_TOKEN {
                debug!("fuse io_uring queue {qid}: session over");
                return Ok(());
            }
            let Some(entry) = entries.get_mut(i) else {
                error!("io_uring completion for unknown entry {i}");
                continue;
            };
            if res < 0 {
                if matches!(-res, libc::EINTR | libc::EAGAIN) {
                    let sqe = entry.sqe(fd, qid, i);
                    // SAFETY: as for registration.
                    unsafe { ring.submission().push(&sqe) }
                        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                    continue;
                }
                if -res != libc::ENOTCONN {
                    warn!(
                        "fuse io_uring queue {qid}: entry {i} ended: {}",
                        io::Error::from_raw_os_error(-res)
                    );
                }
                live -= 1;
                if live == 0 {
                    debug!("fuse io_uring queue {qid} done");
                    return Ok(());
                }
                continue;
            }
            handle(entry, &se, &sender, &mut scratch);
            URING_REQUESTS.fetch_add(1, Ordering::Relaxed);
            let sqe = entry.sqe(fd, qid, i);
            // SAFETY: as for registration.
            unsafe { ring.submission().push(&sqe) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
    }
}

/// Dispatches the request an entry holds and leaves the reply in it.
fn handle<FS: Filesystem>(
    entry: &mut RingEntry,
    se: &SessionEventLoop<FS>,
    sender: &crate::channel::ChannelSender,
    scratch: &mut Vec<u64>,
) {
    let hp = entry.header;
    // SAFETY: the kernel filled the header before posting the completion
    // and leaves it alone until we commit; fields are copied out, and no
    // reference into it outlives this block.
    let (in_header, op_in, commit_id, payload_sz) = unsafe {
        let in_out: [u8; IN_OUT_SZ] = std::ptr::read(std::ptr::addr_of!((*hp).in_out));
        let mut in_header = [0u8; IN_HEADER_SZ];
        in_header.copy_from_slice(&in_out[..IN_HEADER_SZ]);
        let op_in: [u8; OP_IN_SZ] = std::ptr::read(std::ptr::addr_of!((*hp).op_in));
        (in_header, op_in, (*hp).commit_id, (*hp).payload_sz as usize)
    };
    entry.commit_id = commit_id;
    entry.last_cmd = CMD_COMMIT_AND_FETCH;
    let total =
        u32::from_ne_bytes([in_header[0], in_header[1], in_header[2], in_header[3]]) as usize;
    let unique = u64::from_ne_bytes(in_header[8..16].try_into().unwrap_or([0; 8]));
    let slot = Arc::new(ReplySlot {
        state: Mutex::new(SlotState {
            // SAFETY: in_out is the first field of the header buffer.
            out_header: unsafe { std::ptr::addr_of_mut!((*hp).in_out) }.cast(),
            payload: entry.payload(),
            cap: entry.payload_cap(),
            unique,
            direct: payload_sz == 0,
            staged: Vec::new(),
            sent: None,
            closed: false,
        }),
        done: Condvar::new(),
    });
    let op_sz = total
        .checked_sub(IN_HEADER_SZ + payload_sz)
        .filter(|&n| n <= OP_IN_SZ && payload_sz <= entry.payload_cap());
    match op_sz {
        Some(op_sz) => {
            let start = PREFIX - IN_HEADER_SZ - op_sz;
            let base = entry.buf.cast::<u8>();
            // SAFETY: `start..PREFIX` lies in the room before the payload;
            // the payload's first `payload_sz` bytes were written by the
            // kernel. Nothing else touches the buffer until the commit.
            let data: &[u8] = unsafe {
                std::ptr::copy_nonoverlapping(in_header.as_ptr(), base.add(start), IN_HEADER_SZ);
                std::ptr::copy_nonoverlapping(
                    op_in.as_ptr(),
                    base.add(start + IN_HEADER_SZ),
                    op_sz,
                );
                std::slice::from_raw_parts(base.add(start), PREFIX - start + payload_sz)
            };
            let data: &[u8] = if start % 8 == 0 {
                data
            } else {
                // Request parsing needs 8-byte alignment; every per-op
                // header is a multiple of 8 bytes, so this is a fallback.
                scratch.clear();
                scratch.resize(data.len().div_ceil(8), 0);
                // SAFETY: `scratch` holds at least `data.len()` bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        data.as_ptr(),
                        scratch.as_mut_ptr().cast::<u8>(),
                        data.len(),
                    );
                    std::slice::from_raw_parts(scratch.as_ptr().cast::<u8>(), data.len())
                }
            };
            match RequestWithSender::new_uring(sender.clone(), slot.clone(), data) {
                // DESTROY is answered here, as the /dev/fuse loop does.
                Some(req) if matches!(req.request.operation(), Ok(Operation::Destroy(_))) => {
                    req.reply::<ReplyEmpty>().ok();
                }
                Some(req) => req.dispatch(se),
                None => reply_errno(&slot, unique, libc::EIO),
            }
        }
        None => {
            error!("io_uring request {unique}: length {total} and payload {payload_sz} disagree");
            reply_errno(&slot, unique, libc::EIO);
        }
    }
    let len = slot.finish();
    // SAFETY: the request is done with the header; the commit tells the
    // kernel the reply's payload length here.
    unsafe { (*hp).payload_sz = len as u32 };
}

/// A `fuse_out_header` that answers request `unique` with `-errno`.
fn error_header(unique: u64, errno: i32) -> [u8; OUT_HEADER_SZ] {
    let mut h = [0u8; OUT_HEADER_SZ];
    h[0..4].copy_from_slice(&(OUT_HEADER_SZ as u32).to_ne_bytes());
    h[4..8].copy_from_slice(&(-errno).to_ne_bytes());
    h[8..16].copy_from_slice(&unique.to_ne_bytes());
    h
}

fn reply_errno(slot: &ReplySlot, unique: u64, errno: i32) {
    let _ = slot.send(&[IoSlice::new(&error_header(unique, errno))]);
}

/// The kernel queues a request on its caller's CPU; serving it there
/// saves a cross-CPU wake-up.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET bounds-checks the index.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            warn!(
                "fuse io_uring queue {cpu}: cannot pin to its CPU: {}",
                io::Error::last_os_error()
            );
        }
    }
}
