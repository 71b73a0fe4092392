//! A shard's store partition: append-only segment files, memory-mapped with `memmap2`.
//!
//! Runs on its owner shard only: one directory per shard, no locks. The store knows
//! bytes, records and checksums; which records are still needed is the device table's
//! business ([`crate::devices`]), which tells the store through [`Store::retain`] and
//! [`Store::release`] so a segment whose records are all released can be deleted.
//!
//! ## On disk
//! Segment `NNNNNNNNNN.seg`: a 64-byte header, then records, each 8-byte aligned:
//!
//! | offset | field |
//! |--------|-------|
//! | 0 | crc32c (u32 LE) of bytes 4.. of the record (length, kind, body) |
//! | 4 | body length (u32 LE) |
//! | 8 | kind (u8: 1 device, 2 message, 3 broadcast, 4 broadcast head) |
//! | 9 | 3 zero bytes |
//! | 12 | body, then zero padding to a multiple of 8 |
//!
//! A new segment is preallocated (`posix_fallocate`) to its full size, so a write can
//! never find a missing block when the disk fills: a full disk shows up when the next
//! segment cannot be allocated, as [`StoreError::Full`]. Unwritten space reads as
//! zeros; an all-zero record header ends the log. A sealed segment is truncated to what
//! it holds.
//!
//! ## Writes and reads
//! Every segment is mapped read-only and read through the mapping; records are written
//! with `pwrite`, never through the mapping, so its pages stay clean in the page tables:
//! a flush does not have to write-protect them (a TLB-flush IPI per page on a
//! multi-threaded process) and the next append does not fault them back in.
//!
//! - **Write-through** (the default): each append is written at once, so a killed
//!   process loses nothing appended (what `durability = "memory"` promises).
//! - **Staged** ([`Store::stage_writes`]): appends collect in a heap tail and reach the
//!   file in one `pwrite` when a flush starts ([`Store::flush_files`]), when the tail
//!   passes [`TAIL_MAX`], or when the segment is sealed. Reads of staged records come
//!   from the tail. Nothing is acknowledged before the flush that writes it, so a
//!   killed process loses only what no app was told was accepted.
//!
//! [`Store::flush_files`] then hands out the files `fdatasync` must reach for a power
//! loss to lose nothing either (the durability policy decides when).

use memmap2::{Mmap, MmapMut, MmapOptions};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A record's place: segment id in the high 32 bits, byte offset in the low 32.
pub type Loc = u64;
/// No record.
pub const NO_LOC: Loc = u64::MAX;

pub const SEG_MAGIC: &[u8; 8] = b"RPSHSEG1";
pub const FORMAT_VERSION: u32 = 1;
pub const SEG_HEADER: usize = 64;
pub const REC_HEADER: usize = 12;
const ALIGN: usize = 8;
/// Staged bytes written out early, before the flush that would take them.
pub const TAIL_MAX: usize = 1 << 20;

pub const KIND_DEVICE: u8 = 1;
pub const KIND_MESSAGE: u8 = 2;
pub const KIND_BROADCAST: u8 = 3;
pub const KIND_HEAD: u8 = 4;

pub fn loc(seg: u32, off: usize) -> Loc {
    (seg as u64) << 32 | off as u64
}

fn split(l: Loc) -> (u32, usize) {
    ((l >> 32) as u32, (l & 0xffff_ffff) as usize)
}

fn padded(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// Bytes a record with a body of `body` bytes takes in a segment.
pub fn record_size(body: usize) -> usize {
    padded(REC_HEADER + body)
}

#[derive(Debug, PartialEq, Eq)]
pub enum StoreError {
    /// No room: the configured disk budget is used up or the filesystem is full.
    Full(String),
    /// Any other I/O failure.
    Io(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Full(s) => write!(f, "store full: {s}"),
            StoreError::Io(s) => write!(f, "store I/O error: {s}"),
        }
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        StoreError::Full(format!("{what} {}: {e}", path.display()))
    } else {
        StoreError::Io(format!("{what} {}: {e}", path.display()))
    }
}

/// Sizes a store works within.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub segment_bytes: usize,
    /// Disk the partition may use, sealed segments plus the preallocated active one.
    pub max_bytes: u64,
}

enum Map {
    /// The segment being appended to, mapped read-only at its preallocated length.
    Active(Mmap),
    /// A sealed segment, mapped read-only at its final length.
    Sealed(Mmap),
}

struct Segment {
    file: Arc<File>,
    map: Map,
    /// Bytes appended (header included): the append position of the active segment.
    len: usize,
    /// Bytes in the file; `len - written` are staged in the store's tail.
    written: usize,
    /// Bytes of records still retained.
    live: u64,
}

impl Segment {
    fn bytes(&self) -> &[u8] {
        match &self.map {
            Map::Active(m) => &m[..self.written],
            Map::Sealed(m) => &m[..self.len.min(m.len())],
        }
    }
}

/// What recovery found wrong, for the log and the metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub segments: u64,
    pub records: u64,
    /// Torn or corrupt bytes cut off the end of a segment.
    pub truncated_bytes: u64,
    /// Corrupt bytes skipped between good records.
    pub skipped_bytes: u64,
    /// Segments whose header was unreadable, set aside as `*.corrupt`.
    pub bad_segments: u64,
}

