//! `qbm`'s command line: every subcommand's grammar as data, the help text
//! made from it, and parsing into a [`Cli`].
//!
//! Hand-written rather than clap: the grammar is fourteen fixed subcommands
//! of positionals and a few options, while clap's code and the command tree
//! it builds at every start cost 136 KiB of a `qbm info`'s peak memory on a
//! 1 GiB image (1.61 -> 1.48 MiB), most of a command that backup scripts
//! run once per disk. The messages keep clap's wording.

/// What the command line asks for.
pub struct Cli {
    pub force_share: bool,
    pub write_intent: bool,
    pub command: Command,
}

pub enum Command {
    Create {
        cluster_size: u64,
        refcount_bits: u32,
        data_file: Option<String>,
        image: String,
        size: Option<u64>,
    },
    Info {
        json: bool,
        count: bool,
        image: String,
    },
    Add {
        granularity: Option<u64>,
        disable: bool,
        image: String,
        name: String,
    },
    Remove(ImageBitmap),
    Clear(ImageBitmap),
    Enable(ImageBitmap),
    Disable(ImageBitmap),
    Rename {
        image: String,
        old: String,
        new: String,
    },
    Merge {
        source_image: Option<String>,
        source_name: String,
        image: String,
        name: String,
    },
    Set(ImageBitmapRange),
    Reset(ImageBitmapRange),
    Extents {
        json: bool,
        offset: Option<u64>,
        length: Option<u64>,
        image: String,
        name: String,
    },
    Resize {
        image: String,
        size: u64,
    },
    Check {
        json: bool,
        repair: bool,
        image: String,
    },
}

pub struct ImageBitmap {
    pub image: String,
    pub name: String,
}

pub struct ImageBitmapRange {
    pub image: String,
    pub name: String,
    pub offset: u64,
    pub length: u64,
}

/// Where parsing ends.
pub enum Outcome {
    Run(Cli),
    /// Help or version text: printed on stdout, success.
    Print(String),
    /// A usage error, one line (without the "qbm: " prefix): failure.
    Usage(String),
}

/// An option: `--long`, perhaps `-s`, perhaps taking a value.
struct Opt {
    long: &'static str,
    short: Option<char>,
    /// The value's name in help (`None`: a flag).
    value: Option<&'static str>,
    help: &'static str,
}

/// A positional argument.
struct Arg {
    name: &'static str,
    required: bool,
    help: &'static str,
}

struct Sub {
    name: &'static str,
    about: &'static str,
    opts: &'static [Opt],
    args: &'static [Arg],
}

const ABOUT: &str = "QEMU-compatible persistent dirty bitmaps for qcow2 images";

const FORCE_SHARE: Opt = Opt {
    long: "force-share",
    short: Some('U'),
    value: None,
    help: "Open without QEMU's image locks, like `qemu-img -U` (read-only commands)",
};
const WRITE_INTENT: Opt = Opt {
    long: "write-intent",
    short: None,
    value: None,
    help: "Open read-write images in write-intent mode (changes are made durable in place \
           at once; the bitmaps survive a crash). Any read-write open recovers bitmaps a \
           crashed write-intent session left",
};
const HELP: Opt = Opt {
    long: "help",
    short: Some('h'),
    value: None,
    help: "Print help",
};
const VERSION: Opt = Opt {
    long: "version",
    short: Some('V'),
    value: None,
    help: "Print version",
};
/// Accepted before or after the subcommand.
const GLOBAL: [Opt; 3] = [FORCE_SHARE, WRITE_INTENT, HELP];

const JSON: Opt = Opt {
    long: "json",
    short: None,
    value: None,
    help: "",
};

const fn arg(name: &'static str) -> Arg {
    Arg {
        name,
        required: true,
        help: "",
    }
}
const IMAGE: Arg = arg("IMAGE");
const NAME: Arg = arg("NAME");

