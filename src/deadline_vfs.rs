//! `deadline_vfs`: the command line the AWS Deadline Cloud worker (the `deadline` Python package,
//! `deadline/job_attachments/vfs.py`) launches for `fileSystem == "VIRTUAL"`, mapped onto the
//! same [`MountConfig`] as `mount_vfs` (no second code path), and `mount_vfs
//! install-deadline-vfs`, which lays out `{prefix}/bin`, `{prefix}/link` and the launch script
//! where the worker looks for them.
//!
//! The worker runs, as the job user:
//! `run_deadline_vfs_al2.sh MOUNT -f --clienttype=deadline --bucket=B --manifest=M --region=R
//! -oallow_other [--casprefix=ROOT/Data] [--cachedir=SESSION/.vfs_object_cache]`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::cli::Cli;
use crate::mount::{MountConfig, MountError};
use clap::Parser;

/// What the worker's command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadlineArgs {
    pub mountpoint: PathBuf,
    pub manifest: PathBuf,
    pub bucket: String,
    /// The job attachments root prefix (`--casprefix` without its `/Data`).
    pub root_prefix: String,
    pub region: Option<String>,
    pub cache_dir: Option<PathBuf>,
    pub allow_other: bool,
    /// `-o` options we do not act on (logged, not refused).
    pub ignored_options: Vec<String>,
}

fn usage(message: impl Into<String>) -> MountError {
    MountError::Usage(message.into())
}

/// `--name=value` or `--name value`.
fn long_value(
    arg: &str,
    name: &str,
    rest: &mut impl Iterator<Item = String>,
) -> Result<Option<String>, MountError> {
    let Some(tail) = arg.strip_prefix(name) else {
        return Ok(None);
    };
    if let Some(value) = tail.strip_prefix('=') {
        return Ok(Some(value.to_string()));
    }
    if !tail.is_empty() {
        return Ok(None);
    }
    rest.next()
        .map(Some)
        .ok_or_else(|| usage(format!("{name} needs a value")))
}

/// Parses the worker's argv (without the program name).
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<DeadlineArgs, MountError> {
    let mut args = args
        .into_iter()
        .map(|a| {
            a.into_string()
                .map_err(|a| usage(format!("argument {a:?} is not UTF-8")))
        })
        .collect::<Result<Vec<_>, _>>()?
        .into_iter();
    let (mut mountpoint, mut manifest, mut bucket, mut casprefix, mut region, mut cache_dir) =
        (None, None, None, None, None, None);
    let mut allow_other = false;
    let mut ignored_options = Vec::new();
    while let Some(arg) = args.next() {
        // Foreground is the only mode: the worker keeps the process as its handle on the mount.
        if arg == "-f" || arg == "-d" {
            continue;
        }
        if let Some(options) = arg.strip_prefix("-o") {
            let options = if options.is_empty() {
                args.next().ok_or_else(|| usage("-o needs mount options"))?
            } else {
                options.to_string()
            };
            for option in options.split(',').filter(|o| !o.is_empty()) {
                match option {
                    "allow_other" => allow_other = true,
                    other => ignored_options.push(other.to_string()),
                }
            }
            continue;
        }
        let mut matched = false;
        for (name, slot) in [
            ("--bucket", &mut bucket),
            ("--manifest", &mut manifest),
            ("--region", &mut region),
            ("--casprefix", &mut casprefix),
            ("--cachedir", &mut cache_dir),
        ] {
            if let Some(value) = long_value(&arg, name, &mut args)? {
                *slot = Some(value);
                matched = true;
                break;
            }
        }
        if matched {
            continue;
        }
        if let Some(kind) = arg.strip_prefix("--clienttype=") {
            if kind != "deadline" {
                return Err(usage(format!(
                    "--clienttype={kind}: only --clienttype=deadline is supported"
                )));
            }
            continue;
        }
        if arg.starts_with('-') {
            return Err(usage(format!(
                "unknown option {arg}; deadline_vfs takes MOUNTPOINT -f --clienttype=deadline \
                 --bucket=B --manifest=M --region=R [-oallow_other] [--casprefix=ROOT/Data] \
                 [--cachedir=DIR]"
            )));
        }
        if mountpoint.replace(PathBuf::from(&arg)).is_some() {
            return Err(usage(format!("a second mountpoint {arg}: give one")));
        }
    }
    let mountpoint = mountpoint.ok_or_else(|| usage("no mountpoint given"))?;
    let manifest = manifest.ok_or_else(|| usage("--manifest=FILE is required"))?;
    let bucket = bucket.ok_or_else(|| usage("--bucket=BUCKET is required"))?;
    let casprefix = casprefix.ok_or_else(|| {
        usage(
            "--casprefix=ROOT_PREFIX/Data is required: objects are read from \
             s3://BUCKET/ROOT_PREFIX/Data/{hash}.xxh128 (the queue's job attachments root prefix)",
        )
    })?;
    let casprefix = casprefix.trim_matches('/');
    let root_prefix = if casprefix == "Data" {
        String::new()
    } else {
        casprefix
            .strip_suffix("/Data")
            .ok_or_else(|| {
                usage(format!(
                    "--casprefix={casprefix}: expected ROOT_PREFIX/Data (objects under \
                     ROOT_PREFIX/Data/{{hash}}.xxh128)"
                ))
            })?
            .to_string()
    };
    Ok(DeadlineArgs {
        mountpoint,
        manifest: PathBuf::from(manifest),
        bucket,
        root_prefix,
        region: region.filter(|r| !r.is_empty()),
        cache_dir: cache_dir.map(PathBuf::from),
        allow_other,
        ignored_options,
    })
}

