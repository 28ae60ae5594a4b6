//! Helpers for the interop tests: wrappers around QEMU's tools (the oracle),
//! a tiny JSON reader (no new crates), temp dirs, a seeded PRNG and raw
//! header poking.
#![allow(dead_code)]

pub mod cut_check;
pub mod fault_storage;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Tool presence

/// The tools every interop test needs.
pub const TOOLS: &[&str] = &["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"];

fn in_path(tool: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|d| {
        let p = d.join(tool);
        fs::metadata(&p).map(|m| m.is_file()).unwrap_or(false)
    })
}

/// True when every tool is installed. A missing tool fails the test under
/// CI=true and is a loud skip elsewhere (the caller returns early).
pub fn have_tools(tools: &[&str]) -> bool {
    for t in tools {
        if !in_path(t) {
            if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
                panic!("{t} missing (CI=true: interop tests need QEMU's tools)");
            }
            eprintln!("\n**************** SKIPPED: {t} missing ****************\n");
            return false;
        }
    }
    true
}

// ---------------------------------------------------------------------------
// Running commands

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` and returns its output whatever the exit status.
pub fn run_output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", describe(cmd)))
}

/// Runs `cmd`; returns stdout, or panics with stderr when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = run_output(cmd);
    if !out.status.success() {
        panic!(
            "`{}` failed ({}):\nstderr: {}\nstdout: {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img ARGS...`
pub fn qemu_img(args: &[&str]) -> String {
    run(Command::new("qemu-img").args(args))
}

/// A new image of `size` bytes made by libqbm with the default options.
pub fn create_image(path: &Path, size: u64) -> qbm::image::Image {
    let options = qbm::image::CreateOptions {
        size,
        ..Default::default()
    };
    qbm::image::Image::create(path, &options)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()))
}

/// Options of a lazy open (bitmap data read only where a call needs it).
pub fn lazy(writable: bool) -> qbm::image::OpenOptions {
    qbm::image::OpenOptions {
        writable,
        lazy: true,
        ..Default::default()
    }
}

/// `qemu-img create -f qcow2 -o cluster_size=CS,refcount_bits=RB PATH SIZE`
pub fn qemu_img_create(path: &Path, size: u64, cluster_size: u64, refcount_bits: u32) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o"])
        .arg(format!(
            "cluster_size={cluster_size},refcount_bits={refcount_bits}"
        ))
        .arg(path)
        .arg(size.to_string()));
}

/// `qemu-img bitmap --add [-g G] [--disable] PATH NAME`
pub fn qemu_bitmap_add(path: &Path, name: &str, granularity: Option<u64>, enabled: bool) {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["bitmap", "--add"]);
    if let Some(g) = granularity {
        cmd.arg("-g").arg(g.to_string());
    }
    if !enabled {
        cmd.arg("--disable");
    }
    run(cmd.arg(path).arg(name));
}

/// `qemu-img bitmap OP... PATH NAME`, e.g. `&["--merge", "b2"]`, `&["--clear"]`.
pub fn qemu_bitmap(path: &Path, op: &[&str], name: &str) {
    run(Command::new("qemu-img")
        .arg("bitmap")
        .args(op)
        .arg(path)
        .arg(name));
}

/// One `qemu-io -f qcow2` invocation running every command of `cmds`.
pub fn qemu_io(path: &Path, cmds: &[String]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = run(cmd.arg(path));
    // qemu-io reports failed commands on stdout and still exits 0.
    let lower = out.to_lowercase();
    assert!(
        !lower.contains("error") && !lower.contains("failed"),
        "qemu-io on {} reported a failure:\n{out}",
        path.display()
    );
    out
}

/// `write -P 1 OFF LEN` commands for qemu-io.
pub fn write_cmds(writes: &[(u64, u64)]) -> Vec<String> {
    writes
        .iter()
        .map(|(o, l)| format!("write -P 1 {o} {l}"))
        .collect()
}

// ---------------------------------------------------------------------------
// qemu-img check / info