/// Counters the shard exports.
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreStats {
    pub appends: u64,
    pub append_bytes: u64,
    pub flushes: u64,
    pub segments_deleted: u64,
    pub full_rejections: u64,
    pub compactions: u64,
}

impl StoreStats {
    /// Counters as (metric, labels, value) rows.
    pub fn rows(&self) -> Vec<crate::stats::CounterRow> {
        vec![
            ("ringpush_store_appends_total", vec![], self.appends),
            ("ringpush_store_append_bytes_total", vec![], self.append_bytes),
            ("ringpush_store_flushes_total", vec![], self.flushes),
            ("ringpush_store_segments_deleted_total", vec![], self.segments_deleted),
            ("ringpush_store_compactions_total", vec![], self.compactions),
            ("ringpush_store_full_total", vec![], self.full_rejections),
        ]
    }
}

pub struct Store {
    dir: PathBuf,
    opts: StoreOptions,
    segs: BTreeMap<u32, Segment>,
    active: Option<u32>,
    /// Id of the next segment: ids only grow, so a record location never points into a
    /// later segment that reused a deleted one's id.
    next_id: u32,
    /// Records appended so far; a flush covers every append counted before it began.
    appended: u64,
    /// Segments written since the last flush began.
    dirty: Vec<u32>,
    /// Staged records of the active segment, from its `written` offset on.
    tail: Vec<u8>,
    /// Whether appends are staged (see the module docs) or written through.
    stage: bool,
    pub stats: StoreStats,
    pub report: RecoveryReport,
}

/// One decoded record body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    Device(DeviceRec<'a>),
    Message(MessageRec<'a>),
    Broadcast(BroadcastRec<'a>),
    Head { app: &'a str, next_bseq: u64 },
}

/// A device's registry entry; the newest one of a device is the one that counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceRec<'a> {
    pub app: &'a str,
    pub id: &'a str,
    pub next_seq: u64,
    pub acked: u64,
    pub cursor: u64,
    pub last_seen_ms: u64,
}

/// A unicast or multicast message for one device. `prev` is the device's previous
/// message record, so a device's pending messages can be found from its newest one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageRec<'a> {
    pub app: &'a str,
    pub id: &'a str,
    pub seq: u64,
    pub push_id: u64,
    pub expiry_ms: u64,
    pub prev: Loc,
    pub payload: &'a [u8],
}

/// One broadcast, stored once per app and shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BroadcastRec<'a> {
    pub app: &'a str,
    pub bseq: u64,
    pub push_id: u64,
    pub expiry_ms: u64,
    pub payload: &'a [u8],
}

struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn id(&mut self) -> Option<&'a str> {
        let n = self.take(1)?[0] as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }
}

impl<'a> Record<'a> {
    pub fn decode(kind: u8, body: &'a [u8]) -> Option<Record<'a>> {
        let mut r = Rd(body);
        let rec = match kind {
            KIND_DEVICE => Record::Device(DeviceRec {
                app: r.id()?,
                id: r.id()?,
                next_seq: r.u64()?,
                acked: r.u64()?,
                cursor: r.u64()?,
                last_seen_ms: r.u64()?,
            }),
            KIND_MESSAGE => Record::Message(MessageRec {
                app: r.id()?,
                id: r.id()?,
                seq: r.u64()?,
                push_id: r.u64()?,
                expiry_ms: r.u64()?,
                prev: r.u64()?,
                payload: r.take(r.0.len())?,
            }),
            KIND_BROADCAST => Record::Broadcast(BroadcastRec {
                app: r.id()?,
                bseq: r.u64()?,
                push_id: r.u64()?,
                expiry_ms: r.u64()?,
                payload: r.take(r.0.len())?,
            }),
            KIND_HEAD => Record::Head { app: r.id()?, next_bseq: r.u64()? },
            _ => return None,
        };
        Some(rec)
    }

    /// The record's kind, and its body split into a small head and the payload (so a
    /// payload is copied once, straight into the mapping).
    fn encode(&self, head: &mut Vec<u8>) -> (u8, &'a [u8]) {
        head.clear();
        let id = |h: &mut Vec<u8>, s: &str| {
            h.push(s.len() as u8);
            h.extend_from_slice(s.as_bytes());
        };
        match *self {
            Record::Device(d) => {
                id(head, d.app);
                id(head, d.id);
                for v in [d.next_seq, d.acked, d.cursor, d.last_seen_ms] {
                    head.extend_from_slice(&v.to_le_bytes());
                }
                (KIND_DEVICE, &[])
            }
            Record::Message(m) => {
                id(head, m.app);
                id(head, m.id);
                for v in [m.seq, m.push_id, m.expiry_ms, m.prev] {
                    head.extend_from_slice(&v.to_le_bytes());
                }
                (KIND_MESSAGE, m.payload)
            }
            Record::Broadcast(b) => {
                id(head, b.app);
                for v in [b.bseq, b.push_id, b.expiry_ms] {
                    head.extend_from_slice(&v.to_le_bytes());
                }
                (KIND_BROADCAST, b.payload)
            }
            Record::Head { app, next_bseq } => {
                id(head, app);
                head.extend_from_slice(&next_bseq.to_le_bytes());
                (KIND_HEAD, &[])
            }
        }
    }
}

fn crc_of(len_kind: &[u8], body: &[&[u8]]) -> u32 {
    let mut c = crc32c::crc32c(len_kind);
    for b in body {
        c = crc32c::crc32c_append(c, b);
    }
    c
}

/// Parses the record at `off` of `data`: `Some((kind, body, size))` when it is whole
/// and its checksum matches.
fn parse_at(data: &[u8], off: usize) -> Option<(u8, &[u8], usize)> {
    let h = data.get(off..off + REC_HEADER)?;
    let crc = u32::from_le_bytes(h[0..4].try_into().ok()?);
    let len = u32::from_le_bytes(h[4..8].try_into().ok()?) as usize;
    let kind = h[8];
    if !(KIND_DEVICE..=KIND_HEAD).contains(&kind) || h[9..12] != [0, 0, 0] {
        return None;
    }
    let body = data.get(off + REC_HEADER..off + REC_HEADER + len)?;
    (crc_of(&h[4..12], &[body]) == crc).then_some((kind, body, record_size(len)))
}

/// Segment header: magic, format version (u32 LE), 4 reserved bytes, segment id (u32
/// LE), zeros, and a crc32c of bytes 0..60 in the last 4 bytes.
/// What a walk over a segment's bytes finds next.
enum Step<'a> {
    Record {
        off: usize,
        rec: Record<'a>,
        size: usize,
    },
    /// Bytes that are no valid record, up to the next valid one or the end of the data.
    Damage {
        off: usize,
        len: usize,
    },
}