/// The cache (and overlay) directory: `--cachedir`, else `DEADLINE_VFS_CACHE` when it is an
/// absolute path, else `.vfs_object_cache` in the working directory (the worker starts us in the
/// session directory).
pub fn cache_dir(args: &DeadlineArgs, env_cache: Option<OsString>) -> PathBuf {
    if let Some(dir) = &args.cache_dir {
        return dir.clone();
    }
    match env_cache.map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir,
        _ => PathBuf::from(".vfs_object_cache"),
    }
}

/// The `mount_vfs` command line the worker's arguments amount to, as the same [`MountConfig`]:
/// an S3 store (endpoint and credentials from the environment: `AWS_PROFILE`, the standard
/// chain, `AWS_ENDPOINT_URL_S3`), a writable overlay in the cache directory (the worker uploads
/// what the job writes into the mount's output directories), foreground.
pub fn mount_config(args: &DeadlineArgs, cache_dir: &Path) -> Result<MountConfig, MountError> {
    let mut argv: Vec<OsString> = vec![
        "mount_vfs".into(),
        args.manifest.clone().into(),
        args.mountpoint.clone().into(),
        "--bucket".into(),
        args.bucket.clone().into(),
        "--root-prefix".into(),
        args.root_prefix.clone().into(),
        "--writable".into(),
        "--cache-dir".into(),
        cache_dir.into(),
    ];
    if let Some(region) = &args.region {
        argv.extend(["--region".into(), region.into()]);
    }
    if args.allow_other {
        argv.push("--allow-other".into());
    }
    let cli = Cli::try_parse_from(argv).map_err(|e| usage(e.to_string()))?;
    let mut config = MountConfig::try_from(cli.mount)?;
    // A render node's cores belong to the render: a few shards serve a job's inputs (each pool
    // still follows the manifest, within 1/8 of the memory).
    config.max_default_shards = Some(DEFAULT_MAX_SHARDS);
    Ok(config)
}

/// The most shards `deadline_vfs` starts (fewer on smaller machines or manifests).
pub const DEFAULT_MAX_SHARDS: usize = 4;

/// The launch script the worker runs (`{prefix}/scripts/production/al2/run_deadline_vfs_al2.sh`).
const LAUNCH_SCRIPT: &str = r#"#!/bin/sh
# Installed by `mount_vfs install-deadline-vfs`: the AWS Deadline Cloud worker starts the VFS
# through this script (as the job user, with PATH starting at ../../../link).
here=$(dirname "$0")
exec "$here/../../../bin/deadline_vfs" "$@"
"#;