const SUBS: [Sub; 14] = [
    Sub {
        name: "create",
        about: "Create a new qcow2 v3 image (the file must not exist)",
        opts: &[
            Opt {
                long: "cluster-size",
                short: None,
                value: Some("CLUSTER_SIZE"),
                help: "Cluster size (512 to 2M) [default: 64k]",
            },
            Opt {
                long: "refcount-bits",
                short: None,
                value: Some("REFCOUNT_BITS"),
                help: "Refcount width in bits (1, 2, 4, 8, 16, 32, 64) [default: 16]",
            },
            Opt {
                long: "data-file",
                short: None,
                value: Some("RAW"),
                help: "Make a metadata companion for this existing raw disk (external data \
                       file, data-file-raw); the raw file is never written. The name is \
                       stored as given: QEMU resolves a relative one against its working \
                       directory",
            },
        ],
        args: &[
            IMAGE,
            Arg {
                name: "SIZE",
                required: false,
                help: "Virtual size, with an optional k/M/G/T suffix (default with \
                       --data-file: the raw file's size)",
            },
        ],
    },
    Sub {
        name: "info",
        about: "Show the image and every bitmap",
        opts: &[
            JSON,
            Opt {
                long: "count",
                short: None,
                value: None,
                help: "Also count each bitmap's dirty bytes (reads every bitmap's data)",
            },
        ],
        args: &[IMAGE],
    },
    Sub {
        name: "add",
        about: "Add an empty bitmap",
        opts: &[
            Opt {
                long: "granularity",
                short: Some('g'),
                value: Some("GRANULARITY"),
                help: "Granularity (512 to 2G, a power of two; default: QEMU's)",
            },
            Opt {
                long: "disable",
                short: None,
                value: None,
                help: "Create it disabled (not marked by writes)",
            },
        ],
        args: &[IMAGE, NAME],
    },
    Sub {
        name: "remove",
        about: "Remove a bitmap (also an inconsistent one)",
        opts: &[],
        args: &[IMAGE, NAME],
    },
    Sub {
        name: "clear",
        about: "Clear every bit of a bitmap",
        opts: &[],
        args: &[IMAGE, NAME],
    },
    Sub {
        name: "enable",
        about: "Enable a bitmap: writes mark it",
        opts: &[],
        args: &[IMAGE, NAME],
    },
    Sub {
        name: "disable",
        about: "Disable (freeze) a bitmap",
        opts: &[],
        args: &[IMAGE, NAME],
    },
    Sub {
        name: "rename",
        about: "Rename a bitmap",
        opts: &[],
        args: &[IMAGE, arg("OLD"), arg("NEW")],
    },
    Sub {
        name: "merge",
        about: "Merge SOURCE_NAME (of SOURCE_IMG, default IMG) into NAME of IMG",
        opts: &[Opt {
            long: "source-image",
            short: Some('b'),
            value: Some("SOURCE_IMG"),
            help: "The image holding the source bitmap",
        }],
        args: &[arg("SOURCE_NAME"), IMAGE, NAME],
    },
    Sub {
        name: "set",
        about: "Mark OFFSET..OFFSET+LENGTH dirty in one bitmap",
        opts: &[],
        args: &[IMAGE, NAME, arg("OFFSET"), arg("LENGTH")],
    },
    Sub {
        name: "reset",
        about: "Clear OFFSET..OFFSET+LENGTH (granularity aligned) in one bitmap",
        opts: &[],
        args: &[IMAGE, NAME, arg("OFFSET"), arg("LENGTH")],
    },
    Sub {
        name: "extents",
        about: "Print the dirty extents of a bitmap, one \"start length\" per line",
        opts: &[
            JSON,
            Opt {
                long: "offset",
                short: None,
                value: Some("OFFSET"),
                help: "Only extents at or after this offset",
            },
            Opt {
                long: "length",
                short: None,
                value: Some("LENGTH"),
                help: "Only this many bytes from --offset",
            },
        ],
        args: &[IMAGE, NAME],
    },
    Sub {
        name: "resize",
        about: "Grow or shrink the virtual disk and every bitmap with it (a multiple of 512; \
                bits past a shrunken end are dropped)",
        opts: &[],
        args: &[IMAGE, arg("SIZE")],
    },
    Sub {
        name: "check",
        about: "Recompute every cluster's references and compare them with the refcounts, \
                as `qemu-img check` does (exit 2: corruptions, 3: leaks only); list \
                inconsistent bitmaps. --repair fixes leaks and removes inconsistent bitmaps",
        opts: &[
            JSON,
            Opt {
                long: "repair",
                short: None,
                value: None,
                help: "Remove inconsistent (in use) bitmaps; they can never be used again",
            },
        ],
        args: &[IMAGE],
    },
];

