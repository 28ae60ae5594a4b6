//! The `qbm` command line, run as a user runs it: every subcommand's success
//! (exact output and effects) and failure (exit code 1, exactly one line on
//! stderr starting "qbm: " that names the image, the bitmap and the cause,
//! never a panic or a backtrace), `--help` of every subcommand, qemu-img's
//! size suffixes, and round trips with QEMU both ways (`qemu-img`, `qemu-io`,
//! and `qemu-nbd` + `nbdinfo --map` as the oracle for the dirty extents).
//!
//! The QEMU tests are a loud skip when QEMU's tools are missing, and fail
//! under CI=true.
//!
//! Run: `cargo test --release --test cli`. `QBM_CLI=PATH` runs the same
//! tests against another build of the binary (`make check-cli` runs them on
//! the installed one, `make bin`'s static `cli`-profile build).

use serde_json::Value;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The binary under test: cargo's build, or `QBM_CLI`.
fn qbm_exe() -> String {
    std::env::var("QBM_CLI").unwrap_or_else(|_| env!("CARGO_BIN_EXE_qbm").to_string())
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

const SUBCOMMANDS: [&str; 14] = [
    "create", "info", "add", "remove", "clear", "enable", "disable", "rename", "merge", "set",
    "reset", "extents", "resize", "check",
];

// ---------------------------------------------------------------------------
// Temp dirs

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "qbm-cli-{}-{}-{label}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir(path)
    }

    /// `name` inside the directory, as a string argument.
    fn file(&self, name: &str) -> String {
        self.0
            .join(name)
            .to_str()
            .expect("temp paths are UTF-8")
            .to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------
// Running qbm

fn describe(program: &str, args: &[&str]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// Runs `qbm ARGS` with backtraces enabled, so a panic could not hide.
fn qbm_output(args: &[&str]) -> Output {
    let exe = qbm_exe();
    Command::new(&exe)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", describe(&exe, args)))
}

fn assert_no_panic(args: &[&str], out: &Output) {
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(
            !all.contains(bad),
            "`{}` printed {bad:?}:\n{all}",
            describe("qbm", args)
        );
    }
}

/// Runs `qbm ARGS`, asserts exit 0 and an empty stderr; returns stdout.
fn ok(args: &[&str]) -> String {
    let out = qbm_output(args);
    assert_no_panic(args, &out);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "`{}` failed:\nstderr: {stderr}\nstdout: {stdout}",
        describe("qbm", args)
    );
    assert!(
        stderr.is_empty(),
        "`{}` succeeded but wrote to stderr: {stderr}",
        describe("qbm", args)
    );
    stdout
}

/// Runs `qbm ARGS` and asserts the failure contract: exit code 1, exactly one
/// line on stderr, starting "qbm: ", containing every string of `names` (the
/// image path, the bitmap name) and, case-insensitively, `cause`; no panic.
/// Returns (the stderr line, stdout).
fn fail(args: &[&str], names: &[&str], cause: &str) -> (String, String) {
    let out = qbm_output(args);
    assert_no_panic(args, &out);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let cmd = describe("qbm", args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "`{cmd}` should exit 1:\nstderr: {stderr}\nstdout: {stdout}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "`{cmd}` must print exactly one line on stderr, printed {}:\n{stderr}",
        lines.len()
    );
    let line = lines[0];
    assert!(
        line.starts_with("qbm: "),
        "`{cmd}`: the error line must start with \"qbm: \": {line}"
    );
    for n in names {
        assert!(
            line.contains(n),
            "`{cmd}`: the error does not name {n:?}: {line}"
        );
    }
    assert!(
        line.to_lowercase().contains(&cause.to_lowercase()),
        "`{cmd}`: the error does not give the cause ({cause:?}): {line}"
    );
    (line.to_string(), stdout)
}

/// `qbm info --count --json IMG`, parsed.
fn info_json(img: &str) -> Value {
    let raw = ok(&["info", "--count", "--json", img]);
    serde_json::from_str(&raw).unwrap_or_else(|e| panic!("qbm info --json: bad JSON ({e}):\n{raw}"))
}

fn json_bitmaps(info: &Value) -> &Vec<Value> {
    info["bitmaps"]
        .as_array()
        .unwrap_or_else(|| panic!("info --json has no \"bitmaps\" array: {info}"))
}

fn bitmap_names(img: &str) -> Vec<String> {
    json_bitmaps(&info_json(img))
        .iter()
        .map(|b| b["name"].as_str().expect("name is a string").to_string())
        .collect()
}

/// What `info --json` must say of one bitmap.
#[derive(Debug, Clone, PartialEq)]
struct Expect {
    granularity: u64,
    enabled: bool,
    in_use: bool,
    usable: bool,
    dirty_bytes: u64,
}

fn bitmap_json<'a>(info: &'a Value, name: &str) -> &'a Value {
    json_bitmaps(info)
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("info --json lists no bitmap {name:?}: {info:#}"))
}

/// Asserts every stable field of bitmap `name` in `info --json`.
fn assert_bitmap(info: &Value, name: &str, e: &Expect) {
    let b = bitmap_json(info, name);
    let got = Expect {
        granularity: b["granularity"]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: granularity is not a number: {b}")),
        enabled: b["enabled"]
            .as_bool()
            .unwrap_or_else(|| panic!("{name}: enabled is not a bool: {b}")),
        in_use: b["in-use"]
            .as_bool()
            .unwrap_or_else(|| panic!("{name}: in-use is not a bool: {b}")),
        usable: b["usable"]
            .as_bool()
            .unwrap_or_else(|| panic!("{name}: usable is not a bool: {b}")),
        dirty_bytes: b["dirty-bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: dirty-bytes is not a number: {b}")),
    };
    assert_eq!(&got, e, "info --json of bitmap {name:?}: {b}");
    assert_eq!(
        b["extra-data-size"].as_u64(),
        Some(0),
        "{name}: extra-data-size: {b}"
    );
}

/// Parses "start length" lines; every line must be exactly two decimal
/// numbers separated by one space.
fn parse_runs(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .map(|l| {
            let parts: Vec<&str> = l.split(' ').collect();
            assert_eq!(
                parts.len(),
                2,
                "extents line is not \"start length\": {l:?}"
            );
            let n = |s: &str| {
                s.parse::<u64>()
                    .unwrap_or_else(|_| panic!("extents line {l:?}: {s:?} is not a number"))
            };
            (n(parts[0]), n(parts[1]))
        })
        .collect()
}

fn runs_text(runs: &[(u64, u64)]) -> String {
    runs.iter().map(|(s, l)| format!("{s} {l}\n")).collect()
}

/// `qbm extents IMG NAME`, parsed.
fn extents(img: &str, name: &str) -> Vec<(u64, u64)> {
    parse_runs(&ok(&["extents", img, name]))
}

// ---------------------------------------------------------------------------
// A model of one bitmap: which granules are dirty.

#[derive(Clone, Debug)]
struct Model {
    size: u64,
    granularity: u64,
    bits: Vec<bool>,
}

impl Model {
    fn new(size: u64, granularity: u64) -> Model {
        Model {
            size,
            granularity,
            bits: vec![false; size.div_ceil(granularity) as usize],
        }
    }

    /// Every granule `[offset, offset+length)` touches becomes dirty.
    fn set(&mut self, offset: u64, length: u64) {
        let end = (offset + length).min(self.size);
        if offset >= end {
            return;
        }
        for g in offset / self.granularity..=(end - 1) / self.granularity {
            self.bits[g as usize] = true;
        }
    }

    /// `[offset, offset+length)` is granule aligned (or ends at the disk end).
    fn reset(&mut self, offset: u64, length: u64) {
        assert_eq!(offset % self.granularity, 0);
        let end = offset + length;
        for g in offset / self.granularity..end.div_ceil(self.granularity) {
            self.bits[g as usize] = false;
        }
    }

