//! `qbm`: every bitmap operation of libqbm at a shell. Thin: parse the
//! arguments, call the Rust API, print. Argument orders follow qemu-img's.

use clap::{Args, Parser, Subcommand};
use qbm::image::{
    check_file, BitmapInfo, CheckOptions, CheckReport, CreateOptions, Image, ImageInfo, OpenOptions,
};
use qbm::Error;
use serde_json::json;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "qbm",
    version,
    about = "QEMU-compatible persistent dirty bitmaps for qcow2 images"
)]
struct Cli {
    /// Open without QEMU's image locks, like `qemu-img -U` (read-only commands).
    #[arg(short = 'U', long, global = true)]
    force_share: bool,
    /// Open read-write images in write-intent mode (changes are made durable
    /// in place at once; the bitmaps survive a crash). Any read-write open
    /// recovers bitmaps a crashed write-intent session left.
    #[arg(long, global = true)]
    write_intent: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new qcow2 v3 image (the file must not exist).
    Create {
        /// Cluster size (512 to 2M).
        #[arg(long, value_parser = parse_size, default_value = "64k")]
        cluster_size: u64,
        /// Refcount width in bits (1, 2, 4, 8, 16, 32, 64).
        #[arg(long, default_value_t = 16)]
        refcount_bits: u32,
        /// Make a metadata companion for this existing raw disk (external
        /// data file, data-file-raw); the raw file is never written. The name
        /// is stored as given: QEMU resolves a relative one against its
        /// working directory.
        #[arg(long, value_name = "RAW")]
        data_file: Option<String>,
        image: String,
        /// Virtual size, with an optional k/M/G/T suffix (default with
        /// --data-file: the raw file's size).
        #[arg(value_parser = parse_size, required_unless_present = "data_file")]
        size: Option<u64>,
    },
    /// Show the image and every bitmap.
    Info {
        #[arg(long)]
        json: bool,
        /// Also count each bitmap's dirty bytes (reads every bitmap's data).
        #[arg(long)]
        count: bool,
        image: String,
    },
    /// Add an empty bitmap.
    Add {
        /// Granularity (512 to 2G, a power of two; default: QEMU's).
        #[arg(short = 'g', long, value_parser = parse_size)]
        granularity: Option<u64>,
        /// Create it disabled (not marked by writes).
        #[arg(long)]
        disable: bool,
        image: String,
        name: String,
    },
    /// Remove a bitmap (also an inconsistent one).
    Remove(ImageBitmap),
    /// Clear every bit of a bitmap.
    Clear(ImageBitmap),
    /// Enable a bitmap: writes mark it.
    Enable(ImageBitmap),
    /// Disable (freeze) a bitmap.
    Disable(ImageBitmap),
    /// Rename a bitmap.
    Rename {
        image: String,
        old: String,
        new: String,
    },
    /// Merge SOURCE_NAME (of SOURCE_IMG, default IMG) into NAME of IMG.
    Merge {
        /// The image holding the source bitmap.
        #[arg(short = 'b', value_name = "SOURCE_IMG")]
        source_image: Option<String>,
        source_name: String,
        image: String,
        name: String,
    },
    /// Mark OFFSET..OFFSET+LENGTH dirty in one bitmap.
    Set(ImageBitmapRange),
    /// Clear OFFSET..OFFSET+LENGTH (granularity aligned) in one bitmap.
    Reset(ImageBitmapRange),
    /// Print the dirty extents of a bitmap, one "start length" per line.
    Extents {
        #[arg(long)]
        json: bool,
        /// Only extents at or after this offset.
        #[arg(long, value_parser = parse_size)]
        offset: Option<u64>,
        /// Only this many bytes from --offset.
        #[arg(long, value_parser = parse_size, requires = "offset")]
        length: Option<u64>,
        image: String,
        name: String,
    },
    /// Grow or shrink the virtual disk and every bitmap with it (a
    /// multiple of 512; bits past a shrunken end are dropped).
    Resize {
        image: String,
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// Recompute every cluster's references and compare them with the
    /// refcounts, as `qemu-img check` does (exit 2: corruptions, 3: leaks
    /// only); list inconsistent bitmaps. --repair fixes leaks and removes
    /// inconsistent bitmaps.
    Check {
        #[arg(long)]
        json: bool,
        /// Remove inconsistent (in use) bitmaps; they can never be used again.
        #[arg(long)]
        repair: bool,
        image: String,
    },
}

#[derive(Args)]
struct ImageBitmap {
    image: String,
    name: String,
}

#[derive(Args)]
struct ImageBitmapRange {
    image: String,
    name: String,
    #[arg(value_parser = parse_size)]
    offset: u64,
    #[arg(value_parser = parse_size)]
    length: u64,
}

/// "512", "64k", "1.5G"... as qemu-img reads sizes (binary multiples).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => {
                    return Err(format!(
                        "unknown size suffix '{c}' in '{s}' (use k, M, G, T)"
                    ))
                }
            };
            (&s[..i], 1u64 << shift)
        }
        _ => (s, 1),
    };
    let bad = || format!("'{s}' is not a size (a number with an optional k, M, G or T suffix)");
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(mult)
            .ok_or_else(|| format!("size '{s}' is too large"));
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    let bytes = f * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 || bytes.fract() != 0.0 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Every command opens lazily (bitmap data read only where a command needs
/// it) unless --write-intent asks for a tracking session.
fn open(path: &str, writable: bool) -> Result<Image, Error> {
    let force_share = FORCE_SHARE.load(std::sync::atomic::Ordering::Relaxed);
    let write_intent = writable && WRITE_INTENT.load(std::sync::atomic::Ordering::Relaxed);
    Image::open(
        path,
        OpenOptions {
            writable,
            force_share,
            write_intent,
            lazy: !write_intent,
        },
    )
}

/// Set once from the command line before any image is opened.
static WRITE_INTENT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Set once from the command line before any image is opened.
static FORCE_SHARE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Opens read-write, runs `f`, and closes (which persists); the first error wins.
fn modify(path: &str, f: impl FnOnce(&Image) -> Result<(), Error>) -> Result<(), Error> {
    let img = open(path, true)?;
    let result = f(&img);
    let closed = img.close();
    result.and(closed)
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        let text = format!("{v:.3}");
        format!(
            "{} {}",
            text.trim_end_matches('0').trim_end_matches('.'),
            UNITS[u]
        )
    }
}