/// Where the system's `fusermount3` is, for `{prefix}/link/fusermount3`.
fn system_fusermount3() -> Option<PathBuf> {
    [
        "/usr/bin/fusermount3",
        "/bin/fusermount3",
        "/usr/local/bin/fusermount3",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// `mount_vfs install-deadline-vfs --prefix DIR`: copies `deadline_vfs` (the binary built beside
/// `mount_vfs`, or `binary`) to `{prefix}/bin`, links the system `fusermount3` into
/// `{prefix}/link`, and writes the launch script. Returns what it did, one line per step.
pub fn install(prefix: &Path, binary: Option<&Path>) -> Result<Vec<String>, String> {
    use std::os::unix::fs::PermissionsExt;
    let binary = match binary {
        Some(b) => b.to_path_buf(),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find this executable: {e}"))?
            .with_file_name("deadline_vfs"),
    };
    if !binary.is_file() {
        return Err(format!(
            "{} not found: build it (`cargo build --release --bin deadline_vfs`) or pass --binary",
            binary.display()
        ));
    }
    let fusermount3 = system_fusermount3().ok_or_else(|| {
        "fusermount3 is not installed (Debian/Ubuntu: apt-get install fuse3; Amazon Linux: \
         dnf install fuse3): the job user mounts through it"
            .to_string()
    })?;
    let mut done = Vec::new();
    let mkdir = |dir: &Path| {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
    };
    let bin = prefix.join("bin");
    let link = prefix.join("link");
    let scripts = prefix.join("scripts/production/al2");
    for dir in [&bin, &link, &scripts, &prefix.join("lib")] {
        mkdir(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("cannot chmod {}: {e}", dir.display()))?;
    }
    // Copy through a temporary name: replacing a binary that a mount is running stays safe.
    let target = bin.join("deadline_vfs");
    let staging = bin.join(".deadline_vfs.new");
    std::fs::copy(&binary, &staging)
        .and_then(|_| std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755)))
        .and_then(|()| std::fs::rename(&staging, &target))
        .map_err(|e| format!("cannot install {}: {e}", target.display()))?;
    done.push(format!("{} (from {})", target.display(), binary.display()));
    let link_path = link.join("fusermount3");
    match std::fs::remove_file(&link_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot replace {}: {e}", link_path.display())),
    }
    std::os::unix::fs::symlink(&fusermount3, &link_path)
        .map_err(|e| format!("cannot link {}: {e}", link_path.display()))?;
    done.push(format!(
        "{} -> {}",
        link_path.display(),
        fusermount3.display()
    ));
    let script = scripts.join("run_deadline_vfs_al2.sh");
    std::fs::write(&script, LAUNCH_SCRIPT)
        .and_then(|()| std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)))
        .map_err(|e| format!("cannot write {}: {e}", script.display()))?;
    done.push(script.display().to_string());
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(line: &str) -> Vec<OsString> {
        line.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn parses_the_workers_command_line() {
        let args = parse(argv(
            "/s/mnt -f --clienttype=deadline --bucket=job-bucket --manifest=/s/m.json --region=us-west-2 \
             -oallow_other --casprefix=DeadlineCloud/Data --cachedir=/s/.vfs_object_cache",
        ))
        .unwrap();
        assert_eq!(
            args,
            DeadlineArgs {
                mountpoint: "/s/mnt".into(),
                manifest: "/s/m.json".into(),
                bucket: "job-bucket".into(),
                root_prefix: "DeadlineCloud".into(),
                region: Some("us-west-2".into()),
                cache_dir: Some("/s/.vfs_object_cache".into()),
                allow_other: true,
                ignored_options: vec![],
            }
        );
        let config = mount_config(&args, Path::new("/s/.vfs_object_cache")).unwrap();
        assert!(config.writable && config.allow_other && !config.daemon);
        assert_eq!(config.max_default_shards, Some(DEFAULT_MAX_SHARDS));
    }

    #[test]
    fn tolerates_other_mount_options_and_refuses_unknown_flags() {
        let args = parse(argv(
            "m -f --bucket b --manifest x --casprefix=Data -o ro,noatime,allow_other",
        ))
        .unwrap();
        assert_eq!(args.root_prefix, "");
        assert!(args.allow_other);
        assert_eq!(args.ignored_options, ["ro", "noatime"]);
        assert!(parse(argv("m --bucket=b --manifest=x --casprefix=P/Data --bogus")).is_err());
        assert!(parse(argv("m --bucket=b --manifest=x --casprefix=P")).is_err());
        assert!(parse(argv("m --bucket=b --manifest=x")).is_err());
        assert!(parse(argv(
            "m --clienttype=other --bucket=b --manifest=x --casprefix=Data"
        ))
        .is_err());
    }

    #[test]
    fn cache_dir_falls_back_to_the_environment_then_the_session() {
        let mut args = parse(argv("m --bucket=b --manifest=x --casprefix=Data")).unwrap();
        assert_eq!(cache_dir(&args, Some("/c".into())), PathBuf::from("/c"));
        assert_eq!(
            cache_dir(&args, Some("on".into())),
            PathBuf::from(".vfs_object_cache")
        );
        args.cache_dir = Some("/d".into());
        assert_eq!(cache_dir(&args, Some("/c".into())), PathBuf::from("/d"));
    }
}