    fn clear(&mut self) {
        self.bits.iter_mut().for_each(|b| *b = false);
    }

    /// ORs `other` (of any granularity) in, as QEMU merges.
    fn merge(&mut self, other: &Model) {
        for (s, l) in other.runs() {
            self.set(s, l);
        }
    }

    /// Dirty runs in bytes, adjacent granules joined, the end clipped to the disk.
    fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, &b) in self.bits.iter().enumerate() {
            if !b {
                continue;
            }
            let start = i as u64 * self.granularity;
            let end = (start + self.granularity).min(self.size);
            match out.last_mut() {
                Some((s, l)) if *s + *l == start => *l = end - *s,
                _ => out.push((start, end - start)),
            }
        }
        out
    }

    fn dirty_bytes(&self) -> u64 {
        self.runs().iter().map(|r| r.1).sum()
    }
}

// ---------------------------------------------------------------------------
// Raw header poking (to make a bitmap that was in use when the image was
// opened, as QEMU leaves one after a crash).

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Sets the in_use flag of the first bitmap directory entry.
fn mark_first_bitmap_in_use(path: &str) {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut c0 = vec![0u8; 4096];
    f.read_exact(&mut c0).unwrap();
    assert_eq!(&c0[..4], b"QFI\xfb", "not a qcow2 image");
    let mut at = be32(&c0[100..]) as usize; // header_length (v3)
    loop {
        let magic = be32(&c0[at..]);
        let len = be32(&c0[at + 4..]) as usize;
        assert_ne!(magic, 0, "no bitmaps extension in {path}");
        if magic == 0x2385_2875 {
            let dir = be64(&c0[at + 8 + 16..]);
            let mut flags = [0u8; 4];
            f.seek(SeekFrom::Start(dir + 12)).unwrap();
            f.read_exact(&mut flags).unwrap();
            let v = u32::from_be_bytes(flags) | 1;
            f.seek(SeekFrom::Start(dir + 12)).unwrap();
            f.write_all(&v.to_be_bytes()).unwrap();
            f.sync_all().unwrap();
            return;
        }
        at += 8 + len.div_ceil(8) * 8;
    }
}

// ---------------------------------------------------------------------------
// QEMU's tools

const QEMU_TOOLS: [&str; 4] = ["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"];

fn in_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(tool).is_file()))
}

/// True when QEMU's tools are installed; a loud skip otherwise, a failure
/// under CI=true.
fn have_qemu(test: &str) -> bool {
    for t in QEMU_TOOLS {
        if !in_path(t) {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{t} is missing (CI=true: the QEMU round trips must run)"
            );
            eprintln!("\n******** SKIPPED {test}: {t} is not installed ********\n");
            return false;
        }
    }
    true
}

/// Runs a tool; returns stdout or panics with its stderr.
fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", describe(program, args)));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`{}` failed ({}):\nstderr: {}\nstdout: {stdout}",
        describe(program, args),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn qemu_img(args: &[&str]) -> String {
    tool("qemu-img", args)
}

/// `qemu-io -f qcow2 -c CMD... IMG`; qemu-io reports failed commands on
/// stdout and still exits 0, so its output is checked too.
fn qemu_io(img: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img);
    let out = tool("qemu-io", &args);
    let lower = out.to_lowercase();
    assert!(
        !lower.contains("error") && !lower.contains("failed"),
        "qemu-io {img}: {out}"
    );
}

/// `qemu-img check`: no corruptions, leaks or check errors.
fn qemu_check_clean(img: &str) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", img])
        .stdin(Stdio::null())
        .output()
        .expect("cannot run qemu-img check");
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    let human = || {
        let h = Command::new("qemu-img")
            .args(["check", img])
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&h.stdout),
            String::from_utf8_lossy(&h.stderr)
        )
    };
    assert!(
        out.status.success(),
        "qemu-img check {img} ({}): {raw}\n{}",
        out.status,
        human()
    );
    let v: Value = serde_json::from_str(&raw).expect("qemu-img check JSON");
    for k in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(
            v[k].as_u64().unwrap_or(0),
            0,
            "qemu-img check {img}: {k}\n{raw}\n{}",
            human()
        );
    }
}

fn qemu_info(img: &str) -> Value {
    let raw = qemu_img(&["info", "--output=json", img]);
    serde_json::from_str(&raw).expect("qemu-img info JSON")
}

/// The bitmaps `qemu-img info` lists: (name, granularity, flags).
fn qemu_bitmaps(img: &str) -> Vec<(String, u64, Vec<String>)> {
    let info = qemu_info(img);
    let Some(list) = info["format-specific"]["data"]["bitmaps"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|b| {
            let mut flags: Vec<String> = b["flags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_string())
                .collect();
            flags.sort();
            (
                b["name"].as_str().unwrap().to_string(),
                b["granularity"].as_u64().unwrap(),
                flags,
            )
        })
        .collect()
}

fn qb(name: &str, granularity: u64, flags: &[&str]) -> (String, u64, Vec<String>) {
    let mut f: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    f.sort();
    (name.to_string(), granularity, f)
}

/// A qemu-nbd serving one bitmap of an image read-only; killed on drop.
struct NbdServer {
    child: Child,
    socket: PathBuf,
}

impl NbdServer {
    fn start(img: &str, bitmap: &str, socket: &Path) -> NbdServer {
        let _ = fs::remove_file(socket);
        let child = Command::new("qemu-nbd")
            .args(["-r", "-t", "-f", "qcow2", "-B", bitmap])
            .arg(format!("--socket={}", socket.display()))
            .arg(img)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start qemu-nbd");
        let mut server = NbdServer {
            child,
            socket: socket.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                let mut err = String::new();
                if let Some(e) = server.child.stderr.as_mut() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("qemu-nbd -B {bitmap} {img} exited ({status}): {err}");
            }
            assert!(
                Instant::now() < deadline,
                "qemu-nbd did not listen on {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.socket);
    }
}

/// The dirty runs of bitmap `name` as QEMU exports them: `nbdinfo --map`
/// lines described "dirty", adjacent runs merged.
fn nbd_dirty_runs(dir: &TempDir, img: &str, name: &str) -> Vec<(u64, u64)> {
    let socket = dir.0.join("nbd.sock");
    let server = NbdServer::start(img, name, &socket);
    let map = tool(
        "nbdinfo",
        &[&format!("--map=qemu:dirty-bitmap:{name}"), &server.uri()],
    );
    drop(server);
    let mut out: Vec<(u64, u64)> = Vec::new();
    for line in map.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() >= 3, "unexpected nbdinfo --map line: {line:?}");
        let desc = f[3..].join(" ");
        if desc != "dirty" {
            continue;
        }
        let start: u64 = f[0].parse().unwrap();
        let len: u64 = f[1].parse().unwrap();
        match out.last_mut() {
            Some((s, l)) if *s + *l == start => *l += len,
            _ => out.push((start, len)),
        }
    }
    out
}

/// `qbm extents` equals nbdinfo's dirty extents byte for byte (and `expected`).
fn assert_extents_match_qemu(dir: &TempDir, img: &str, name: &str, expected: &[(u64, u64)]) {
    let ours = ok(&["extents", img, name]);
    let qemu = runs_text(&nbd_dirty_runs(dir, img, name));
    assert_eq!(ours, qemu, "qbm extents {img} {name} vs nbdinfo --map");
    assert_eq!(
        ours,
        runs_text(expected),
        "qbm extents {img} {name} vs model"
    );
}

// ---------------------------------------------------------------------------
// --help, --version, usage