fn bitmap_json(b: &BitmapInfo, counted: bool) -> serde_json::Value {
    let mut v = json!({
        "name": b.name,
        "granularity": b.granularity,
        "enabled": b.enabled,
        "in-use": b.in_use,
        "usable": b.usable,
        "recovered": b.recovered,
        "extra-data-size": b.extra_data.len(),
        "extra-data": b.extra_data.iter().map(|x| format!("{x:02x}")).collect::<String>(),
    });
    if counted {
        v["dirty-bytes"] = json!(b.dirty_bytes);
    }
    v
}

/// `counted`: the bitmaps' dirty bytes were counted (info --count).
fn print_info(path: &str, info: &ImageInfo, bitmaps: &[BitmapInfo], as_json: bool, counted: bool) {
    if as_json {
        let v = json!({
            "filename": path,
            "virtual-size": info.virtual_size,
            "cluster-size": info.cluster_size,
            "refcount-bits": info.refcount_bits,
            "version": info.version,
            "backing-filename": info.backing_file,
            "data-file": info.data_file,
            "bitmaps": bitmaps.iter().map(|b| bitmap_json(b, counted)).collect::<Vec<_>>(),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("JSON values serialise")
        );
        return;
    }
    println!("image: {path}");
    println!(
        "virtual size: {} ({} bytes)",
        human_size(info.virtual_size),
        info.virtual_size
    );
    println!("cluster size: {}", info.cluster_size);
    println!("refcount bits: {}", info.refcount_bits);
    println!("qcow2 version: {}", info.version);
    if let Some(b) = &info.backing_file {
        println!("backing file: {b}");
    }
    if let Some(d) = &info.data_file {
        println!("data file: {d}");
    }
    if bitmaps.is_empty() {
        println!("bitmaps: none");
        return;
    }
    println!("bitmaps:");
    let width = bitmaps
        .iter()
        .map(|b| b.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let dirty_header = if counted { "DIRTY BYTES" } else { "" };
    println!(
        "{}",
        format!(
            "  {:width$}  {:>11}  {:<16}  {:>14}",
            "NAME", "GRANULARITY", "FLAGS", dirty_header
        )
        .trim_end()
    );
    for b in bitmaps {
        let mut flags = vec![if b.enabled { "enabled" } else { "disabled" }];
        if b.recovered {
            flags.push("recovered");
        }
        if b.in_use {
            flags.push("in-use");
        } else if !b.usable {
            flags.push("unsupported");
        }
        let dirty = match (counted, b.dirty_bytes) {
            (false, _) => String::new(),
            (true, Some(n)) => n.to_string(),
            (true, None) => "-".into(),
        };
        println!(
            "{}",
            format!(
                "  {:width$}  {:>11}  {:<16}  {:>14}",
                b.name,
                b.granularity,
                flags.join(","),
                dirty
            )
            .trim_end()
        );
    }
}

fn run(cli: Cli) -> Result<ExitCode, Error> {
    FORCE_SHARE.store(cli.force_share, std::sync::atomic::Ordering::Relaxed);
    WRITE_INTENT.store(cli.write_intent, std::sync::atomic::Ordering::Relaxed);
    let done: Result<(), Error> = match cli.command {
        Command::Create {
            cluster_size,
            refcount_bits,
            data_file,
            image,
            size,
        } => Image::create(
            &image,
            &CreateOptions {
                size: size.unwrap_or(0),
                cluster_size,
                refcount_bits,
                data_file: data_file.map(Into::into),
            },
        )?
        .close(),
        Command::Info { json, count, image } => {
            let img = open(&image, false)?;
            let bitmaps = if count {
                img.bitmaps()?
            } else {
                img.bitmap_list()?
            };
            print_info(&image, &img.info()?, &bitmaps, json, count);
            Ok(())
        }
        Command::Add {
            granularity,
            disable,
            image,
            name,
        } => modify(&image, |img| img.add_bitmap(&name, granularity, !disable)),
        Command::Remove(a) => modify(&a.image, |img| img.remove_bitmap(&a.name)),
        Command::Clear(a) => modify(&a.image, |img| img.clear_bitmap(&a.name)),
        Command::Enable(a) => modify(&a.image, |img| img.enable_bitmap(&a.name)),
        Command::Disable(a) => modify(&a.image, |img| img.disable_bitmap(&a.name)),
        Command::Rename { image, old, new } => modify(&image, |img| img.rename_bitmap(&old, &new)),
        Command::Merge {
            source_image,
            source_name,
            image,
            name,
        } => match source_image.filter(|s| *s != image) {
            Some(src_path) => {
                let src = open(&src_path, false)?;
                modify(&image, |img| img.merge_bitmap(&name, &src, &source_name))
            }
            None => modify(&image, |img| img.merge_bitmap(&name, img, &source_name)),
        },
        Command::Set(r) => modify(&r.image, |img| img.set_range(&r.name, r.offset, r.length)),
        Command::Reset(r) => modify(&r.image, |img| img.reset_range(&r.name, r.offset, r.length)),
        Command::Extents {
            json,
            offset,
            length,
            image,
            name,
        } => {
            let img = open(&image, false)?;
            let from = offset.unwrap_or(0);
            let to = length.map_or(u64::MAX, |l| from.saturating_add(l));
            let mut out = Vec::new();
            let mut at = from;
            while let Some((start, len)) = img.next_extent(&name, at)? {
                if start >= to {
                    break;
                }
                let end = (start + len).min(to);
                out.push((start, end - start));
                at = start + len;
            }
            // One write per buffer, not per line.
            use std::io::Write;
            let mut w = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
            let written = if json {
                let v: Vec<_> = out
                    .iter()
                    .map(|&(s, l)| json!({"start": s, "length": l}))
                    .collect();
                writeln!(w, "{}", serde_json::Value::Array(v))
            } else {
                out.iter().try_for_each(|(s, l)| writeln!(w, "{s} {l}"))
            };
            written
                .and_then(|()| w.flush())
                .map_err(|e| Error::io("writing the extents", e))
        }
        Command::Resize { image, size } => modify(&image, |img| img.resize(size)),
        Command::Check {
            json,
            repair,
            image,
        } => return check(&image, json, repair),
    };
    done.map(|_| ExitCode::SUCCESS)
}

/// Exit codes of `check`, as `qemu-img check` uses them.
const EXIT_CORRUPT: u8 = 2;
const EXIT_LEAKS: u8 = 3;

/// Recomputes every cluster's references and compares them with the
/// refcounts; --repair opens read-write, removes inconsistent bitmaps and
/// fixes leaks.
fn check(path: &str, as_json: bool, repair: bool) -> Result<ExitCode, Error> {
    let result = if repair {
        open(path, true).and_then(|img| {
            let report = img.check(CheckOptions {
                repair_leaks: true,
                remove_inconsistent: true,
            });
            let closed = img.close();
            let report = report?;
            closed.map(|_| report)
        })
    } else {
        check_file(path, FORCE_SHARE.load(std::sync::atomic::Ordering::Relaxed))
    };
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            if as_json {
                print_json(&json!({
                    "filename": path,
                    "format": "qcow2",
                    "check-errors": 1,
                    "message": e.to_string(),
                }));
            }
            return Err(e);
        }
    };
    if as_json {
        print_json(&check_json(path, &report));
    } else {
        print_check(&report);
    }
    Ok(ExitCode::from(
        if report.corruptions > 0 || report.check_errors > 0 {
            EXIT_CORRUPT
        } else if report.leaks > 0 {
            EXIT_LEAKS
        } else {
            0
        },
    ))
}

fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("JSON values serialise")
    );
}

/// qemu-img's field names, plus the bitmap lists and the problem lines.
fn check_json(path: &str, r: &CheckReport) -> serde_json::Value {
    json!({
        "filename": path,
        "format": "qcow2",
        "check-errors": r.check_errors,
        "corruptions": r.corruptions,
        "leaks": r.leaks,
        "corruptions-fixed": r.corruptions_fixed,
        "leaks-fixed": r.leaks_fixed,
        "image-end-offset": r.image_end_offset,
        "total-clusters": r.total_clusters,
        "allocated-clusters": r.allocated_clusters,
        "fragmented-clusters": r.fragmented_clusters,
        "compressed-clusters": r.compressed_clusters,
        "inconsistent-bitmaps": r.inconsistent_bitmaps,
        "removed-bitmaps": r.removed_bitmaps,
        "messages": r.messages,
    })
}

fn print_check(r: &CheckReport) {
    for m in &r.messages {
        println!("{m}");
    }
    if !r.messages.is_empty() {
        println!();
    }
    if r.leaks_fixed > 0 {
        println!("{} leaked clusters were repaired.", r.leaks_fixed);
    }
    for name in &r.removed_bitmaps {
        println!("Removed inconsistent bitmap '{name}'.");
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        println!("No errors were found on the image.");
    }
    if r.corruptions > 0 {
        println!(
            "{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
            r.corruptions
        );
    }
    if r.check_errors > 0 {
        println!(
            "{} internal errors occurred during the check.",
            r.check_errors
        );
    }
    if r.leaks > 0 {
        println!(
            "{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
            r.leaks
        );
    }
    for name in &r.inconsistent_bitmaps {
        println!("Bitmap '{name}' is inconsistent (in use); --repair removes it.");
    }
    let percent = |n: u64| match r.total_clusters {
        0 => 0.0,
        t => n as f64 * 100.0 / t as f64,
    };
    println!(
        "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
        r.allocated_clusters,
        r.total_clusters,
        percent(r.allocated_clusters),
        percent(r.fragmented_clusters),
        percent(r.compressed_clusters)
    );
    println!("Image end offset: {}", r.image_end_offset);
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version succeed and print as clap prints them.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        // Usage errors fail like any other error: one line on stderr.
        Err(e) => {
            let text = e.render().to_string();
            let first = text.split("\n\n").next().unwrap_or_default();
            let words: Vec<&str> = first
                .trim()
                .trim_start_matches("error: ")
                .split_whitespace()
                .collect();
            eprintln!("qbm: {} (see qbm --help)", words.join(" "));
            return ExitCode::FAILURE;
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qbm: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_follow_qemu_img() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("16T"), Ok(16 << 40));
        assert!(parse_size("12x").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("20000000E").is_err());
    }
}
