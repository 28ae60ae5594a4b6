//! `qbm`: every bitmap operation of libqbm at a shell. Thin: parse the
//! arguments, call the Rust API, print. Argument orders follow qemu-img's.

mod args;

use args::{Cli, Command, Outcome};
use qbm::image::{
    check_file, BitmapInfo, CheckOptions, CheckReport, CreateOptions, Image, ImageInfo, OpenOptions,
};
use qbm::Error;
use serde_json::json;
use std::process::ExitCode;

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
    let cli = match args::parse(std::env::args_os().skip(1)) {
        Outcome::Run(cli) => cli,
        Outcome::Print(text) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        // Usage errors fail like any other error: one line on stderr.
        Outcome::Usage(e) => {
            eprintln!("qbm: {e}");
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