#[test]
fn help_of_every_subcommand() {
    let top = ok(&["--help"]);
    for sub in SUBCOMMANDS {
        assert!(top.contains(sub), "qbm --help does not list {sub}:\n{top}");
        for flag in ["--help", "-h"] {
            let out = ok(&[sub, flag]);
            assert!(
                out.contains(&format!("Usage: qbm {sub}")),
                "qbm {sub} {flag}:\n{out}"
            );
        }
        ok(&["help", sub]);
    }
    let v = ok(&["--version"]);
    assert_eq!(v.trim(), format!("qbm {}", env!("CARGO_PKG_VERSION")));
    // Options the issue names are documented.
    assert!(ok(&["create", "--help"]).contains("--cluster-size"));
    assert!(ok(&["create", "--help"]).contains("--refcount-bits"));
    assert!(ok(&["info", "--help"]).contains("--json"));
    assert!(ok(&["add", "--help"]).contains("--disable"));
    assert!(ok(&["add", "--help"]).contains("-g"));
    assert!(ok(&["merge", "--help"]).contains("-b"));
    let ext = ok(&["extents", "--help"]);
    for o in ["--json", "--offset", "--length"] {
        assert!(ext.contains(o), "extents --help lacks {o}");
    }
    assert!(ok(&["check", "--help"]).contains("--json"));
}

/// Usage errors (bad size, missing or unknown argument) fail like every other
/// error: exit 1 and one line on stderr starting "qbm: ".
#[test]
fn usage_errors_are_one_line() {
    let dir = TempDir::new("usage");
    let img = dir.file("u.qcow2");
    ok(&["create", &img, "1M"]);
    ok(&["add", &img, "bm-u"]);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["create", &img, "1x"], "1x"),
        (vec!["create", "--cluster-size", "64q", &img, "1M"], "64q"),
        (vec!["add", "-g", "12x", &img, "bm-v"], "12x"),
        (vec!["set", &img, "bm-u", "0", "-5"], "-5"),
        (vec!["set", &img, "bm-u", "banana", "1"], "banana"),
        (vec!["reset", &img, "bm-u", "0", "1.2.3"], "1.2.3"),
        (vec!["extents", "--offset", "1y", &img, "bm-u"], "1y"),
        (vec!["create", &img], "size"),
        (vec!["rename", &img, "bm-u"], "new"),
        (vec!["info", "--bogus", &img], "--bogus"),
        (
            vec!["extents", "--length", "4096", &img, "bm-u"],
            "--offset",
        ),
    ];
    for (args, what) in &cases {
        fail(args, &[], what);
    }
    // No subcommand, or an unknown one: a failure with a message.
    for args in [vec![], vec!["frobnicate", img.as_str()]] {
        let out = qbm_output(&args);
        assert_no_panic(&args, &out);
        assert_eq!(out.status.code(), Some(1), "qbm {args:?}");
        assert!(!out.stderr.is_empty(), "qbm {args:?}: nothing on stderr");
    }
    // Nothing changed.
    assert_eq!(bitmap_names(&img), ["bm-u"]);
}

// ---------------------------------------------------------------------------
// create and sizes

#[test]
fn create_defaults_and_info() {
    let dir = TempDir::new("create");
    let img = dir.file("c.qcow2");
    assert_eq!(ok(&["create", &img, "1G"]), "");
    let v = info_json(&img);
    assert_eq!(v["filename"], img.as_str());
    assert_eq!(v["virtual-size"], GIB);
    assert_eq!(v["cluster-size"], 65536);
    assert_eq!(v["refcount-bits"], 16);
    assert_eq!(v["version"], 3);
    assert!(v["backing-filename"].is_null(), "{v}");
    assert_eq!(json_bitmaps(&v).len(), 0);

    let text = ok(&["info", &img]);
    assert!(text.contains(&img), "{text}");
    assert!(text.contains("(1073741824 bytes)"), "{text}");
    assert!(text.contains("65536"), "{text}");

    // Options and every suffix spelling qemu-img accepts.
    let cases: [(&[&str], u64, u64, u64); 7] = [
        (
            &["--cluster-size", "4k", "--refcount-bits", "8"],
            64 * MIB,
            4096,
            8,
        ),
        (
            &["--cluster-size", "512", "--refcount-bits", "1"],
            1536 * MIB,
            512,
            1,
        ),
        (
            &["--cluster-size", "2M", "--refcount-bits", "64"],
            2 * GIB,
            2 * MIB,
            64,
        ),
        (&["--cluster-size", "64K"], 100 * KIB, 65536, 16),
        (&["--refcount-bits", "32"], 3 * TIB, 65536, 32),
        // Rounded up to 512 bytes, as qemu-img does (1000000 -> 1000448).
        (&[], 1_000_448, 65536, 16),
        (&[], 0, 65536, 16),
    ];
    let sizes = ["64M", "1.5G", "2G", "100k", "3T", "1000000", "0"];
    for (i, ((opts, size, cs, rb), size_arg)) in cases.iter().zip(sizes).enumerate() {
        let p = dir.file(&format!("opt{i}.qcow2"));
        let mut args = vec!["create"];
        args.extend_from_slice(opts);
        args.push(&p);
        args.push(size_arg);
        ok(&args);
        let v = info_json(&p);
        assert_eq!(v["virtual-size"], *size, "{args:?}: {v}");
        assert_eq!(v["cluster-size"], *cs, "{args:?}: {v}");
        assert_eq!(v["refcount-bits"], *rb, "{args:?}: {v}");
        assert_eq!(v["version"], 3);
        ok(&["check", &p]);
    }
}

#[test]
fn create_16t_is_sparse() {
    let dir = TempDir::new("sparse");
    let img = dir.file("big.qcow2");
    ok(&["create", &img, "16T"]);
    let meta = fs::metadata(&img).unwrap();
    assert!(
        meta.blocks() * 512 < 64 * MIB,
        "a 16T image uses {} bytes on disk",
        meta.blocks() * 512
    );
    assert!(
        meta.len() < 64 * MIB,
        "a 16T image is {} bytes long",
        meta.len()
    );
    assert_eq!(info_json(&img)["virtual-size"], 16 * TIB);
    // A bitmap near the end of it.
    ok(&["add", "-g", "1M", &img, "bm-big"]);
    ok(&["set", &img, "bm-big", "15T", "1"]);
    ok(&["set", &img, "bm-big", &(16 * TIB - 1).to_string(), "1"]);
    assert_eq!(
        extents(&img, "bm-big"),
        [(15 * TIB, MIB), (16 * TIB - MIB, MIB)]
    );
    assert!(fs::metadata(&img).unwrap().blocks() * 512 < 64 * MIB);
}

#[test]
fn create_errors() {
    let dir = TempDir::new("create-err");
    let img = dir.file("e.qcow2");
    ok(&["create", &img, "1M"]);
    let before = fs::read(&img).unwrap();
    fail(&["create", &img, "2M"], &[&img], "exist");
    assert_eq!(fs::read(&img).unwrap(), before, "create overwrote an image");

    let bad = dir.file("bad.qcow2");
    fail(
        &["create", "--cluster-size", "3k", &bad, "1M"],
        &[&bad],
        "cluster",
    );
    fail(
        &["create", "--cluster-size", "4M", &bad, "1M"],
        &[&bad],
        "cluster",
    );
    fail(
        &["create", "--cluster-size", "256", &bad, "1M"],
        &[&bad],
        "cluster",
    );
    fail(
        &["create", "--refcount-bits", "3", &bad, "1M"],
        &[&bad],
        "refcount",
    );
    fail(
        &["create", "--refcount-bits", "128", &bad, "1M"],
        &[&bad],
        "refcount",
    );
    assert!(!Path::new(&bad).exists(), "a failed create left {bad}");
    let nodir = dir.file("no/such/dir/x.qcow2");
    fail(&["create", &nodir, "1M"], &[&nodir], "no such file");
}

// ---------------------------------------------------------------------------
// info

