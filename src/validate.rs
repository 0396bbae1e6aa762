//! `mount_vfs validate MANIFEST`: format, counts, size and hash of a valid manifest, or every
//! problem found. Exit status 0 valid, 1 invalid, 2 unreadable.

use std::path::Path;
use std::process::ExitCode;

use crate::cli::ValidateArgs;
use crate::manifest::{Format, Hash, Manifest};

/// The report for `bytes` (read from `source`): (text for stdout, text for stderr, exit code).
pub fn report(bytes: &[u8], source: &str) -> (String, String, u8) {
    match Manifest::decode(bytes, source) {
        Ok(m) => {
            let c = m.counts();
            let hash = m.hash();
            let mut out = format!(
                "manifest: {source}\nformat: {} ({})\ndiff: {}\nfiles: {}\ndirs: {}\nsymlinks: {}\ndeletions: {}\ntotal size: {}\nhash: {hash}\n",
                m.format().version_string(m.is_diff()),
                match m.format() {
                    Format::V2023_03_03 | Format::V2025_12_04Beta => "manifestVersion",
                    Format::RelativeBeta2025_12 | Format::AbsoluteBeta2025_12 => "specificationVersion",
                },
                match m.parent_manifest_hash() {
                    Some(p) => format!("yes, parent {p}"),
                    None => "no".to_owned(),
                },
                c.files,
                c.dirs,
                c.symlinks,
                c.deletions,
                m.total_size(),
            );
            let file_hash = Hash::of(bytes);
            if file_hash != hash {
                out.push_str(&format!(
                    "note: the file is not in canonical form; xxh128 of its bytes is {file_hash}, the hash above is of the canonical encoding\n"
                ));
            }
            (out, String::new(), 0)
        }
        Err(e) => {
            let mut err = format!(
                "{source}: invalid manifest, {} problem(s):\n",
                e.problems.len()
            );
            for p in &e.problems {
                err.push_str(&format!("  {p}\n"));
            }
            if e.truncated {
                err.push_str(&format!(
                    "  ... stopped after {} problems\n",
                    e.problems.len()
                ));
            }
            (String::new(), err, 1)
        }
    }
}

/// The `validate` subcommand.
pub fn run(args: &ValidateArgs) -> ExitCode {
    let path: &Path = &args.manifest;
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("mount_vfs validate: cannot read {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let (out, err, code) = report(&bytes, &path.display().to_string());
    print!("{out}");
    eprint!("{err}");
    ExitCode::from(code)
}