/// Parses `qbm`'s arguments (without the program name).
pub fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Outcome {
    let mut strings = Vec::new();
    for a in args {
        match a.into_string() {
            Ok(s) => strings.push(s),
            Err(bad) => {
                let shown = bad.to_string_lossy().into_owned();
                return Outcome::Usage(format!(
                    "invalid UTF-8 in argument '{shown}' (see qbm --help)"
                ));
            }
        }
    }
    parse_strings(strings)
}

fn parse_strings(args: Vec<String>) -> Outcome {
    let mut sub: Option<&'static Sub> = None;
    match scan(args, &mut sub).and_then(|given| build(sub, given)) {
        Ok(outcome) => outcome,
        Err(e) => {
            let see = sub.map_or("qbm --help".to_string(), |s| {
                format!("qbm {} --help", s.name)
            });
            Outcome::Usage(format!("{e} (see {see})"))
        }
    }
}

/// The words of a command line, sorted out against the grammar.
#[derive(Default)]
struct Given {
    force_share: bool,
    write_intent: bool,
    help: bool,
    version: bool,
    /// `qbm help [SUB]`.
    help_command: bool,
    /// Options of the subcommand, by long name, with their values ("" for flags).
    opts: Vec<(&'static str, String)>,
    positionals: Vec<String>,
}

/// Splits `args` into global flags, the subcommand (into `sub`, as soon as
/// it is known, for the error's pointer to help), its options and its
/// positionals.
fn scan(args: Vec<String>, sub: &mut Option<&'static Sub>) -> Result<Given, String> {
    let mut given = Given::default();
    let mut words = args.into_iter();
    let mut options_done = false;
    while let Some(word) = words.next() {
        if options_done || word == "-" || !word.starts_with('-') {
            match *sub {
                Some(_) => given.positionals.push(word),
                None if given.help_command => {
                    *sub = Some(find_sub(&word)?);
                    given.help = true;
                }
                None if word == "help" => given.help_command = true,
                None => *sub = Some(find_sub(&word)?),
            }
            continue;
        }
        if word == "--" {
            options_done = true;
            continue;
        }
        let (opt, inline) = match word.strip_prefix("--") {
            Some(long) => {
                let (name, value) = match long.split_once('=') {
                    Some((n, v)) => (n, Some(v.to_string())),
                    None => (long, None),
                };
                (find_opt(*sub, |o| o.long == name), value)
            }
            None => {
                let mut chars = word[1..].chars();
                let c = chars.next().unwrap_or('-');
                let rest = chars.as_str();
                let opt = find_opt(*sub, |o| o.short == Some(c));
                (opt, (!rest.is_empty()).then(|| rest.to_string()))
            }
        };
        let opt = opt.ok_or_else(|| format!("unexpected argument '{word}' found"))?;
        if opt.value.is_none() && inline.is_some() {
            return Err(format!("unexpected argument '{word}' found"));
        }
        match opt.long {
            "help" => given.help = true,
            "version" => given.version = true,
            "force-share" => given.force_share = true,
            "write-intent" => given.write_intent = true,
            long => {
                if given.opts.iter().any(|(l, _)| *l == long) {
                    return Err(format!(
                        "the argument '--{long}' cannot be used multiple times"
                    ));
                }
                let value = match opt.value {
                    None => String::new(),
                    Some(v) => inline.or_else(|| words.next()).ok_or_else(|| {
                        format!("a value is required for '--{long} <{v}>' but none was supplied")
                    })?,
                };
                given.opts.push((long, value));
            }
        }
    }
    Ok(given)
}

fn find_sub(name: &str) -> Result<&'static Sub, String> {
    SUBS.iter()
        .find(|s| s.name == name)
        .ok_or_else(|| format!("unrecognized subcommand '{name}'"))
}

/// The option `matches` picks among the subcommand's and the global ones
/// (`--version` only before a subcommand).
fn find_opt(sub: Option<&'static Sub>, matches: impl Fn(&Opt) -> bool) -> Option<&'static Opt> {
    let own: &'static [Opt] = sub.map_or(&[], |s| s.opts);
    let top: &'static [Opt] = if sub.is_none() {
        std::slice::from_ref(&VERSION)
    } else {
        &[]
    };
    own.iter()
        .chain(GLOBAL.iter())
        .chain(top)
        .find(|o| matches(o))
}