#[test]
fn info_lists_every_bitmap() {
    let dir = TempDir::new("info");
    let img = dir.file("i.qcow2");
    let size = 256 * MIB;
    ok(&["create", &img, "256M"]);
    ok(&["add", &img, "bm-default"]);
    ok(&["add", "-g", "512k", "--disable", &img, "bm-frozen"]);
    ok(&["add", "--granularity", "4K", &img, "bm-fine"]);
    ok(&["set", &img, "bm-default", "1M", "1"]);
    ok(&["set", &img, "bm-frozen", "0", "600k"]);
    ok(&["set", &img, "bm-fine", "4095", "2"]);

    let v = info_json(&img);
    assert_eq!(v["filename"], img.as_str());
    assert_eq!(v["virtual-size"], size);
    let names: Vec<&str> = json_bitmaps(&v)
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["bm-default", "bm-frozen", "bm-fine"],
        "directory order"
    );
    let e = |granularity, enabled, dirty_bytes| Expect {
        granularity,
        enabled,
        in_use: false,
        usable: true,
        dirty_bytes,
    };
    assert_bitmap(&v, "bm-default", &e(65536, true, 65536));
    assert_bitmap(&v, "bm-frozen", &e(524288, false, 1024 * KIB));
    assert_bitmap(&v, "bm-fine", &e(4096, true, 8192));
    // The stable field names, all present.
    for b in json_bitmaps(&v) {
        for k in [
            "name",
            "granularity",
            "enabled",
            "in-use",
            "usable",
            "dirty-bytes",
            "extra-data-size",
        ] {
            assert!(b.get(k).is_some(), "bitmap lacks {k:?}: {b}");
        }
    }
    for k in [
        "filename",
        "virtual-size",
        "cluster-size",
        "refcount-bits",
        "version",
        "backing-filename",
        "bitmaps",
    ] {
        assert!(v.get(k).is_some(), "info --json lacks {k:?}: {v}");
    }

    let text = ok(&["info", &img]);
    for n in ["bm-default", "bm-frozen", "bm-fine", "524288", "disabled"] {
        assert!(text.contains(n), "info lacks {n}:\n{text}");
    }
    // Counting reads every bitmap's data: only with --count.
    assert!(!text.contains("DIRTY BYTES"), "{text}");
    let counted = ok(&["info", "--count", &img]);
    assert!(counted.contains("DIRTY BYTES"), "{counted}");
    assert!(counted.contains(&(1024 * KIB).to_string()), "{counted}");
    let plain: Value = serde_json::from_str(&ok(&["info", "--json", &img])).unwrap();
    for b in json_bitmaps(&plain) {
        assert!(
            b.get("dirty-bytes").is_none(),
            "uncounted info has dirty-bytes: {b}"
        );
    }

    // QEMU's default granularity: the cluster size within [4k, 64k].
    for (cs, want) in [("512", 4096), ("4k", 4096), ("16k", 16384), ("2M", 65536)] {
        let p = dir.file(&format!("g{cs}.qcow2"));
        ok(&["create", "--cluster-size", cs, &p, "64M"]);
        ok(&["add", &p, "bm-d"]);
        assert_eq!(
            bitmap_json(&info_json(&p), "bm-d")["granularity"],
            want,
            "cluster size {cs}"
        );
    }
}

#[test]
fn info_errors() {
    let dir = TempDir::new("info-err");
    let missing = dir.file("missing.qcow2");
    fail(&["info", &missing], &[&missing], "no such file");
    fail(&["info", "--json", &missing], &[&missing], "no such file");

    let raw = dir.file("raw.img");
    fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    fail(&["info", &raw], &[&raw], "");

    let empty = dir.file("empty.img");
    fs::write(&empty, b"").unwrap();
    fail(&["info", &empty], &[&empty], "");

    // A qcow2 header cut short.
    let img = dir.file("cut.qcow2");
    ok(&["create", &img, "1M"]);
    let bytes = fs::read(&img).unwrap();
    let cut = dir.file("cut-short.qcow2");
    fs::write(&cut, &bytes[..50]).unwrap();
    fail(&["info", &cut], &[&cut], "");

    let d = dir.file("");
    fail(&["info", &d], &[d.trim_end_matches('/')], "");
}

// ---------------------------------------------------------------------------
// add, remove

#[test]
fn add_and_errors() {
    let dir = TempDir::new("add");
    let img = dir.file("a.qcow2");
    ok(&["create", &img, "64M"]);
    assert_eq!(ok(&["add", "-g", "512k", &img, "bm-a"]), "");
    ok(&["add", "--disable", &img, "bm-b"]);
    ok(&["add", "-g", "2M", "--disable", &img, "bm-c"]);
    let v = info_json(&img);
    let e = |granularity, enabled| Expect {
        granularity,
        enabled,
        in_use: false,
        usable: true,
        dirty_bytes: 0,
    };
    assert_bitmap(&v, "bm-a", &e(512 * KIB, true));
    assert_bitmap(&v, "bm-b", &e(65536, false));
    assert_bitmap(&v, "bm-c", &e(2 * MIB, false));
    assert_eq!(ok(&["extents", &img, "bm-a"]), "");

    fail(&["add", &img, "bm-a"], &[&img, "bm-a"], "exist");
    fail(
        &["add", "-g", "3k", &img, "bm-odd"],
        &[&img, "bm-odd"],
        "granularity",
    );
    fail(
        &["add", "-g", "256", &img, "bm-tiny"],
        &[&img, "bm-tiny"],
        "granularity",
    );
    fail(
        &["add", "-g", "4G", &img, "bm-huge"],
        &[&img, "bm-huge"],
        "granularity",
    );
    fail(&["add", &img, ""], &[&img], "empty");
    let long = "n".repeat(1024);
    fail(&["add", &img, &long], &[&img], "name");
    let missing = dir.file("missing.qcow2");
    fail(&["add", &missing, "bm-x"], &[&missing], "no such file");
    assert_eq!(bitmap_names(&img), ["bm-a", "bm-b", "bm-c"]);
}

#[test]
fn remove_and_errors() {
    let dir = TempDir::new("remove");
    let img = dir.file("r.qcow2");
    ok(&["create", &img, "64M"]);
    for n in ["bm-1", "bm-2", "bm-3"] {
        ok(&["add", &img, n]);
        ok(&["set", &img, n, "0", "64M"]);
    }
    assert_eq!(ok(&["remove", &img, "bm-2"]), "");
    assert_eq!(bitmap_names(&img), ["bm-1", "bm-3"]);
    assert_eq!(extents(&img, "bm-3"), [(0, 64 * MIB)]);
    fail(&["remove", &img, "bm-2"], &[&img, "bm-2"], "not found");
    fail(&["extents", &img, "bm-2"], &[&img, "bm-2"], "not found");
    ok(&["remove", &img, "bm-1"]);
    ok(&["remove", &img, "bm-3"]);
    assert!(bitmap_names(&img).is_empty());
    let missing = dir.file("missing.qcow2");
    fail(&["remove", &missing, "bm-1"], &[&missing], "no such file");
}

// ---------------------------------------------------------------------------
// clear, enable, disable, rename

#[test]
fn clear_and_errors() {
    let dir = TempDir::new("clear");
    let img = dir.file("c.qcow2");
    ok(&["create", &img, "64M"]);
    ok(&["add", &img, "bm-keep"]);
    ok(&["add", &img, "bm-wipe"]);
    ok(&["set", &img, "bm-keep", "1M", "1M"]);
    ok(&["set", &img, "bm-wipe", "1M", "1M"]);
    assert_eq!(ok(&["clear", &img, "bm-wipe"]), "");
    assert_eq!(ok(&["extents", &img, "bm-wipe"]), "");
    let v = info_json(&img);
    assert_eq!(bitmap_json(&v, "bm-wipe")["dirty-bytes"], 0);
    assert_eq!(bitmap_json(&v, "bm-wipe")["enabled"], true);
    assert_eq!(bitmap_json(&v, "bm-keep")["dirty-bytes"], MIB);
    fail(&["clear", &img, "bm-nope"], &[&img, "bm-nope"], "not found");
}