#[derive(Debug, Default, Clone)]
pub struct CheckResult {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub image_end_offset: u64,
    pub raw: String,
}

/// `qemu-img check --output=json PATH`, parsed; does not assert.
pub fn qemu_img_check_raw(path: &Path) -> CheckResult {
    // Exit status: 0 clean, 2 corruptions, 3 leaks; 1 means check could not run.
    let out = run_output(
        Command::new("qemu-img")
            .args(["check", "--output=json"])
            .arg(path),
    );
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.code() == Some(1) || raw.trim().is_empty() {
        panic!(
            "qemu-img check could not check {} ({}):\n{}\n{raw}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v =
        Json::parse(&raw).unwrap_or_else(|e| panic!("bad JSON from qemu-img check: {e}\n{raw}"));
    let n = |k: &str| v.get(k).and_then(Json::as_u64).unwrap_or(0);
    CheckResult {
        corruptions: n("corruptions"),
        leaks: n("leaks"),
        check_errors: n("check-errors"),
        image_end_offset: n("image-end-offset"),
        raw: format!("{raw}\nstderr: {}", String::from_utf8_lossy(&out.stderr)),
    }
}

/// `qemu-img check`: panics unless there are no corruptions, no leaks and no
/// check errors (naming what it found).
pub fn qemu_img_check(path: &Path) -> CheckResult {
    let c = qemu_img_check_raw(path);
    if c.corruptions != 0 || c.leaks != 0 || c.check_errors != 0 {
        let human = run_output(Command::new("qemu-img").arg("check").arg(path));
        panic!(
            "qemu-img check {}: {} corruptions, {} leaks, {} check errors\n{}\n{}{}",
            path.display(),
            c.corruptions,
            c.leaks,
            c.check_errors,
            c.raw,
            String::from_utf8_lossy(&human.stdout),
            String::from_utf8_lossy(&human.stderr)
        );
    }
    c
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuBitmap {
    pub name: String,
    pub granularity: u64,
    pub flags: Vec<String>,
}

impl QemuBitmap {
    pub fn auto(&self) -> bool {
        self.flags.iter().any(|f| f == "auto")
    }
    pub fn in_use(&self) -> bool {
        self.flags.iter().any(|f| f == "in-use")
    }
}

/// `qemu-img info [-U] --output=json PATH`, parsed.
pub fn qemu_img_info(path: &Path, force_share: bool) -> Json {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["info", "--output=json"]);
    if force_share {
        cmd.arg("-U");
    }
    let raw = run(cmd.arg(path));
    Json::parse(&raw).unwrap_or_else(|e| panic!("bad JSON from qemu-img info: {e}\n{raw}"))
}

/// The bitmaps `qemu-img info` lists, in its order.
pub fn qemu_img_info_bitmaps(path: &Path) -> Vec<QemuBitmap> {
    bitmaps_of(&qemu_img_info(path, false))
}

/// Same, with -U (no locks: works while another process holds the image).
pub fn qemu_img_info_bitmaps_shared(path: &Path) -> Vec<QemuBitmap> {
    bitmaps_of(&qemu_img_info(path, true))
}

pub fn bitmaps_of(info: &Json) -> Vec<QemuBitmap> {
    let Some(list) = info
        .get("format-specific")
        .and_then(|f| f.get("data"))
        .and_then(|d| d.get("bitmaps"))
        .and_then(Json::as_array)
    else {
        return Vec::new();
    };
    list.iter()
        .map(|b| QemuBitmap {
            name: b
                .get("name")
                .and_then(Json::as_str)
                .expect("bitmap name")
                .to_string(),
            granularity: b
                .get("granularity")
                .and_then(Json::as_u64)
                .expect("granularity"),
            flags: b
                .get("flags")
                .and_then(Json::as_array)
                .map(|f| {
                    f.iter()
                        .filter_map(Json::as_str)
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}

// ---------------------------------------------------------------------------
// qemu-nbd + nbdinfo: the dirty extents as QEMU sees them

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// Kills and reaps a child when dropped (also on panic).
struct Reaper(Option<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Exports bitmap `bitmap` of `path` with `qemu-nbd -r -B` and returns its
/// dirty extents per `nbdinfo --map`, merged into maximal (start, length) runs.
pub fn nbd_dirty_extents(path: &Path, bitmap: &str) -> Vec<(u64, u64)> {
    let image = [
        "-f".to_string(),
        "qcow2".to_string(),
        path.to_str().expect("utf-8 path").to_string(),
    ];
    nbd_dirty_extents_with(&image, bitmap)
}

/// Same, with the image given by qemu-nbd arguments (e.g. `--object ...
/// --image-opts driver=qcow2,...` for an encrypted image).
pub fn nbd_dirty_extents_with(image: &[String], bitmap: &str) -> Vec<(u64, u64)> {
    let path = image.join(" ");
    let dir = TempDir::new("nbd");
    let sock = dir.path().join("s");
    let stderr_path = dir.path().join("qemu-nbd.err");
    let child = Command::new("qemu-nbd")
        .args(["-r", "-B", bitmap])
        .arg(format!("--socket={}", sock.display()))
        .args(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("cannot start qemu-nbd");
    let mut child = Reaper(Some(child));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        if let Some(status) = child.0.as_mut().unwrap().try_wait().expect("try_wait") {
            panic!(
                "qemu-nbd -B {bitmap} {path} exited early ({status}): {}",
                fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "qemu-nbd socket never appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The socket file appears at bind(), a moment before qemu-nbd listens:
    // a connection refused in between is retried.
    let map = || {
        let mut cmd = Command::new("nbdinfo");
        cmd.arg(format!("--map=qemu:dirty-bitmap:{bitmap}"))
            .arg(format!("nbd+unix:///?socket={}", sock.display()));
        cmd
    };
    let out = loop {
        let out = run_output(&mut map());
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        let refused = String::from_utf8_lossy(&out.stderr).contains("Connection refused");
        if !refused || Instant::now() >= deadline {
            // Fails again, with the command and its output in the panic.
            break run(&mut map());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(child);
    parse_nbdinfo_map(&out)
}

/// Lines "offset length type description"; type bit 0 set = dirty.
pub fn parse_nbdinfo_map(out: &str) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut expect_at = 0u64;
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() >= 3, "unexpected nbdinfo line: {line:?}");
        let (off, len, ty): (u64, u64, u64) = (
            f[0].parse().expect("offset"),
            f[1].parse().expect("length"),
            f[2].parse().expect("type"),
        );
        assert_eq!(
            off, expect_at,
            "nbdinfo map has a gap or overlap at {line:?}"
        );
        expect_at = off + len;
        if ty & 1 == 0 || len == 0 {
            continue;
        }
        match runs.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += len,
            _ => runs.push((off, len)),
        }
    }
    runs
}

/// Merges (start, len) pieces into sorted maximal runs.
pub fn merge_runs(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.retain(|r| r.1 > 0);
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, l) in v {
        match out.last_mut() {
            Some(last) if last.0 + last.1 >= s => {
                let end = (last.0 + last.1).max(s + l);
                last.1 = end - last.0;
            }
            _ => out.push((s, l)),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// A model bitmap: one bool per granule

#[derive(Clone, Debug)]
pub struct Model {
    pub size: u64,
    pub granularity: u64,
    pub bits: Vec<bool>,
}

impl Model {
    pub fn new(size: u64, granularity: u64) -> Model {
        Model {
            size,
            granularity,
            bits: vec![false; size.div_ceil(granularity) as usize],
        }
    }

    /// Every granule `[off, off+len)` touches.
    pub fn mark(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let g = self.granularity;
        for k in off / g..(off + len).div_ceil(g) {
            self.bits[k as usize] = true;
        }
    }

    /// Granule-aligned reset (end may be the disk end).
    pub fn reset(&mut self, off: u64, len: u64) {
        let g = self.granularity;
        assert!(off % g == 0 && ((off + len) % g == 0 || off + len == self.size));
        for k in off / g..(off + len).div_ceil(g) {
            self.bits[k as usize] = false;
        }
    }

    pub fn clear(&mut self) {
        self.bits.iter_mut().for_each(|b| *b = false);
    }

    /// OR in another model of the same disk (any granularity): every granule
    /// of self touching a dirty byte range of `other` becomes dirty.
    pub fn merge(&mut self, other: &Model) {
        assert_eq!(self.size, other.size);
        for (s, l) in other.extents() {
            self.mark(s, l);
        }
    }

    /// Maximal dirty runs in bytes, clipped to the disk size.
    pub fn extents(&self) -> Vec<(u64, u64)> {
        let g = self.granularity;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut k = 0;
        while k < self.bits.len() {
            if !self.bits[k] {
                k += 1;
                continue;
            }
            let start = k;
            while k < self.bits.len() && self.bits[k] {
                k += 1;
            }
            let s = start as u64 * g;
            let e = (k as u64 * g).min(self.size);
            out.push((s, e - s));
        }
        out
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.extents().iter().map(|r| r.1).sum()
    }
}

// ---------------------------------------------------------------------------
// Temp dirs, PRNG, raw file access

pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "qbm-interop-{tag}-{}-{n}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Keep the evidence of a failing test.
        if std::thread::panicking() {
            eprintln!("(keeping {} for inspection)", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// xorshift64*: tiny, seeded, good enough for test patterns.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next_u64() % n
    }

    /// Uniform in [lo, hi].
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

pub fn read_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = fs::File::open(path).expect("open");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).expect("read");
    buf
}

pub fn write_bytes(path: &Path, offset: u64, data: &[u8]) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open rw");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(data).expect("write");
    f.sync_all().expect("sync");
}

pub fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

pub fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// One header extension of cluster 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawExt {
    pub offset: usize,
    pub magic: u32,
    pub data: Vec<u8>,
}

/// Parses the header extensions of cluster 0 (up to and excluding the end
/// marker); also returns the offset of the end marker.
pub fn raw_extensions(c0: &[u8]) -> (Vec<RawExt>, usize) {
    let version = be_u32(c0, 4);
    let mut at = if version >= 3 {
        be_u32(c0, 100) as usize
    } else {
        72
    };
    let mut out = Vec::new();
    loop {
        let magic = be_u32(c0, at);
        let len = be_u32(c0, at + 4) as usize;
        if magic == 0 {
            return (out, at);
        }
        out.push(RawExt {
            offset: at,
            magic,
            data: c0[at + 8..at + 8 + len].to_vec(),
        });
        at += 8 + len.div_ceil(8) * 8;
    }
}

/// The backing file name stored in cluster 0, if any.
pub fn raw_backing_name(c0: &[u8]) -> Option<Vec<u8>> {
    let off = be_u64(c0, 8) as usize;
    let len = be_u32(c0, 16) as usize;
    (off != 0).then(|| c0[off..off + len].to_vec())
}

pub fn cluster0(path: &Path) -> Vec<u8> {
    let h = read_bytes(path, 0, 24);
    let cs = 1usize << be_u32(&h, 20);
    read_bytes(path, 0, cs)
}

// ---------------------------------------------------------------------------
// A minimal JSON reader (enough for qemu-img's output)

#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(f64, Option<u64>),
    Str(String),
    Arr(Vec<Json>),
    Obj(BTreeMap<String, Json>),
}

impl Json {
    pub fn parse(s: &str) -> Result<Json, String> {
        let mut p = Parser {
            b: s.as_bytes(),
            i: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.i != p.b.len() {
            return Err(format!("trailing data at byte {}", p.i));
        }
        Ok(v)
    }

    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(m) => m.get(key),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Num(_, Some(u)) => Some(*u),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Vec<Json>> {
        match self {
            Json::Arr(a) => Some(a),
            _ => None,
        }
    }
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && self.b[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Result<(), String> {
        self.ws();
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected '{}' at byte {}", c as char, self.i))
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.b.get(self.i).copied() {
            Some(b'{') => {
                self.i += 1;
                let mut m = BTreeMap::new();
                self.ws();
                if self.b.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(m));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.eat(b':')?;
                    let v = self.value()?;
                    m.insert(k, v);
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(m));
                        }
                        _ => return Err(format!("bad object at byte {}", self.i)),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut a = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(a));
                }
                loop {
                    a.push(self.value()?);
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(a));
                        }
                        _ => return Err(format!("bad array at byte {}", self.i)),
                    }
                }
            }
            Some(b'"') => Ok(Json::Str(self.string()?)),
            Some(b't') => self.lit("true", Json::Bool(true)),
            Some(b'f') => self.lit("false", Json::Bool(false)),
            Some(b'n') => self.lit("null", Json::Null),
            Some(c) if c == b'-' || c.is_ascii_digit() => {
                let start = self.i;
                while self.i < self.b.len()
                    && matches!(
                        self.b[self.i],
                        b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                    )
                {
                    self.i += 1;
                }
                let t = std::str::from_utf8(&self.b[start..self.i]).unwrap();
                let f: f64 = t.parse().map_err(|_| format!("bad number {t}"))?;
                Ok(Json::Num(f, t.parse::<u64>().ok()))
            }
            _ => Err(format!("unexpected input at byte {}", self.i)),
        }
    }

    fn lit(&mut self, word: &str, v: Json) -> Result<Json, String> {
        if self.b[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            Err(format!("bad literal at byte {}", self.i))
        }
    }

    fn string(&mut self) -> Result<String, String> {
        if self.b.get(self.i) != Some(&b'"') {
            return Err(format!("expected string at byte {}", self.i));
        }
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let c = *self.b.get(self.i).ok_or("unterminated string")?;
            self.i += 1;
            match c {
                b'"' => return String::from_utf8(out).map_err(|e| e.to_string()),
                b'\\' => {
                    let e = *self.b.get(self.i).ok_or("bad escape")?;
                    self.i += 1;
                    match e {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'u' => {
                            let h = std::str::from_utf8(&self.b[self.i..self.i + 4])
                                .map_err(|e| e.to_string())?;
                            let cp = u32::from_str_radix(h, 16).map_err(|e| e.to_string())?;
                            self.i += 4;
                            let ch = char::from_u32(cp).unwrap_or('\u{fffd}');
                            let mut tmp = [0u8; 4];
                            out.extend_from_slice(ch.encode_utf8(&mut tmp).as_bytes());
                        }
                        other => out.push(other),
                    }
                }
                _ => out.push(c),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// An interactive qemu-io session holding an image open

pub struct QemuIoSession {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl QemuIoSession {
    /// `qemu-io -f qcow2 [-r] PATH`, proven open by a first command.
    pub fn open(path: &Path, read_only: bool) -> QemuIoSession {
        QemuIoSession::open_format(path, "qcow2", read_only)
    }

    /// A session on an image of another format (e.g. a raw data file).
    pub fn open_format(path: &Path, format: &str, read_only: bool) -> QemuIoSession {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", format]);
        if read_only {
            cmd.arg("-r");
        }
        let mut child = cmd
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu-io");
        let stdin = child.stdin.take().unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut s = QemuIoSession {
            child,
            stdin,
            stdout,
        };
        s.cmd("read 0 512", "read ");
        s
    }

    /// Sends one command and waits for a line containing `expect`.
    pub fn cmd(&mut self, c: &str, expect: &str) {
        use std::io::BufRead;
        writeln!(self.stdin, "{c}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.stdout.read_line(&mut line).unwrap();
            assert!(
                n > 0,
                "qemu-io ended while waiting for {expect:?} after {c:?}"
            );
            if line.contains(expect) {
                return;
            }
        }
    }

    /// Quits cleanly (QEMU stores its bitmaps).
    pub fn quit(mut self) {
        writeln!(self.stdin, "quit").unwrap();
        self.stdin.flush().unwrap();
        let st = self.child.wait().unwrap();
        assert!(st.success(), "qemu-io exited with {st}");
    }
}

impl Drop for QemuIoSession {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