/// The typed command, or the help or version text asked for.
fn build(sub: Option<&'static Sub>, mut given: Given) -> Result<Outcome, String> {
    if given.version {
        return Ok(Outcome::Print(format!(
            "qbm {}\n",
            env!("CARGO_PKG_VERSION")
        )));
    }
    let Some(sub) = sub else {
        if given.help || given.help_command {
            return Ok(Outcome::Print(top_help()));
        }
        return Err("a subcommand is required".into());
    };
    if given.help {
        return Ok(Outcome::Print(sub_help(sub)));
    }
    let most = sub.args.len();
    if let Some(extra) = given.positionals.get(most) {
        return Err(format!("unexpected argument '{extra}' found"));
    }
    let missing: Vec<String> = sub
        .args
        .iter()
        .skip(given.positionals.len())
        .filter(|a| a.required)
        .map(|a| format!("<{}>", a.name))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the following required arguments were not provided: {}",
            missing.join(" ")
        ));
    }
    let command = command(sub, &mut given)?;
    Ok(Outcome::Run(Cli {
        force_share: given.force_share,
        write_intent: given.write_intent,
        command,
    }))
}

impl Given {
    fn flag(&self, long: &str) -> bool {
        self.opts.iter().any(|(l, _)| *l == long)
    }

    fn value(&self, long: &str) -> Option<String> {
        self.opts
            .iter()
            .find(|(l, _)| *l == long)
            .map(|(_, v)| v.clone())
    }

    /// The option's value as a size (see [`parse_size`]).
    fn size(&self, sub: &Sub, long: &str) -> Result<Option<u64>, String> {
        let Some(v) = self.value(long) else {
            return Ok(None);
        };
        let shown = sub
            .opts
            .iter()
            .find(|o| o.long == long)
            .map_or(String::new(), |o| o.value.unwrap_or_default().to_string());
        parse_size(&v)
            .map(Some)
            .map_err(|e| format!("invalid value '{v}' for '--{long} <{shown}>': {e}"))
    }

    /// Takes the next positional (its presence was checked, or it is optional).
    fn next(&mut self) -> Option<String> {
        (!self.positionals.is_empty()).then(|| self.positionals.remove(0))
    }

    fn take(&mut self) -> String {
        self.next().unwrap_or_default()
    }

    /// The next positional as a size, named `name` in an error.
    fn take_size(&mut self, name: &str) -> Result<Option<u64>, String> {
        match self.next() {
            None => Ok(None),
            Some(v) => parse_size(&v)
                .map(Some)
                .map_err(|e| format!("invalid value '{v}' for '<{name}>': {e}")),
        }
    }

    fn image_bitmap(&mut self) -> ImageBitmap {
        ImageBitmap {
            image: self.take(),
            name: self.take(),
        }
    }

    fn range(&mut self) -> Result<ImageBitmapRange, String> {
        Ok(ImageBitmapRange {
            image: self.take(),
            name: self.take(),
            offset: self.take_size("OFFSET")?.unwrap_or_default(),
            length: self.take_size("LENGTH")?.unwrap_or_default(),
        })
    }
}

fn command(sub: &Sub, g: &mut Given) -> Result<Command, String> {
    Ok(match sub.name {
        "create" => {
            let cluster_size = g.size(sub, "cluster-size")?.unwrap_or(64 << 10);
            let refcount_bits = match g.value("refcount-bits") {
                None => 16,
                Some(v) => v.parse().map_err(|_| {
                    format!(
                        "invalid value '{v}' for '--refcount-bits <REFCOUNT_BITS>': not a number"
                    )
                })?,
            };
            let data_file = g.value("data-file");
            let image = g.take();
            let size = g.take_size("SIZE")?;
            if size.is_none() && data_file.is_none() {
                return Err("the following required arguments were not provided: <SIZE>".into());
            }
            Command::Create {
                cluster_size,
                refcount_bits,
                data_file,
                image,
                size,
            }
        }
        "info" => Command::Info {
            json: g.flag("json"),
            count: g.flag("count"),
            image: g.take(),
        },
        "add" => Command::Add {
            granularity: g.size(sub, "granularity")?,
            disable: g.flag("disable"),
            image: g.take(),
            name: g.take(),
        },
        "remove" => Command::Remove(g.image_bitmap()),
        "clear" => Command::Clear(g.image_bitmap()),
        "enable" => Command::Enable(g.image_bitmap()),
        "disable" => Command::Disable(g.image_bitmap()),
        "rename" => Command::Rename {
            image: g.take(),
            old: g.take(),
            new: g.take(),
        },
        "merge" => Command::Merge {
            source_image: g.value("source-image"),
            source_name: g.take(),
            image: g.take(),
            name: g.take(),
        },
        "set" => Command::Set(g.range()?),
        "reset" => Command::Reset(g.range()?),
        "extents" => {
            let offset = g.size(sub, "offset")?;
            let length = g.size(sub, "length")?;
            if length.is_some() && offset.is_none() {
                return Err(
                    "the following required arguments were not provided: --offset <OFFSET>".into(),
                );
            }
            Command::Extents {
                json: g.flag("json"),
                offset,
                length,
                image: g.take(),
                name: g.take(),
            }
        }
        "resize" => Command::Resize {
            image: g.take(),
            size: g.take_size("SIZE")?.unwrap_or_default(),
        },
        "check" => Command::Check {
            json: g.flag("json"),
            repair: g.flag("repair"),
            image: g.take(),
        },
        other => return Err(format!("unrecognized subcommand '{other}'")),
    })
}