#[test]
fn enable_disable_and_errors() {
    let dir = TempDir::new("enable");
    let img = dir.file("e.qcow2");
    ok(&["create", &img, "64M"]);
    ok(&["add", &img, "bm-on"]);
    ok(&["add", "--disable", &img, "bm-off"]);
    ok(&["set", &img, "bm-off", "0", "1"]);
    let enabled = |n: &str| {
        bitmap_json(&info_json(&img), n)["enabled"]
            .as_bool()
            .unwrap()
    };
    assert!(enabled("bm-on") && !enabled("bm-off"));
    assert_eq!(ok(&["disable", &img, "bm-on"]), "");
    assert_eq!(ok(&["enable", &img, "bm-off"]), "");
    assert!(!enabled("bm-on") && enabled("bm-off"));
    // Idempotent.
    ok(&["disable", &img, "bm-on"]);
    ok(&["enable", &img, "bm-off"]);
    assert!(!enabled("bm-on") && enabled("bm-off"));
    // The bits are kept.
    assert_eq!(extents(&img, "bm-off"), [(0, 65536)]);
    fail(
        &["enable", &img, "bm-nope"],
        &[&img, "bm-nope"],
        "not found",
    );
    fail(
        &["disable", &img, "bm-nope"],
        &[&img, "bm-nope"],
        "not found",
    );
}

#[test]
fn rename_and_errors() {
    let dir = TempDir::new("rename");
    let img = dir.file("n.qcow2");
    ok(&["create", &img, "64M"]);
    ok(&["add", "-g", "128k", "--disable", &img, "bm-old"]);
    ok(&["add", &img, "bm-other"]);
    ok(&["set", &img, "bm-old", "300k", "1"]);
    assert_eq!(ok(&["rename", &img, "bm-old", "bm-new"]), "");
    assert_eq!(bitmap_names(&img), ["bm-new", "bm-other"]);
    assert_bitmap(
        &info_json(&img),
        "bm-new",
        &Expect {
            granularity: 128 * KIB,
            enabled: false,
            in_use: false,
            usable: true,
            dirty_bytes: 128 * KIB,
        },
    );
    assert_eq!(extents(&img, "bm-new"), [(256 * KIB, 128 * KIB)]);
    fail(
        &["rename", &img, "bm-old", "bm-x"],
        &[&img, "bm-old"],
        "not found",
    );
    fail(
        &["rename", &img, "bm-new", "bm-other"],
        &[&img, "bm-other"],
        "exist",
    );
    assert_eq!(bitmap_names(&img), ["bm-new", "bm-other"]);
}

// ---------------------------------------------------------------------------
// merge

#[test]
fn merge_and_errors() {
    let dir = TempDir::new("merge");
    let img = dir.file("m.qcow2");
    let other = dir.file("other.qcow2");
    let size = 64 * MIB;
    ok(&["create", &img, "64M"]);
    ok(&["create", &other, "64M"]);
    ok(&["add", "-g", "4k", &img, "bm-src"]);
    ok(&["add", "-g", "1M", &img, "bm-dst"]);
    ok(&["add", "-g", "64k", &other, "bm-far"]);
    let mut src = Model::new(size, 4096);
    let mut dst = Model::new(size, MIB);
    let mut far = Model::new(size, 65536);
    for (o, l) in [(0, 1), (3 * MIB + 5, 4096), (10 * MIB, 3 * MIB)] {
        ok(&["set", &img, "bm-src", &o.to_string(), &l.to_string()]);
        src.set(o, l);
    }
    ok(&["set", &img, "bm-dst", "20M", "1"]);
    dst.set(20 * MIB, 1);
    ok(&["set", &other, "bm-far", "40M", "65537"]);
    far.set(40 * MIB, 65537);

    // Same image.
    assert_eq!(ok(&["merge", "bm-src", &img, "bm-dst"]), "");
    dst.merge(&src);
    assert_eq!(extents(&img, "bm-dst"), dst.runs());
    assert_eq!(extents(&img, "bm-src"), src.runs(), "the source changed");
    // -b naming the same image.
    ok(&["merge", "-b", &img, "bm-dst", &img, "bm-src"]);
    src.merge(&dst);
    assert_eq!(extents(&img, "bm-src"), src.runs());
    // Another image.
    ok(&["merge", "-b", &other, "bm-far", &img, "bm-dst"]);
    dst.merge(&far);
    assert_eq!(extents(&img, "bm-dst"), dst.runs());
    assert_eq!(extents(&other, "bm-far"), far.runs());
    assert_eq!(
        bitmap_json(&info_json(&img), "bm-dst")["dirty-bytes"],
        dst.dirty_bytes()
    );

    fail(
        &["merge", "bm-nope", &img, "bm-dst"],
        &[&img, "bm-nope"],
        "not found",
    );
    fail(
        &["merge", "bm-src", &img, "bm-nope"],
        &[&img, "bm-nope"],
        "not found",
    );
    fail(
        &["merge", "-b", &other, "bm-src", &img, "bm-dst"],
        &[&other, "bm-src"],
        "not found",
    );
    let missing = dir.file("missing.qcow2");
    fail(
        &["merge", "-b", &missing, "bm-far", &img, "bm-dst"],
        &[&missing],
        "no such file",
    );
    let small = dir.file("small.qcow2");
    ok(&["create", &small, "32M"]);
    ok(&["add", &small, "bm-small"]);
    fail(
        &["merge", "-b", &small, "bm-small", &img, "bm-dst"],
        &[&img, "bm-small", "bm-dst"],
        "",
    );
    assert_eq!(
        extents(&img, "bm-dst"),
        dst.runs(),
        "a failed merge changed bits"
    );
}

// ---------------------------------------------------------------------------
// set, reset, extents

