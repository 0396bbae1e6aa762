//! `mount -t fuse.mount_vfs MANIFEST DIR -o cas=...` and /etc/fstab lines: mount(8) runs
//! `/sbin/mount.fuse.mount_vfs SOURCE TARGET [-sfnv] [-o OPTIONS] [-t TYPE]`. That name is a
//! symlink to mount_vfs ([`install`]); [`main`] turns the `-o` options into mount_vfs flags
//! (`key=value` -> `--key=value`, `_` -> `-`; `key` -> `--key`), drops the generic mount options,
//! and execs the ordinary `mount_vfs SOURCE TARGET ... --daemon`, which returns once the mount is
//! live: one code path for every way of mounting.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;

use crate::cli::Cli;

/// The helper's file name: mount(8) looks for `mount.<type>` and the type is `fuse.mount_vfs`.
pub const HELPER_NAME: &str = "mount.fuse.mount_vfs";

/// Options mount(8), systemd or FUSE define that mean nothing to mount_vfs (it is read-only
/// unless `writable`, and never runs setuid or device files); accepted silently.
const GENERIC: &[&str] = &[
    "defaults",
    "rw",
    "ro",
    "auto",
    "noauto",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "_netdev",
    "nofail",
    "exec",
    "noexec",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "sync",
    "async",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "diratime",
    "nodiratime",
    "lazytime",
    "nolazytime",
    "dirsync",
    "silent",
    "loud",
    "fsname",
    "subtype",
    "default_permissions",
    "auto_unmount",
];

/// What mount(8) passed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HelperArgs {
    pub source: String,
    pub target: String,
    pub options: Vec<String>,
    /// `-f`: do everything but mount (print the command).
    pub fake: bool,
    /// `-v`: print the command before running it.
    pub verbose: bool,
}

/// Whether this process was started under the helper's name (argv[0]).
pub fn invoked_as_helper() -> bool {
    std::env::args_os()
        .next()
        .is_some_and(|arg0| Path::new(&arg0).file_name() == Some(HELPER_NAME.as_ref()))
}

/// Parses `SOURCE TARGET [-sfnv] [-o OPTIONS] [-t TYPE] [-N NAMESPACE]`.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<HelperArgs, String> {
    let mut out = HelperArgs::default();
    let mut positional = Vec::new();
    let mut args = args.into_iter().map(|a| {
        a.into_string()
            .map_err(|a| format!("argument {a:?} is not UTF-8"))
    });
    while let Some(arg) = args.next() {
        let arg = arg?;
        let mut value_of = |flag: &str, inline: &str| -> Result<String, String> {
            if inline.is_empty() {
                args.next()
                    .unwrap_or_else(|| Err(format!("{flag} needs a value")))
            } else {
                Ok(inline.to_string())
            }
        };
        if let Some(inline) = arg.strip_prefix("-o") {
            out.options.extend(split_options(&value_of("-o", inline)?));
        } else if let Some(inline) = arg.strip_prefix("-t") {
            value_of("-t", inline)?;
        } else if let Some(inline) = arg.strip_prefix("-N") {
            return Err(format!(
                "-N {}: mounting in another namespace is not supported",
                value_of("-N", inline)?
            ));
        } else if arg.len() > 1
            && arg.starts_with('-')
            && arg[1..].chars().all(|c| "sfnv".contains(c))
        {
            out.fake |= arg.contains('f');
            out.verbose |= arg.contains('v');
        } else if arg.starts_with('-') {
            return Err(format!("unknown argument {arg}"));
        } else {
            positional.push(arg);
        }
    }
    let [source, target]: [String; 2] = positional.try_into().map_err(|p: Vec<String>| {
        format!(
            "expected SOURCE TARGET (the manifest and the mountpoint), got {} arguments",
            p.len()
        )
    })?;
    out.source = source;
    out.target = target;
    Ok(out)
}

/// Splits `a,b=c,d="e,f"` at commas outside double quotes, dropping the quotes.
fn split_options(text: &str) -> Vec<String> {
    let (mut out, mut current, mut quoted) = (Vec::new(), String::new(), false);
    for c in text.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    out.push(current);
    out.retain(|o| !o.is_empty());
    out
}

/// The mount_vfs arguments for `args` (after the program name), and the options it ignored
/// because no mount_vfs flag has that name.
pub fn translate(args: &HelperArgs) -> (Vec<OsString>, Vec<String>) {
    let command = Cli::command();
    let flags: Vec<&str> = command
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|long| !["help", "version", "daemon"].contains(long))
        .collect();
    let mut out: Vec<OsString> = vec![args.source.clone().into(), args.target.clone().into()];
    let mut unknown = Vec::new();
    for option in &args.options {
        let (key, value) = match option.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (option.as_str(), None),
        };
        if GENERIC.contains(&key) || key.starts_with("x-") || key == "comment" {
            continue;
        }
        // FUSE's own name for it.
        let flag = match key {
            "nonempty" => "allow-non-empty".to_string(),
            key => key.replace('_', "-"),
        };
        if !flags.contains(&flag.as_str()) {
            unknown.push(option.clone());
            continue;
        }
        out.push(match value {
            Some(value) => format!("--{flag}={value}").into(),
            None => format!("--{flag}").into(),
        });
    }
    out.push("--daemon".into());
    (out, unknown)
}