/// Walks the records of a segment's bytes in order, resynchronizing past damage (the
/// next valid record is searched for 8 bytes at a time). Ends at an all-zero header
/// (unwritten space) or the end of the data.
struct Scan<'a> {
    data: &'a [u8],
    off: usize,
}

impl<'a> Iterator for Scan<'a> {
    type Item = Step<'a>;

    fn next(&mut self) -> Option<Step<'a>> {
        let (data, off) = (self.data, self.off);
        if off + REC_HEADER > data.len() || data[off..off + REC_HEADER].iter().all(|&b| b == 0) {
            return None;
        }
        let valid = |at: usize| parse_at(data, at).and_then(|(k, b, n)| Some((Record::decode(k, b)?, n)));
        if let Some((rec, size)) = valid(off) {
            self.off += size;
            return Some(Step::Record { off, rec, size });
        }
        let mut next = off + ALIGN;
        while next + REC_HEADER <= data.len() {
            if valid(next).is_some() {
                self.off = next;
                return Some(Step::Damage { off, len: next - off });
            }
            next += ALIGN;
        }
        self.off = data.len();
        Some(Step::Damage { off, len: data.len() - off })
    }
}

fn seg_header(id: u32) -> [u8; SEG_HEADER] {
    let mut h = [0u8; SEG_HEADER];
    h[0..8].copy_from_slice(SEG_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[16..20].copy_from_slice(&id.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

fn check_header(data: &[u8], id: u32) -> Result<(), String> {
    let h = data.get(..SEG_HEADER).ok_or("shorter than its header")?;
    if &h[0..8] != SEG_MAGIC {
        return Err("not a ringpush segment (bad magic)".into());
    }
    if u32::from_le_bytes(h[60..64].try_into().expect("4 bytes")) != crc32c::crc32c(&h[0..60]) {
        return Err("header checksum mismatch".into());
    }
    let v = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if v != FORMAT_VERSION {
        return Err(format!("format version {v}, this build reads {FORMAT_VERSION}"));
    }
    if u32::from_le_bytes(h[16..20].try_into().expect("4 bytes")) != id {
        return Err("header names another segment".into());
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the partition in `dir` and calls `visit` for every
    /// good record, oldest first. Damage is repaired as it is found: a torn or corrupt
    /// tail is cut off, corrupt bytes between good records are skipped, and a segment
    /// with an unreadable header is renamed `*.corrupt`; each is logged, none panics.
    pub fn open(dir: &Path, opts: StoreOptions, mut visit: impl FnMut(Loc, Record<'_>)) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err("cannot create", dir, e))?;
        let mut ids = Vec::new();
        let mut first_free = 1;
        for entry in std::fs::read_dir(dir).map_err(|e| io_err("cannot list", dir, e))? {
            let entry = entry.map_err(|e| io_err("cannot list", dir, e))?;
            let name = entry.file_name();
            let name = name.to_str().unwrap_or("");
            if let Some(id) = name.strip_suffix(".seg").and_then(|n| n.parse::<u32>().ok()) {
                ids.push(id);
            } else if let Some(id) = name.strip_suffix(".corrupt").and_then(|n| n.parse::<u32>().ok()) {
                // Set aside earlier: its id is never given to a new segment.
                first_free = first_free.max(id + 1);
            }
        }
        ids.sort_unstable();
        let mut store = Store {
            dir: dir.to_path_buf(),
            opts,
            segs: BTreeMap::new(),
            active: None,
            next_id: first_free.max(ids.last().map_or(1, |l| l + 1)),
            appended: 0,
            dirty: Vec::new(),
            tail: Vec::new(),
            stage: false,
            stats: StoreStats::default(),
            report: RecoveryReport::default(),
        };
        for id in ids {
            store.recover_segment(id, &mut visit)?;
        }
        Ok(store)
    }

    fn seg_path(&self, id: u32) -> PathBuf {
        self.dir.join(format!("{id:010}.seg"))
    }

    fn recover_segment(&mut self, id: u32, visit: &mut impl FnMut(Loc, Record<'_>)) -> Result<(), StoreError> {
        let path = self.seg_path(id);
        let file =
            OpenOptions::new().read(true).write(true).open(&path).map_err(|e| io_err("cannot open", &path, e))?;
        let size = file.metadata().map_err(|e| io_err("cannot stat", &path, e))?.len() as usize;
        if size == 0 {
            std::fs::remove_file(&path).map_err(|e| io_err("cannot remove", &path, e))?;
            return Ok(());
        }
        // SAFETY: the file is this shard's own; nothing else maps or truncates it.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(|e| io_err("cannot map", &path, e))?;
        if map.len() >= SEG_HEADER && map[..SEG_HEADER].iter().all(|&b| b == 0) {
            // Made just before a crash, never written: nothing to keep.
            tracing::info!("store segment {} was never written; removed", path.display());
            drop(map);
            std::fs::remove_file(&path).map_err(|e| io_err("cannot remove", &path, e))?;
            return Ok(());
        }
        if let Err(why) = check_header(&map, id) {
            tracing::error!("store segment {} is unreadable ({why}); set aside as .corrupt", path.display());
            drop(map);
            let aside = path.with_extension("corrupt");
            std::fs::rename(&path, &aside).map_err(|e| io_err("cannot rename", &path, e))?;
            self.report.bad_segments += 1;
            return Ok(());
        }
        let mut end = SEG_HEADER;
        let mut damage: Option<(usize, usize)> = None;
        for step in (Scan { data: &map, off: SEG_HEADER }) {
            match step {
                Step::Record { off, rec, size } => {
                    if let Some((at, len)) = damage.take() {
                        tracing::warn!(
                            "store segment {}: {len} corrupt bytes at offset {at} skipped; the records after them are kept",
                            path.display()
                        );
                        self.report.skipped_bytes += len as u64;
                    }
                    visit(loc(id, off), rec);
                    self.report.records += 1;
                    end = off + size;
                }
                Step::Damage { off, len } => damage = Some((off, len)),
            }
        }
        if let Some((at, len)) = damage {
            // Nothing good after it: a torn or corrupt tail (its zero padding not counted).
            let cut = map[at..at + len].iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
            tracing::warn!(
                "store segment {}: torn or corrupt tail at offset {at} ({cut} bytes) cut off",
                path.display()
            );
            self.report.truncated_bytes += cut as u64;
        }
        self.report.segments += 1;
        // Recovered segments are sealed: appends go to a fresh one.
        let map = if size > end {
            drop(map);
            file.set_len(end as u64).map_err(|e| io_err("cannot truncate", &path, e))?;
            // SAFETY: as above.
            unsafe { Mmap::map(&file) }.map_err(|e| io_err("cannot map", &path, e))?
        } else {
            map.make_read_only().map_err(|e| io_err("cannot map", &path, e))?
        };
        self.segs.insert(id, Segment { file: Arc::new(file), map: Map::Sealed(map), len: end, written: end, live: 0 });
        Ok(())
    }

    /// A store that is not open yet: holds nothing and refuses appends. A shard uses
    /// it until recovery hands over the real one.
    pub fn closed() -> Store {
        Store {
            dir: PathBuf::new(),
            opts: StoreOptions { segment_bytes: SEG_HEADER + 2 * REC_HEADER, max_bytes: 0 },
            segs: BTreeMap::new(),
            active: None,
            next_id: 1,
            appended: 0,
            dirty: Vec::new(),
            tail: Vec::new(),
            stage: false,
            stats: StoreStats::default(),
            report: RecoveryReport::default(),
        }
    }

    /// Disk bytes the partition holds (the active segment at its preallocated size).
    pub fn disk_bytes(&self) -> u64 {
        self.segs
            .iter()
            .map(|(id, s)| if Some(*id) == self.active { self.opts.segment_bytes } else { s.len } as u64)
            .sum()
    }

    /// Bytes of records still retained.
    pub fn live_bytes(&self) -> u64 {
        self.segs.values().map(|s| s.live).sum()
    }

    pub fn segments(&self) -> usize {
        self.segs.len()
    }

    pub fn appended(&self) -> u64 {
        self.appended
    }

    fn roll(&mut self, need: usize) -> Result<(), StoreError> {
        if need > self.opts.segment_bytes - SEG_HEADER {
            return Err(StoreError::Io(format!("record of {need} bytes is larger than a segment")));
        }
        if let Some(id) = self.active {
            self.write_staged()?;
            self.active = None;
            self.seal(id)?;
        }
        let sealed: u64 = self.segs.values().map(|s| s.len as u64).sum();
        if sealed + self.opts.segment_bytes as u64 > self.opts.max_bytes {
            self.stats.full_rejections += 1;
            return Err(StoreError::Full(format!(
                "{} bytes in segments, budget {} bytes",
                sealed, self.opts.max_bytes
            )));
        }
        let id = self.next_id;
        self.next_id += 1;
        let path = self.seg_path(id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_err("cannot create", &path, e))?;
        // SAFETY: posix_fallocate on a descriptor we own; it returns an errno value.
        let rc =
            unsafe { libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&file), 0, self.opts.segment_bytes as i64) };
        if rc != 0 {
            drop(file);
            let _ = std::fs::remove_file(&path);
            let e = std::io::Error::from_raw_os_error(rc);
            if matches!(rc, libc::ENOSPC | libc::EDQUOT) {
                self.stats.full_rejections += 1;
            }
            return Err(io_err("cannot allocate", &path, e));
        }
        file.write_all_at(&seg_header(id), 0).map_err(|e| io_err("cannot write", &path, e))?;
        // SAFETY: the file is new and this shard's own; it is written only with pwrite,
        // which a shared mapping sees at once.
        let map = unsafe { MmapOptions::new().len(self.opts.segment_bytes).map(&file) }
            .map_err(|e| io_err("cannot map", &path, e))?;
        let seg =
            Segment { file: Arc::new(file), map: Map::Active(map), len: SEG_HEADER, written: SEG_HEADER, live: 0 };
        self.segs.insert(id, seg);
        self.active = Some(id);
        self.dirty.push(id);
        Ok(())
    }

    /// Seals a segment: cut the file to what it holds and map it read-only.
    fn seal(&mut self, id: u32) -> Result<(), StoreError> {
        let path = self.seg_path(id);
        let seg = self.segs.get_mut(&id).expect("segment exists");
        seg.file.set_len(seg.len as u64).map_err(|e| io_err("cannot truncate", &path, e))?;
        // SAFETY: as in `roll`; the old mapping is replaced before anything reads it.
        let ro =
            unsafe { MmapOptions::new().len(seg.len).map(&*seg.file) }.map_err(|e| io_err("cannot map", &path, e))?;
        seg.map = Map::Sealed(ro);
        Ok(())
    }

    /// Appends a record and returns where it is; it counts as retained.
    pub fn append(&mut self, rec: &Record<'_>, head: &mut Vec<u8>) -> Result<Loc, StoreError> {
        let (kind, payload) = rec.encode(head);
        let body = head.len() + payload.len();
        let size = record_size(body);
        let fits =
            self.active.and_then(|id| self.segs.get(&id)).is_some_and(|s| s.len + size <= self.opts.segment_bytes);
        if !fits {
            self.roll(size)?;
        }
        let id = self.active.expect("rolled");
        let off = self.segs[&id].len;
        let mut lk = [0u8; 8];
        lk[0..4].copy_from_slice(&(body as u32).to_le_bytes());
        lk[4] = kind;
        let crc = crc_of(&lk, &[head, payload]);
        let before = self.tail.len();
        self.tail.extend_from_slice(&crc.to_le_bytes());
        self.tail.extend_from_slice(&lk);
        self.tail.extend_from_slice(head);
        self.tail.extend_from_slice(payload);
        self.tail.resize(before + size, 0);
        if !self.stage || self.tail.len() >= TAIL_MAX {
            if let Err(e) = self.write_staged() {
                // This record is not taken; staged ones before it wait for the next try.
                self.tail.truncate(before);
                return Err(e);
            }
        }
        let seg = self.segs.get_mut(&id).expect("active segment exists");
        seg.len += size;
        seg.live += size as u64;
        self.appended += 1;
        self.stats.appends += 1;
        self.stats.append_bytes += size as u64;
        if self.dirty.last() != Some(&id) {
            self.dirty.push(id);
        }
        Ok(loc(id, off))
    }

    /// The record at `l`, if it is there (it always is for a retained record).
    pub fn get(&self, l: Loc) -> Option<Record<'_>> {
        let (data, at) = self.data_at(l)?;
        let (kind, body, _) = parse_at(data, at)?;
        Record::decode(kind, body)
    }

    /// The bytes holding the record at `l` and its offset in them: the mapping, or the
    /// staged tail for a record of the active segment not written yet.
    fn data_at(&self, l: Loc) -> Option<(&[u8], usize)> {
        let (id, off) = split(l);
        let seg = self.segs.get(&id)?;
        if Some(id) == self.active && off >= seg.written {
            Some((&self.tail, off - seg.written))
        } else {
            Some((seg.bytes(), off))
        }
    }

    /// Calls `f` for every readable record of every segment, oldest first (damaged
    /// spans skipped). Recovery uses it to find records a damaged chain no longer reaches.
    pub fn scan(&self, mut f: impl FnMut(Loc, Record<'_>)) {
        for (id, seg) in &self.segs {
            for step in (Scan { data: seg.bytes(), off: SEG_HEADER }) {
                if let Step::Record { off, rec, .. } = step {
                    f(loc(*id, off), rec);
                }
            }
            if Some(*id) == self.active {
                for step in (Scan { data: &self.tail, off: 0 }) {
                    if let Step::Record { off, rec, .. } = step {
                        f(loc(*id, seg.written + off), rec);
                    }
                }
            }
        }
    }

    /// Whether the last recovery found damage other than a torn tail.
    pub fn damaged(&self) -> bool {
        self.report.skipped_bytes > 0 || self.report.bad_segments > 0
    }

    /// Size on disk of the record at `l`.
    fn size_at(&self, l: Loc) -> Option<(u32, u64)> {
        let (data, at) = self.data_at(l)?;
        let len = u32::from_le_bytes(data.get(at + 4..at + 8)?.try_into().ok()?) as usize;
        Some((split(l).0, record_size(len) as u64))
    }

    /// Counts a recovered record as still needed.
    pub fn retain(&mut self, l: Loc) {
        if let Some((id, n)) = self.size_at(l) {
            self.segs.get_mut(&id).expect("segment exists").live += n;
        }
    }

    /// Bytes a message record takes, from what is in it (so releasing a message does
    /// not read its record back).
    pub fn message_size(app: &str, id: &str, payload: usize) -> u64 {
        record_size(2 + app.len() + id.len() + 32 + payload) as u64
    }

    /// The record at `l`, of `size` bytes ([`Store::message_size`]), is no longer needed.
    pub fn release_sized(&mut self, l: Loc, size: u64) {
        if let Some(s) = self.segs.get_mut(&split(l).0) {
            s.live = s.live.saturating_sub(size);
        }
    }

    /// The record at `l` is no longer needed.
    pub fn release(&mut self, l: Loc) {
        if l == NO_LOC {
            return;
        }
        if let Some((id, n)) = self.size_at(l) {
            let s = self.segs.get_mut(&id).expect("segment exists");
            s.live = s.live.saturating_sub(n);
        }
    }

    /// Sealed segments holding nothing retained: deletable once a flush has made the
    /// records that released them durable.
    pub fn dead_segments(&self) -> Vec<u32> {
        self.segs.iter().filter(|(id, s)| Some(**id) != self.active && s.live == 0).map(|(id, _)| *id).collect()
    }

    /// Deletes segments [`Store::dead_segments`] returned (skipping any that took a
    /// record since).
    pub fn delete(&mut self, ids: &[u32]) -> Result<(), StoreError> {
        for id in ids {
            if Some(*id) == self.active || self.segs.get(id).is_none_or(|s| s.live > 0) {
                continue;
            }
            self.segs.remove(id);
            let path = self.seg_path(*id);
            std::fs::remove_file(&path).map_err(|e| io_err("cannot remove", &path, e))?;
            self.stats.segments_deleted += 1;
        }
        Ok(())
    }

    /// The sealed segment most worth compacting: the emptiest below `max_live` of its
    /// size, with its id and the record locations in it.
    pub fn compaction_candidate(&self, max_live: f64) -> Option<(u32, Vec<Loc>)> {
        let (id, _) = self
            .segs
            .iter()
            .filter(|(id, s)| Some(**id) != self.active && s.live > 0 && (s.live as f64) < max_live * s.len as f64)
            .min_by(|a, b| (a.1.live as f64 / a.1.len as f64).total_cmp(&(b.1.live as f64 / b.1.len as f64)))?;
        let scan = Scan { data: self.segs[id].bytes(), off: SEG_HEADER };
        let locs = scan
            .filter_map(|step| match step {
                Step::Record { off, .. } => Some(loc(*id, off)),
                Step::Damage { .. } => None,
            })
            .collect();
        Some((*id, locs))
    }

    /// Stages appends (`true`) or writes each at once (`false`, the default); see the
    /// module docs. Turning staging off writes what is staged.
    pub fn stage_writes(&mut self, on: bool) -> Result<(), StoreError> {
        self.stage = on;
        if on {
            Ok(())
        } else {
            self.write_staged()
        }
    }

    /// Writes the staged tail to the active segment's file (one `pwrite`).
    pub fn write_staged(&mut self) -> Result<(), StoreError> {
        if self.tail.is_empty() {
            return Ok(());
        }
        let id = self.active.expect("staged records belong to the active segment");
        let seg = self.segs.get_mut(&id).expect("active segment exists");
        if let Err(e) = seg.file.write_all_at(&self.tail, seg.written as u64) {
            // Part of it may have landed: it is written again, whole, next time.
            return Err(io_err("cannot write", &self.dir, e));
        }
        seg.written += self.tail.len();
        self.tail.clear();
        Ok(())
    }

    /// Starts a flush: writes what is staged, then returns the append count the flush
    /// covers and the files to `fdatasync`. An error means nothing staged reached the
    /// file: the flush fails, and the pushes waiting for it with it.
    pub fn flush_files(&mut self) -> Result<(u64, Vec<Arc<File>>), StoreError> {
        self.write_staged()?;
        let files = self.dirty.drain(..).filter_map(|id| self.segs.get(&id).map(|s| Arc::clone(&s.file))).collect();
        self.stats.flushes += 1;
        Ok((self.appended, files))
    }

    /// Flushes on this thread (tests, tools, shutdown).
    pub fn flush_now(&mut self) -> Result<u64, StoreError> {
        let (upto, files) = self.flush_files()?;
        for f in files {
            f.sync_data().map_err(|e| io_err("cannot flush", &self.dir, e))?;
        }
        Ok(upto)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> StoreOptions {
        StoreOptions { segment_bytes: 4096, max_bytes: 1 << 30 }
    }

    fn msg<'a>(id: &'a str, seq: u64, payload: &'a [u8]) -> Record<'a> {
        Record::Message(MessageRec { app: "a", id, seq, push_id: seq * 10, expiry_ms: 99, prev: NO_LOC, payload })
    }

    fn read_all(dir: &Path) -> (Vec<(Loc, String)>, RecoveryReport) {
        let mut v = Vec::new();
        let s = Store::open(dir, opts(), |l, r| v.push((l, format!("{r:?}")))).unwrap();
        (v, s.report)
    }

    fn seqs(dir: &Path) -> Vec<u64> {
        let mut v = Vec::new();
        Store::open(dir, opts(), |_, r| {
            if let Record::Message(m) = r {
                v.push(m.seq)
            }
        })
        .unwrap();
        v
    }

    #[test]
    fn every_record_kind_round_trips_through_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = Vec::new();
        let recs = [
            Record::Device(DeviceRec { app: "news", id: "dev", next_seq: 5, acked: 4, cursor: 2, last_seen_ms: 77 }),
            msg("dev", 5, b"hello"),
            Record::Broadcast(BroadcastRec { app: "news", bseq: 9, push_id: 1, expiry_ms: 2, payload: b"all" }),
            Record::Head { app: "news", next_bseq: 10 },
        ];
        let mut s = Store::open(dir.path(), opts(), |_, _| panic!("empty store")).unwrap();
        let locs: Vec<Loc> = recs.iter().map(|r| s.append(r, &mut h).unwrap()).collect();
        for (l, r) in locs.iter().zip(&recs) {
            assert_eq!(s.get(*l).as_ref(), Some(r));
        }
        s.flush_now().unwrap();
        drop(s);
        let (got, report) = read_all(dir.path());
        assert_eq!(got.iter().map(|(l, _)| *l).collect::<Vec<_>>(), locs);
        assert_eq!(got.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(), recs.map(|r| format!("{r:?}")));
        assert_eq!(report, RecoveryReport { segments: 1, records: 4, ..Default::default() });
    }

    #[test]
    fn staged_records_read_back_before_the_flush_and_reach_the_file_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), opts(), |_, _| {}).unwrap();
        s.stage_writes(true).unwrap();
        let mut h = Vec::new();
        // Enough records to roll segments of 4 KiB: sealing writes the staged tail.
        let locs: Vec<Loc> = (1..=200).map(|i| s.append(&msg("d", i, b"payload!"), &mut h).unwrap()).collect();
        assert!(s.segments() > 1, "the test must cross a segment boundary");
        for (i, l) in locs.iter().enumerate() {
            assert_eq!(s.get(*l), Some(msg("d", i as u64 + 1, b"payload!")), "record {i} before the flush");
        }
        let mut scanned = Vec::new();
        s.scan(|l, _| scanned.push(l));
        assert_eq!(scanned, locs, "scan sees written and staged records, in order");
        // Staged records of the active segment are not in its file yet.
        let active = s.active.unwrap();
        let file_len = s.segs[&active].written;
        assert!(file_len < s.segs[&active].len);
        s.flush_now().unwrap();
        assert_eq!(s.segs[&active].written, s.segs[&active].len);
        drop(s);
        assert_eq!(seqs(dir.path()), (1..=200).collect::<Vec<_>>());
    }

    #[test]
    fn a_killed_process_loses_only_staged_records_and_nothing_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), opts(), |_, _| {}).unwrap();
        let mut h = Vec::new();
        s.append(&msg("d", 1, b"through"), &mut h).unwrap();
        s.stage_writes(true).unwrap();
        s.append(&msg("d", 2, b"flushed"), &mut h).unwrap();
        s.flush_files().unwrap(); // written to the page cache; fdatasync is the flusher's
        s.append(&msg("d", 3, b"staged"), &mut h).unwrap();
        // A killed process: no flush, no drop-time writing.
        std::mem::forget(s);
        assert_eq!(seqs(dir.path()), [1, 2]);
        // Turning staging off writes what is staged.
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), opts(), |_, _| {}).unwrap();
        s.stage_writes(true).unwrap();
        s.append(&msg("d", 7, b"staged"), &mut h).unwrap();
        s.stage_writes(false).unwrap();
        std::mem::forget(s);
        assert_eq!(seqs(dir.path()), [7]);
    }

    #[test]
    fn segment_header_and_record_layout_are_as_documented() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), opts(), |_, _| {}).unwrap();
        s.append(&Record::Head { app: "ab", next_bseq: 2 }, &mut Vec::new()).unwrap();
        s.flush_now().unwrap();
        let bytes = std::fs::read(dir.path().join("0000000001.seg")).unwrap();
        assert_eq!(&bytes[..8], b"RPSHSEG1");
        assert_eq!(&bytes[8..12], &1u32.to_le_bytes());
        let r = &bytes[SEG_HEADER..SEG_HEADER + 24];
        assert_eq!(&r[4..12], &[11, 0, 0, 0, KIND_HEAD, 0, 0, 0]);
        assert_eq!(&r[12..23], &[2, b'a', b'b', 2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&r[23..24], &[0], "padding to 8");
        assert_eq!(u32::from_le_bytes(r[0..4].try_into().unwrap()), crc32c::crc32c(&r[4..23]));
    }

    /// Writes `n` messages, seals, and returns the segment file's bytes.
    fn small_log(dir: &Path, n: u64) -> Vec<u8> {
        let mut s = Store::open(dir, opts(), |_, _| {}).unwrap();
        for i in 1..=n {
            s.append(&msg("d", i, b"payload!"), &mut Vec::new()).unwrap();
        }
        let id = s.active.unwrap();
        s.seal(id).unwrap();
        drop(s);
        std::fs::read(dir.join("0000000001.seg")).unwrap()
    }

    #[test]
    fn recovery_from_every_truncation_point_keeps_every_whole_record() {
        let src = tempfile::tempdir().unwrap();
        let full = small_log(src.path(), 4);
        let size = (full.len() - SEG_HEADER) / 4; // all four records are the same size
        for cut in SEG_HEADER..=full.len() {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("0000000001.seg"), &full[..cut]).unwrap();
            let whole = ((cut - SEG_HEADER) / size) as u64;
            assert_eq!(seqs(dir.path()), (1..=whole).collect::<Vec<_>>(), "cut at {cut}");
            // The repaired log reads the same again and takes appends after it.
            let mut s = Store::open(dir.path(), opts(), |_, _| {}).unwrap();
            s.append(&msg("d", 100, b"x"), &mut Vec::new()).unwrap();
            drop(s);
            let mut want: Vec<u64> = (1..=whole).collect();
            want.push(100);
            assert_eq!(seqs(dir.path()), want, "cut at {cut}, after append");
        }
    }

    #[test]
    fn a_torn_tail_is_cut_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = small_log(dir.path(), 3);
        let n = bytes.len();
        bytes[n - 3] ^= 0xff; // last record's payload
        std::fs::write(dir.path().join("0000000001.seg"), &bytes).unwrap();
        let (got, report) = read_all(dir.path());
        assert_eq!(got.len(), 2);
        assert!(report.truncated_bytes > 0 && report.skipped_bytes == 0, "{report:?}");
        let (_, again) = read_all(dir.path());
        assert_eq!(again.truncated_bytes, 0, "repaired once, clean after");
    }

    #[test]
    fn corruption_in_the_middle_skips_only_the_bad_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = small_log(dir.path(), 5);
        let size = (bytes.len() - SEG_HEADER) / 5;
        bytes[SEG_HEADER + 2 * size + 20] ^= 0x55; // third record
        std::fs::write(dir.path().join("0000000001.seg"), &bytes).unwrap();
        assert_eq!(seqs(dir.path()), [1, 2, 4, 5]);
        let (_, report) = read_all(dir.path());
        assert_eq!(report.skipped_bytes, size as u64);
        assert_eq!(report.truncated_bytes, 0);
    }

    #[test]
    fn a_segment_with_a_bad_header_is_set_aside_and_its_neighbours_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), opts(), |_, _| {}).unwrap();
        let big = vec![7u8; 1500];
        for i in 1..=9 {
            s.append(&msg("d", i, &big), &mut Vec::new()).unwrap();
        }
        drop(s);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 5, "two records per 4 KiB segment");
        let p = dir.path().join("0000000002.seg");
        let mut b = std::fs::read(&p).unwrap();
        b[0] = b'X';
        std::fs::write(&p, b).unwrap();
        assert_eq!(seqs(dir.path()), [1, 2, 5, 6, 7, 8, 9]);
        assert!(dir.path().join("0000000002.corrupt").exists());
    }

    #[test]
    fn message_size_matches_what_append_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), opts(), |_, _| {}).unwrap();
        for (id, payload) in [("d", 0usize), ("device-000042", 64), ("x".repeat(128).as_str(), 1001)] {
            let before = s.live_bytes();
            let p = vec![1u8; payload];
            let l = s.append(&msg(id, 1, &p), &mut Vec::new()).unwrap();
            assert_eq!(s.live_bytes() - before, Store::message_size("a", id, payload), "{id} {payload}");
            s.release_sized(l, Store::message_size("a", id, payload));
            assert_eq!(s.live_bytes(), before);
        }
    }

    #[test]
    fn a_segment_made_just_before_a_crash_is_removed_quietly() {
        let dir = tempfile::tempdir().unwrap();
        small_log(dir.path(), 2);
        std::fs::write(dir.path().join("0000000002.seg"), vec![0u8; 4096]).unwrap();
        let (got, report) = read_all(dir.path());
        assert_eq!(got.len(), 2);
        assert_eq!(report.bad_segments, 0);
        assert!(!dir.path().join("0000000002.seg").exists());
        assert!(!dir.path().join("0000000002.corrupt").exists());
    }

    #[test]
    fn released_segments_are_deleted_and_the_budget_refuses_more() {
        let dir = tempfile::tempdir().unwrap();
        let mut s =
            Store::open(dir.path(), StoreOptions { segment_bytes: 4096, max_bytes: 3 * 4096 }, |_, _| {}).unwrap();
        let big = vec![1u8; 1500];
        let mut locs = Vec::new();
        let err = loop {
            match s.append(&msg("d", 1, &big), &mut Vec::new()) {
                Ok(l) => locs.push(l),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, StoreError::Full(_)), "{err:?}");
        assert_eq!(s.stats.full_rejections, 1);
        assert!(s.dead_segments().is_empty());
        for l in &locs[..2] {
            s.release(*l);
        }
        let dead = s.dead_segments();
        assert_eq!(dead, [1]);
        s.delete(&dead).unwrap();
        assert!(!dir.path().join("0000000001.seg").exists());
        s.append(&msg("d", 2, &big), &mut Vec::new()).expect("room again");
        assert!(s.disk_bytes() <= 3 * 4096);
    }

    #[test]
    fn compaction_candidate_is_the_emptiest_sealed_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path(), opts(), |_, _| {}).unwrap();
        let big = vec![1u8; 1000];
        let locs: Vec<Loc> = (0..9).map(|i| s.append(&msg("d", i, &big), &mut Vec::new()).unwrap()).collect();
        // Segments hold three records each: release two of the second, one of the first.
        s.release(locs[3]);
        s.release(locs[4]);
        s.release(locs[0]);
        let (id, in_it) = s.compaction_candidate(0.5).unwrap();
        assert_eq!(id, 2);
        assert_eq!(in_it, &locs[3..6]);
        assert!(s.compaction_candidate(0.2).is_none());
    }
}