#[test]
fn set_reset_extents() {
    let dir = TempDir::new("set");
    let img = dir.file("s.qcow2");
    // Not a multiple of the granularity: the last granule is partial.
    let size = 100 * MIB + 512;
    ok(&["create", &img, &size.to_string()]);
    ok(&["add", "-g", "64k", &img, "bm-s"]);
    let mut m = Model::new(size, 65536);
    let sets: [(&str, &str); 8] = [
        ("0", "1"),
        ("65535", "2"),
        ("1M", "64k"),
        ("1114112", "65536"),
        ("5M", "1.5M"),
        ("50M", "0"),
        ("104857600", "512"),
        ("99M", "1"),
    ];
    for (o, l) in sets {
        assert_eq!(ok(&["set", &img, "bm-s", o, l]), "");
        m.set(size_of(o), size_of(l));
    }
    let want = m.runs();
    assert_eq!(
        want,
        [
            (0, 131072),
            (MIB, 131072),
            (5 * MIB, 1536 * KIB),
            (99 * MIB, 65536),
            (100 * MIB, 512)
        ]
    );
    let text = ok(&["extents", &img, "bm-s"]);
    assert_eq!(text, runs_text(&want));
    assert_eq!(
        bitmap_json(&info_json(&img), "bm-s")["dirty-bytes"],
        m.dirty_bytes()
    );

    // JSON: an array of {start, length}, in order.
    let j: Value = serde_json::from_str(&ok(&["extents", "--json", &img, "bm-s"])).unwrap();
    let got: Vec<(u64, u64)> = j
        .as_array()
        .expect("extents --json is an array")
        .iter()
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(got, want);

    // A window: runs clipped to [offset, offset+length).
    let window = |o: &str, l: Option<&str>| {
        let mut args = vec!["extents", "--offset", o];
        if let Some(l) = l {
            args.extend(["--length", l]);
        }
        args.extend([img.as_str(), "bm-s"]);
        parse_runs(&ok(&args))
    };
    assert_eq!(window("65536", Some("1M")), [(65536, 65536), (MIB, 65536)]);
    assert_eq!(window("1M", Some("64k")), [(MIB, 65536)]);
    assert_eq!(window("5M", None), want[2..].to_vec());
    assert_eq!(window("6M", Some("1")), [(6 * MIB, 1)]);
    assert!(window("2M", Some("3M")).is_empty());
    assert!(window(&size.to_string(), None).is_empty());

    // reset: granule aligned, or up to the end of the disk.
    assert_eq!(ok(&["reset", &img, "bm-s", "5M", "512k"]), "");
    m.reset(5 * MIB, 512 * KIB);
    ok(&["reset", &img, "bm-s", "100M", "512"]);
    m.reset(100 * MIB, 512);
    ok(&["reset", &img, "bm-s", "0", "64k"]);
    m.reset(0, 65536);
    assert_eq!(extents(&img, "bm-s"), m.runs());
    assert_eq!(
        extents(&img, "bm-s"),
        [
            (65536, 65536),
            (MIB, 131072),
            (5 * MIB + 512 * KIB, MIB),
            (99 * MIB, 65536)
        ]
    );

    // An empty bitmap: nothing, and "[]".
    ok(&["add", &img, "bm-empty"]);
    assert_eq!(ok(&["extents", &img, "bm-empty"]), "");
    let j: Value = serde_json::from_str(&ok(&["extents", "--json", &img, "bm-empty"])).unwrap();
    assert_eq!(j, serde_json::json!([]));

    // Errors name the image and the bitmap.
    let past = (size - 1).to_string();
    fail(&["set", &img, "bm-s", &past, "2"], &[&img, "bm-s"], "end");
    fail(&["set", &img, "bm-s", "200M", "1"], &[&img, "bm-s"], "end");
    fail(&["reset", &img, "bm-s", &past, "2"], &[&img, "bm-s"], "end");
    fail(
        &["set", &img, "bm-nope", "0", "1"],
        &[&img, "bm-nope"],
        "not found",
    );
    fail(
        &["reset", &img, "bm-nope", "0", "64k"],
        &[&img, "bm-nope"],
        "not found",
    );
    fail(
        &["reset", &img, "bm-s", "1", "64k"],
        &[&img, "bm-s"],
        "align",
    );
    fail(
        &["reset", &img, "bm-s", "0", "1000"],
        &[&img, "bm-s"],
        "align",
    );
    fail(
        &["extents", &img, "bm-nope"],
        &[&img, "bm-nope"],
        "not found",
    );
    fail(
        &["extents", "--json", &img, "bm-nope"],
        &[&img, "bm-nope"],
        "not found",
    );
    let missing = dir.file("missing.qcow2");
    fail(
        &["set", &missing, "bm-s", "0", "1"],
        &[&missing],
        "no such file",
    );
    fail(&["extents", &missing, "bm-s"], &[&missing], "no such file");
    assert_eq!(
        extents(&img, "bm-s"),
        m.runs(),
        "a failed call changed bits"
    );
}

/// "64k" -> 65536, as qemu-img reads sizes.
fn size_of(s: &str) -> u64 {
    let (num, mult) = match s.chars().last().unwrap() {
        'k' | 'K' => (&s[..s.len() - 1], KIB),
        'M' => (&s[..s.len() - 1], MIB),
        'G' => (&s[..s.len() - 1], GIB),
        'T' => (&s[..s.len() - 1], TIB),
        _ => (s, 1),
    };
    match num.parse::<u64>() {
        Ok(n) => n * mult,
        Err(_) => (num.parse::<f64>().unwrap() * mult as f64) as u64,
    }
}

// ---------------------------------------------------------------------------
// check, inconsistent bitmaps, garbage

#[test]
fn check_and_errors() {
    let dir = TempDir::new("check");
    let img = dir.file("k.qcow2");
    ok(&["create", &img, "64M"]);
    ok(&["add", &img, "bm-k"]);
    let text = ok(&["check", &img]);
    assert!(text.to_lowercase().contains("no errors"), "{text}");
    let v: Value = serde_json::from_str(&ok(&["check", "--json", &img])).unwrap();
    assert_eq!(v["filename"], img.as_str());
    assert_eq!(v["check-errors"], 0);

    let garbage = dir.file("garbage.qcow2");
    let mut bytes = fs::read(&img).unwrap();
    bytes[4..8].copy_from_slice(&[0, 0, 0, 9]); // version 9
    fs::write(&garbage, &bytes).unwrap();
    fail(&["check", &garbage], &[&garbage], "");
    let (_, stdout) = fail(&["check", "--json", &garbage], &[&garbage], "");
    let v: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("check --json of a bad image: bad JSON ({e}): {stdout}"));
    assert_eq!(v["filename"], garbage.as_str());
    assert_ne!(v["check-errors"], 0, "{v}");

    let missing = dir.file("missing.qcow2");
    fail(&["check", &missing], &[&missing], "no such file");
}

/// check lists inconsistent bitmaps; --repair removes them and keeps the rest.
#[test]
fn check_repair_removes_inconsistent_bitmaps() {
    let dir = TempDir::new("repair");
    let img = dir.file("r.qcow2");
    ok(&["create", &img, "64M"]);
    ok(&["add", &img, "bm-crashed"]);
    ok(&["add", &img, "bm-fine"]);
    ok(&["set", &img, "bm-fine", "1M", "1"]);
    mark_first_bitmap_in_use(&img);

    let text = ok(&["check", &img]);
    assert!(text.contains("'bm-crashed' is inconsistent"), "{text}");
    let v: Value = serde_json::from_str(&ok(&["check", "--json", &img])).unwrap();
    assert_eq!(v["inconsistent-bitmaps"], serde_json::json!(["bm-crashed"]));
    assert_eq!(v["removed-bitmaps"], serde_json::json!([]));
    assert_eq!(
        bitmap_names(&img),
        ["bm-crashed", "bm-fine"],
        "check alone changes nothing"
    );

    let v: Value = serde_json::from_str(&ok(&["check", "--json", "--repair", &img])).unwrap();
    assert_eq!(v["removed-bitmaps"], serde_json::json!(["bm-crashed"]));
    assert_eq!(bitmap_names(&img), ["bm-fine"]);
    assert_eq!(extents(&img, "bm-fine"), [(MIB, 65536)]);
    let text = ok(&["check", &img]);
    assert!(!text.contains("inconsistent"), "{text}");
    if have_qemu("check_repair_removes_inconsistent_bitmaps") {
        qemu_check_clean(&img);
    }
}

/// A bitmap left in use (as after a crash) is listed as such, cannot be
/// read or changed, and can be removed.
#[test]
fn in_use_bitmap() {
    let dir = TempDir::new("inuse");
    let img = dir.file("u.qcow2");
    ok(&["create", &img, "64M"]);
    ok(&["add", &img, "bm-crashed"]);
    ok(&["add", &img, "bm-fine"]);
    ok(&["set", &img, "bm-crashed", "0", "1"]);
    ok(&["set", &img, "bm-fine", "1M", "1"]);
    mark_first_bitmap_in_use(&img);

    let v = info_json(&img);
    let b = bitmap_json(&v, "bm-crashed");
    assert_eq!(b["in-use"], true, "{b}");
    assert_eq!(b["usable"], false, "{b}");
    // Its bits cannot be trusted, so none are counted.
    assert!(b["dirty-bytes"].is_null(), "{b}");
    assert_eq!(bitmap_json(&v, "bm-fine")["in-use"], false);
    assert!(ok(&["info", &img]).contains("in-use"));
    for op in ["extents", "clear", "enable", "disable"] {
        fail(&[op, &img, "bm-crashed"], &[&img, "bm-crashed"], "");
    }
    fail(
        &["set", &img, "bm-crashed", "0", "1"],
        &[&img, "bm-crashed"],
        "",
    );
    fail(
        &["merge", "bm-crashed", &img, "bm-fine"],
        &[&img, "bm-crashed"],
        "",
    );
    fail(
        &["rename", &img, "bm-crashed", "bm-x"],
        &[&img, "bm-crashed"],
        "",
    );
    assert_eq!(extents(&img, "bm-fine"), [(MIB, 65536)]);
    ok(&["remove", &img, "bm-crashed"]);
    assert_eq!(bitmap_names(&img), ["bm-fine"]);
    assert_eq!(extents(&img, "bm-fine"), [(MIB, 65536)]);
    ok(&["check", &img]);
}