/// `label  help` lines, the help column aligned.
fn table(rows: &[(String, &str)]) -> String {
    let width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(label, help)| format!("  {label:width$}  {help}").trim_end().to_string() + "\n")
        .collect()
}

fn opt_rows<'a>(opts: impl Iterator<Item = &'a Opt>) -> Vec<(String, &'a str)> {
    opts.map(|o| {
        let short = o.short.map_or("    ".to_string(), |c| format!("-{c}, "));
        let value = o.value.map_or(String::new(), |v| format!(" <{v}>"));
        (format!("{short}--{}{value}", o.long), o.help)
    })
    .collect()
}

fn top_help() -> String {
    let mut commands: Vec<(String, &str)> =
        SUBS.iter().map(|s| (s.name.to_string(), s.about)).collect();
    commands.push((
        "help".into(),
        "Print this message or the help of the given subcommand(s)",
    ));
    format!(
        "{ABOUT}\n\nUsage: qbm [OPTIONS] <COMMAND>\n\nCommands:\n{}\nOptions:\n{}",
        table(&commands),
        table(&opt_rows(GLOBAL.iter().chain([&VERSION])))
    )
}

fn sub_help(sub: &Sub) -> String {
    let shown = |a: &Arg| {
        if a.required {
            format!("<{}>", a.name)
        } else {
            format!("[{}]", a.name)
        }
    };
    let usage: Vec<String> = sub.args.iter().map(shown).collect();
    let args: Vec<(String, &str)> = sub.args.iter().map(|a| (shown(a), a.help)).collect();
    format!(
        "{}\n\nUsage: qbm {} [OPTIONS] {}\n\nArguments:\n{}\nOptions:\n{}",
        sub.about,
        sub.name,
        usage.join(" "),
        table(&args),
        table(&opt_rows(sub.opts.iter().chain(GLOBAL.iter())))
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(words: &[&str]) -> Outcome {
        parse_strings(words.iter().map(|w| w.to_string()).collect())
    }

    fn run(words: &[&str]) -> Cli {
        match parsed(words) {
            Outcome::Run(cli) => cli,
            Outcome::Print(t) => panic!("{words:?}: printed {t}"),
            Outcome::Usage(e) => panic!("{words:?}: {e}"),
        }
    }

    fn printed(words: &[&str]) -> String {
        match parsed(words) {
            Outcome::Print(t) => t,
            _ => panic!("{words:?} printed nothing"),
        }
    }

    fn usage(words: &[&str]) -> String {
        match parsed(words) {
            Outcome::Usage(e) => e,
            _ => panic!("{words:?} parsed"),
        }
    }

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

    #[test]
    fn options_go_anywhere_and_take_values_either_way() {
        for words in [
            &["-U", "add", "-g", "1M", "i", "b", "--disable"][..],
            &[
                "add",
                "i",
                "--granularity=1M",
                "b",
                "--disable",
                "--force-share",
            ],
            &["add", "-g1M", "--disable", "-U", "--", "i", "b"],
        ] {
            let cli = run(words);
            assert!(cli.force_share && !cli.write_intent, "{words:?}");
            match cli.command {
                Command::Add {
                    granularity,
                    disable,
                    image,
                    name,
                } => {
                    assert_eq!(granularity, Some(1 << 20), "{words:?}");
                    assert!(disable, "{words:?}");
                    assert_eq!((image.as_str(), name.as_str()), ("i", "b"), "{words:?}");
                }
                _ => panic!("{words:?}: not add"),
            }
        }
        // After `--`, a leading dash is a name, not an option.
        match run(&["--write-intent", "rename", "i", "--", "-old", "-new"]).command {
            Command::Rename { old, new, .. } => {
                assert_eq!((old, new), ("-old".into(), "-new".into()))
            }
            _ => panic!("not rename"),
        }
    }

    #[test]
    fn every_subcommand_has_help_with_its_options() {
        for sub in &SUBS {
            for words in [
                &[sub.name, "--help"][..],
                &[sub.name, "-h"],
                &["help", sub.name],
            ] {
                let text = printed(words);
                assert!(
                    text.contains(&format!("Usage: qbm {} ", sub.name)),
                    "{text}"
                );
                for o in sub.opts.iter().chain(GLOBAL.iter()) {
                    assert!(text.contains(&format!("--{}", o.long)), "{words:?}: {text}");
                }
                for a in sub.args {
                    assert!(text.contains(a.name), "{words:?}: {text}");
                }
            }
        }
        let top = printed(&["--help"]);
        assert!(SUBS.iter().all(|s| top.contains(s.about)), "{top}");
        assert_eq!(printed(&["help"]), top);
        assert_eq!(printed(&["-h"]), top);
        assert_eq!(
            printed(&["--version"]),
            format!("qbm {}\n", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn usage_errors_name_what_is_wrong() {
        let cases: [(&[&str], &str); 12] = [
            (&[], "a subcommand is required"),
            (&["frob"], "unrecognized subcommand 'frob'"),
            (&["help", "frob"], "unrecognized subcommand 'frob'"),
            (&["info", "--bogus", "i"], "unexpected argument '--bogus'"),
            (
                &["info", "--json", "--json", "i"],
                "'--json' cannot be used multiple times",
            ),
            (&["info", "--json=1", "i"], "unexpected argument '--json=1'"),
            (&["info", "i", "j"], "unexpected argument 'j'"),
            (
                &["add", "i", "b", "-g"],
                "a value is required for '--granularity <GRANULARITY>'",
            ),
            (&["rename", "i", "b"], "not provided: <NEW>"),
            (&["create", "i"], "not provided: <SIZE>"),
            (
                &["set", "i", "b", "0", "1x"],
                "invalid value '1x' for '<LENGTH>'",
            ),
            (
                &["extents", "--length", "1", "i", "b"],
                "not provided: --offset <OFFSET>",
            ),
        ];
        for (words, want) in cases {
            let e = usage(words);
            assert!(e.contains(want), "{words:?}: {e}");
            assert!(!e.contains('\n'), "{words:?}: {e}");
            assert!(e.ends_with("--help)"), "{words:?}: {e}");
        }
        assert!(usage(&["clear", "i"]).ends_with("(see qbm clear --help)"));
        // --version belongs to qbm, not to its subcommands.
        assert!(usage(&["info", "--version", "i"]).contains("'--version'"));
    }

    /// Any word salad of the grammar's own words and junk: never a panic,
    /// and a refusal is one line that points to help.
    #[test]
    fn any_command_line_parses_or_is_refused_in_one_line() {
        use proptest::prelude::*;
        let mut words: Vec<String> = [
            "--",
            "-",
            "help",
            "-h",
            "--help",
            "-V",
            "--version",
            "-U",
            "--force-share",
            "--write-intent",
            "--json",
            "--json=1",
            "-g",
            "-g64k",
            "--granularity=1M",
            "-b",
            "--offset",
            "--length",
            "--offset=4096",
            "1x",
            "-5",
            "0",
            "64k",
            "16T",
            "img",
            "bm",
            "\u{e9}",
            "",
            " ",
            "--bogus",
            "-Z",
            "--=",
            "-gg",
        ]
        .iter()
        .map(|w| w.to_string())
        .collect();
        for s in &SUBS {
            words.push(s.name.to_string());
            words.extend(s.opts.iter().map(|o| format!("--{}", o.long)));
        }
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(2000));
        runner
            .run(
                &proptest::collection::vec(proptest::sample::select(words), 0..8),
                |line| {
                    match parse_strings(line.clone()) {
                        Outcome::Usage(e) => {
                            prop_assert!(
                                !e.contains('\n') && e.ends_with("--help)"),
                                "{line:?}: {e}"
                            )
                        }
                        Outcome::Print(text) => prop_assert!(text.ends_with('\n'), "{line:?}"),
                        Outcome::Run(_) => {}
                    }
                    Ok(())
                },
            )
            .unwrap();
    }
}