/// Runs the helper: parses what mount(8) passed and execs `mount_vfs ... --daemon`. Returns
/// only on a mistake (exit 2, mount(8)'s "incorrect invocation"), with `-f`, or if exec fails.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args = match parse(args) {
        Ok(args) => args,
        Err(e) => {
            eprintln!(
                "{HELPER_NAME}: {e}; usage: {HELPER_NAME} MANIFEST MOUNTPOINT [-o OPTIONS] (run \
                 by mount -t fuse.mount_vfs)"
            );
            return ExitCode::from(2);
        }
    };
    let (mount_args, unknown) = translate(&args);
    for option in unknown {
        eprintln!("{HELPER_NAME}: ignoring mount option `{option}`: mount_vfs has no such flag");
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("{HELPER_NAME}: cannot find the mount_vfs binary: {e}");
            return ExitCode::from(1);
        }
    };
    if args.verbose || args.fake {
        let line: Vec<_> = mount_args.iter().map(|a| a.to_string_lossy()).collect();
        eprintln!("{HELPER_NAME}: {} {}", exe.display(), line.join(" "));
    }
    if args.fake {
        return ExitCode::SUCCESS;
    }
    // arg0 "mount_vfs": the binary may be a copy under the helper's name, which would run this
    // function again.
    let e = std::process::Command::new(&exe)
        .arg0("mount_vfs")
        .args(mount_args)
        .exec();
    eprintln!("{HELPER_NAME}: cannot run {}: {e}", exe.display());
    ExitCode::from(1)
}

/// `mount_vfs install-mount-helper`: `prefix/mount.fuse.mount_vfs` as a symlink to `binary`
/// (default: this executable), replacing an older one. Returns the helper's path.
pub fn install(prefix: &Path, binary: Option<&Path>) -> Result<PathBuf, String> {
    let binary = match binary {
        Some(b) => b.to_path_buf(),
        None => std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?,
    };
    let binary = std::fs::canonicalize(&binary)
        .map_err(|e| format!("--binary {}: {e}", binary.display()))?;
    std::fs::create_dir_all(prefix).map_err(|e| format!("{}: {e}", prefix.display()))?;
    let helper = prefix.join(HELPER_NAME);
    // A fresh link renamed over the old one: never a moment without a helper.
    let temporary = prefix.join(format!(".{HELPER_NAME}.{}", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    std::os::unix::fs::symlink(&binary, &temporary)
        .and_then(|()| std::fs::rename(&temporary, &helper))
        .map_err(|e| {
            let _ = std::fs::remove_file(&temporary);
            format!("cannot install {}: {e}", helper.display())
        })?;
    Ok(helper)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn mount_8_arguments_parse() {
        let parsed = parse(args(&[
            "m.json",
            "/mnt",
            "-n",
            "-o",
            "rw,cas=/c",
            "-t",
            "fuse.mount_vfs",
        ]))
        .unwrap();
        assert_eq!(parsed.source, "m.json");
        assert_eq!(parsed.target, "/mnt");
        assert_eq!(parsed.options, ["rw", "cas=/c"]);
        assert!(!parsed.fake);
        let parsed = parse(args(&["m", "/mnt", "-fv", "-ocas=/c"])).unwrap();
        assert!(parsed.fake && parsed.verbose);
        assert!(parse(args(&["m"])).is_err());
        assert!(parse(args(&["m", "/mnt", "--cas"])).is_err());
    }

    #[test]
    fn options_become_flags() {
        let parsed = HelperArgs {
            source: "m".into(),
            target: "/mnt".into(),
            options: split_options(
                "defaults,_netdev,nofail,x-systemd.requires=a,cas=/c,shards=2,cache_dir=\"/a,b\",\
                 allow_other,nonempty,frobnicate=1",
            ),
            ..HelperArgs::default()
        };
        let (out, unknown) = translate(&parsed);
        let out: Vec<_> = out.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            out,
            [
                "m",
                "/mnt",
                "--cas=/c",
                "--shards=2",
                "--cache-dir=/a,b",
                "--allow-other",
                "--allow-non-empty",
                "--daemon"
            ]
        );
        assert_eq!(unknown, ["frobnicate=1"]);
        // What the helper builds is an ordinary mount_vfs command line.
        let cli = <Cli as clap::Parser>::try_parse_from(
            std::iter::once("mount_vfs").chain(out.iter().copied()),
        )
        .unwrap();
        assert!(cli.mount.daemon && cli.mount.allow_other);
        assert_eq!(cli.mount.shards, Some(2));
    }
}