/// Whatever is handed to it, qbm fails with one line, never a panic.
#[test]
fn hostile_inputs_never_panic() {
    let dir = TempDir::new("hostile");
    let img = dir.file("h.qcow2");
    ok(&["create", &img, "8M"]);
    ok(&["add", &img, "bm-h"]);
    ok(&["set", &img, "bm-h", "0", "8M"]);
    let good = fs::read(&img).unwrap();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for i in 0..40 {
        let p = dir.file(&format!("h{i}.qcow2"));
        let mut bytes = good.clone();
        match i % 4 {
            0 => bytes.truncate((next() % good.len() as u64) as usize),
            _ => {
                // Flip bytes in the header cluster and the metadata after it.
                for _ in 0..1 + next() % 8 {
                    let at = (next() % (4 * 65536).min(good.len() as u64)) as usize;
                    bytes[at] ^= 1 << (next() % 8);
                }
            }
        }
        fs::write(&p, &bytes).unwrap();
        for args in [
            vec!["info", "--json", p.as_str()],
            vec!["check", p.as_str()],
            vec!["extents", p.as_str(), "bm-h"],
            vec!["set", p.as_str(), "bm-h", "0", "1"],
        ] {
            let out = qbm_output(&args);
            assert_no_panic(&args, &out);
            let code = out.status.code();
            // check exits 2 (corruptions) or 3 (leaks) like qemu-img check.
            let check_verdict = args[0] == "check" && matches!(code, Some(2) | Some(3));
            assert!(
                code == Some(0) || code == Some(1) || check_verdict,
                "`{}`: exit {code:?}",
                describe("qbm", &args)
            );
            if code == Some(1) {
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
                assert!(stderr.starts_with("qbm: "), "{args:?}: {stderr}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Round trips with QEMU

/// qbm creates and changes; QEMU checks, lists, changes; qbm reads QEMU's result.
#[test]
fn qemu_round_trip_from_qbm() {
    if !have_qemu("qemu_round_trip_from_qbm") {
        return;
    }
    let dir = TempDir::new("rt-qbm");
    let img = dir.file("q.qcow2");
    let size = GIB + 512 * KIB;
    ok(&["create", &img, &size.to_string()]);
    ok(&["add", "-g", "64k", &img, "alpha"]);
    ok(&["add", "-g", "512k", "--disable", &img, "beta"]);
    let mut alpha = Model::new(size, 65536);
    let mut beta = Model::new(size, 512 * KIB);
    for (o, l) in [
        (0, 1),
        (MIB, 65536),
        (5 * MIB + 100, 200 * KIB),
        (size - 1, 1),
    ] {
        ok(&["set", &img, "alpha", &o.to_string(), &l.to_string()]);
        alpha.set(o, l);
    }
    for (o, l) in [(2 * MIB, 1), (100 * MIB, 3 * MIB)] {
        ok(&["set", &img, "beta", &o.to_string(), &l.to_string()]);
        beta.set(o, l);
    }

    qemu_check_clean(&img);
    assert_eq!(
        qemu_bitmaps(&img),
        [qb("alpha", 65536, &["auto"]), qb("beta", 512 * KIB, &[])]
    );
    let qi = qemu_info(&img);
    assert_eq!(qi["virtual-size"], size);
    assert_extents_match_qemu(&dir, &img, "alpha", &alpha.runs());
    assert_extents_match_qemu(&dir, &img, "beta", &beta.runs());

    // QEMU changes them.
    qemu_img(&["bitmap", "--merge", "alpha", &img, "beta"]);
    beta.merge(&alpha);
    qemu_img(&["bitmap", "--clear", &img, "alpha"]);
    alpha.clear();
    qemu_img(&["bitmap", "--add", "-g", "128k", &img, "gamma"]);
    let mut gamma = Model::new(size, 128 * KIB);
    qemu_img(&["bitmap", "--enable", &img, "beta"]);
    qemu_img(&["bitmap", "--disable", &img, "alpha"]);
    // Guest writes mark the enabled ones (beta, gamma), not alpha.
    qemu_io(&img, &["write 300M 4k", "write 1000000 1"]);
    for m in [&mut beta, &mut gamma] {
        m.set(300 * MIB, 4096);
        m.set(1_000_000, 1);
    }

    // qbm reads QEMU's result.
    let v = info_json(&img);
    let e = |granularity, enabled, dirty_bytes| Expect {
        granularity,
        enabled,
        in_use: false,
        usable: true,
        dirty_bytes,
    };
    assert_eq!(bitmap_names(&img), ["alpha", "beta", "gamma"]);
    assert_bitmap(&v, "alpha", &e(65536, false, 0));
    assert_bitmap(&v, "beta", &e(512 * KIB, true, beta.dirty_bytes()));
    assert_bitmap(&v, "gamma", &e(128 * KIB, true, gamma.dirty_bytes()));
    assert_eq!(ok(&["extents", &img, "alpha"]), "");
    assert_eq!(extents(&img, "beta"), beta.runs());
    assert_eq!(extents(&img, "gamma"), gamma.runs());
    assert_extents_match_qemu(&dir, &img, "beta", &beta.runs());
    assert_extents_match_qemu(&dir, &img, "gamma", &gamma.runs());

    // qemu-img bitmap --merge from another image made by qbm.
    let other = dir.file("other.qcow2");
    ok(&["create", &other, &size.to_string()]);
    ok(&["add", "-g", "4k", &other, "far"]);
    ok(&["set", &other, "far", "700M", "12345"]);
    let mut far = Model::new(size, 4096);
    far.set(700 * MIB, 12345);
    qemu_img(&[
        "bitmap", "--merge", "far", "-b", &other, "-F", "qcow2", &img, "gamma",
    ]);
    gamma.merge(&far);
    assert_eq!(extents(&img, "gamma"), gamma.runs());

    qemu_img(&["bitmap", "--remove", &img, "alpha"]);
    assert_eq!(bitmap_names(&img), ["beta", "gamma"]);
    ok(&["check", &img]);
    // And qbm changes QEMU's result; QEMU agrees.
    ok(&["rename", &img, "gamma", "delta"]);
    ok(&["reset", &img, "delta", "700M", "128k"]);
    gamma.reset(700 * MIB, 128 * KIB);
    ok(&["disable", &img, "beta"]);
    qemu_check_clean(&img);
    assert_eq!(
        qemu_bitmaps(&img),
        [
            qb("beta", 512 * KIB, &[]),
            qb("delta", 128 * KIB, &["auto"])
        ]
    );
    assert_extents_match_qemu(&dir, &img, "delta", &gamma.runs());
}

/// QEMU creates and writes; qbm reads, changes; QEMU reads qbm's result.
#[test]
fn qemu_round_trip_from_qemu() {
    if !have_qemu("qemu_round_trip_from_qemu") {
        return;
    }
    let dir = TempDir::new("rt-qemu");
    let img = dir.file("q.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &img, "64M"]);
    qemu_img(&["bitmap", "--add", &img, "b0"]);
    qemu_io(&img, &["write 1M 64k"]);
    assert_eq!(ok(&["extents", &img, "b0"]), "1048576 65536\n");
    let v = info_json(&img);
    assert_eq!(v["virtual-size"], 64 * MIB);
    assert_eq!(v["cluster-size"], 65536);
    assert_eq!(v["refcount-bits"], 16);
    assert_eq!(v["version"], 3);
    assert_bitmap(
        &v,
        "b0",
        &Expect {
            granularity: 65536,
            enabled: true,
            in_use: false,
            usable: true,
            dirty_bytes: 65536,
        },
    );
    assert_extents_match_qemu(&dir, &img, "b0", &[(MIB, 65536)]);
    ok(&["check", &img]);

    // qbm changes it.
    let size = 64 * MIB;
    let mut b0 = Model::new(size, 65536);
    b0.set(MIB, 65536);
    let mut b1 = Model::new(size, 4096);
    ok(&["add", "-g", "4k", &img, "b1"]);
    ok(&["set", &img, "b1", "10M", "10000"]);
    b1.set(10 * MIB, 10000);
    ok(&["disable", &img, "b0"]);
    ok(&["rename", &img, "b1", "b-renamed"]);
    ok(&["merge", "b0", &img, "b-renamed"]);
    b1.merge(&b0);
    qemu_check_clean(&img);
    assert_eq!(
        qemu_bitmaps(&img),
        [qb("b0", 65536, &[]), qb("b-renamed", 4096, &["auto"])]
    );
    // QEMU writes: only the enabled one is marked.
    qemu_io(&img, &["write 32M 4k", "write 63M 1"]);
    b1.set(32 * MIB, 4096);
    b1.set(63 * MIB, 1);
    assert_extents_match_qemu(&dir, &img, "b0", &b0.runs());
    assert_extents_match_qemu(&dir, &img, "b-renamed", &b1.runs());
    assert_eq!(
        bitmap_json(&info_json(&img), "b-renamed")["dirty-bytes"],
        b1.dirty_bytes()
    );

    ok(&["clear", &img, "b-renamed"]);
    assert_extents_match_qemu(&dir, &img, "b-renamed", &[]);
    ok(&["enable", &img, "b0"]);
    qemu_io(&img, &["write 0 512"]);
    b0.set(0, 512);
    assert_extents_match_qemu(&dir, &img, "b0", &b0.runs());
    ok(&["remove", &img, "b-renamed"]);
    ok(&["remove", &img, "b0"]);
    qemu_check_clean(&img);
    assert!(qemu_bitmaps(&img).is_empty());
    assert!(bitmap_names(&img).is_empty());
}

/// Every cluster size and refcount width qbm creates is one QEMU accepts,
/// and qbm reads QEMU's.
#[test]
fn qemu_formats_both_ways() {
    if !have_qemu("qemu_formats_both_ways") {
        return;
    }
    let dir = TempDir::new("rt-formats");
    for (i, (cs, rb)) in [("512", "1"), ("4k", "2"), ("64k", "64"), ("2M", "8")]
        .into_iter()
        .enumerate()
    {
        let ours = dir.file(&format!("ours{i}.qcow2"));
        ok(&[
            "create",
            "--cluster-size",
            cs,
            "--refcount-bits",
            rb,
            &ours,
            "1.5G",
        ]);
        ok(&["add", "-g", "512k", &ours, "bm"]);
        ok(&["set", &ours, "bm", "1G", "1M"]);
        qemu_check_clean(&ours);
        let qi = qemu_info(&ours);
        assert_eq!(qi["virtual-size"], 1536 * MIB);
        assert_eq!(qi["cluster-size"], size_of(cs));
        assert_eq!(
            qi["format-specific"]["data"]["refcount-bits"],
            rb.parse::<u64>().unwrap()
        );
        assert_eq!(qemu_bitmaps(&ours), [qb("bm", 512 * KIB, &["auto"])]);
        assert_extents_match_qemu(&dir, &ours, "bm", &[(GIB, MIB)]);

        let theirs = dir.file(&format!("theirs{i}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={},refcount_bits={rb}", size_of(cs)),
            &theirs,
            "1.5G",
        ]);
        qemu_img(&["bitmap", "--add", "-g", "512k", &theirs, "bm"]);
        qemu_io(&theirs, &["write 1G 1M"]);
        let v = info_json(&theirs);
        assert_eq!(v["virtual-size"], 1536 * MIB);
        assert_eq!(v["cluster-size"], size_of(cs));
        assert_eq!(v["refcount-bits"], rb.parse::<u64>().unwrap());
        assert_eq!(extents(&theirs, "bm"), [(GIB, MIB)]);
    }

    // 16T, sparse: QEMU accepts it.
    let big = dir.file("big.qcow2");
    ok(&["create", &big, "16T"]);
    ok(&["add", "-g", "1M", &big, "bm"]);
    ok(&["set", &big, "bm", "15T", "1"]);
    qemu_check_clean(&big);
    assert_eq!(qemu_info(&big)["virtual-size"], 16 * TIB);
    assert_eq!(qemu_bitmaps(&big), [qb("bm", MIB, &["auto"])]);
}

/// `qbm merge -b` gives what `qemu-img bitmap --merge -b` gives.
#[test]
fn qemu_merge_equivalence() {
    if !have_qemu("qemu_merge_equivalence") {
        return;
    }
    let dir = TempDir::new("rt-merge");
    let size = 256 * MIB + 4096;
    let src = dir.file("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &src, &size.to_string()]);
    qemu_img(&["bitmap", "--add", "-g", "4k", &src, "s"]);
    qemu_io(
        &src,
        &["write 0 4k", "write 70k 1k", "write 3M 1M", "write 256M 4k"],
    );
    let a = dir.file("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &a, &size.to_string()]);
    qemu_img(&["bitmap", "--add", "-g", "256k", &a, "d"]);
    qemu_io(&a, &["write 100M 1"]);
    let b = dir.file("b.qcow2");
    fs::copy(&a, &b).unwrap();

    qemu_img(&["bitmap", "--merge", "s", "-b", &src, "-F", "qcow2", &a, "d"]);
    ok(&["merge", "-b", &src, "s", &b, "d"]);
    let qemu_result = nbd_dirty_runs(&dir, &a, "d");
    let mut want = Model::new(size, 256 * KIB);
    for (o, l) in [
        (0, 4096),
        (70 * KIB, KIB),
        (3 * MIB, MIB),
        (256 * MIB, 4096),
        (100 * MIB, 1),
    ] {
        want.set(o, l);
    }
    assert_eq!(qemu_result, want.runs());
    assert_extents_match_qemu(&dir, &b, "d", &qemu_result);
    assert_eq!(extents(&a, "d"), qemu_result);
    qemu_check_clean(&b);
}

/// `qbm resize` grows and shrinks the disk and its bitmaps; bad sizes fail
/// with one line naming the problem.
#[test]
fn resize_grows_and_shrinks() {
    let dir = TempDir::new("resize");
    let img = dir.file("r.qcow2");
    ok(&["create", &img, "64M"]);
    ok(&["add", &img, "bm-r"]);
    ok(&["set", &img, "bm-r", "1M", "1"]);
    ok(&["set", &img, "bm-r", "40M", "1"]);
    ok(&["resize", &img, "1G"]);
    assert_eq!(info_json(&img)["virtual-size"], 1u64 << 30);
    ok(&["resize", &img, "32M"]);
    assert_eq!(info_json(&img)["virtual-size"], 32u64 << 20);
    assert_eq!(extents(&img, "bm-r"), [(MIB, 65536)]);
    fail(&["resize", &img, "1000"], &[&img], "multiple of 512");
    if have_qemu("resize_grows_and_shrinks") {
        qemu_check_clean(&img);
    }
}
