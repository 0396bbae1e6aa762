//! `deadline_vfs` end to end with the released Deadline Cloud client (`deadline` 0.60.x) as the
//! worker: inputs uploaded to moto by the client's own upload code (`S3AssetManager`, what
//! `deadline bundle submit` runs), the client's `AssetSync` mounting them (VIRTUAL) through
//! `VFSProcessManager` and our install layout, as a non-root job user created for the test; the
//! job user reads every input byte for byte and writes outputs; the client's output sync finds
//! exactly the new and changed files and uploads them; a second input sync with two manifests for
//! the same root replaces the mount with their merge; the client's teardown unmounts, and nothing
//! is left mounted or running.
//!
//! Needs root, sudo, fusermount3, a /dev/fuse the job user may open and `user_allow_other` in
//! /etc/fuse.conf: scripts/setup.sh provides them all.

mod common;
#[path = "support/deadline_venv.rs"]
mod deadline_venv;
#[path = "support/skip.rs"]
mod skip;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const WORKER: &str = r#"
import hashlib, json, logging, os, subprocess, sys, time
from pathlib import Path

import boto3
from deadline.job_attachments.asset_sync import AssetSync
from deadline.job_attachments.models import (
    Attachments, JobAttachmentS3Settings, JobAttachmentsFileSystem,
)
from deadline.job_attachments.os_file_permission import PosixFileSystemPermissionSettings
from deadline.job_attachments.upload import S3AssetManager
from deadline.job_attachments.vfs import VFSProcessManager

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="worker: %(message)s")
src, session_dir, user, bucket, job_script, work = sys.argv[1:7]
session_dir = Path(session_dir)
settings = JobAttachmentS3Settings(s3BucketName=bucket, rootPrefix="DeadlineCloud")
session = boto3.Session(region_name="us-east-1")
s3 = session.client("s3")

def upload(root, inputs, outputs):
    manager = S3AssetManager(farm_id="farm-1", queue_id="queue-1",
                             job_attachment_settings=settings, session=session)
    group = manager.prepare_paths_for_upload(input_paths=inputs, output_paths=outputs,
                                             referenced_paths=[])
    _, manifests = manager.hash_assets_and_create_manifest(
        group.asset_groups, group.total_input_files, group.total_input_bytes,
        hash_cache_dir=os.path.join(work, "hash-cache"))
    _, attachments = manager.upload_assets(manifests, s3_check_cache_dir=os.path.join(work, "s3-cache"))
    return attachments

def tree(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}

inputs = [str(p) for p in Path(src).rglob("*") if p.is_file()]
attachments = upload(src, inputs, [os.path.join(src, "out")])
attachments.fileSystem = JobAttachmentsFileSystem.VIRTUAL.value
assert len(attachments.manifests) == 1, attachments
root_path = attachments.manifests[0].rootPath

perms = PosixFileSystemPermissionSettings(os_user=user, os_group=user, dir_mode=0o20, file_mode=0o20)
env = {k: os.environ[k] for k in (
    "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL_S3",
    "AWS_EC2_METADATA_DISABLED", "PATH", "RUST_LOG") if k in os.environ}
sync = AssetSync(farm_id="farm-1", boto3_session=session)
mounted = []
started = time.monotonic()
sync.attachment_sync_inputs(settings, attachments, "queue-1", "job-1", session_dir,
                            fs_permission_settings=perms, os_env_vars=env,
                            on_vfs_mount_complete=mounted.append)
print(f"mounted in {time.monotonic() - started:.1f}s", file=sys.stderr)
assert mounted == [True], mounted
pids = (session_dir / "vfs_pids.txt").read_text().strip().splitlines()
assert len(pids) == 1, pids
mount_point = pids[0].split(":")[0]
assert VFSProcessManager.is_mount(mount_point)

def job(step):
    out = subprocess.run(["sudo", "-u", user, "python3", job_script, mount_point, step],
                         capture_output=True, text=True)
    sys.stderr.write(out.stderr)
    assert out.returncode == 0, f"job step {step} failed"
    return json.loads(out.stdout)

# The job user reads every input byte for byte, then writes its outputs.
assert job("read") == tree(src), "inputs differ through the mount"
written = job("write")

found = []
real_get_output_files = AssetSync._get_output_files
def spy(self, *args, **kwargs):
    files = real_get_output_files(self, *args, **kwargs)
    found.extend(files)
    return files
AssetSync._get_output_files = spy
stats = sync.sync_outputs(settings, attachments, "queue-1", "job-1", "step-1", "task-1",
                          "sessionaction-1", time.time(), session_dir)
found_paths = sorted(f.rel_path for f in found)
assert found_paths == sorted(written), (found_paths, sorted(written))
for f in found:
    key = f"DeadlineCloud/Data/{f.file_hash}.xxh128"
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == written[f.rel_path], f.rel_path
print(f"output sync found and uploaded {found_paths}", file=sys.stderr)

# A second input sync for the same root from two manifests (the first job's and a second
# upload's): the worker merges them with the running mount's manifest and replaces the mount.
extra = Path(src) / "cache" / "sim.vdb"
extra.parent.mkdir()
extra.write_bytes(os.urandom(1 << 20))
attachments2 = upload(src, [str(extra), str(Path(src) / "scene" / "scene.ma")], [])
assert attachments2.manifests[0].rootPath == root_path, (attachments2, root_path)
merged = Attachments(manifests=[attachments.manifests[0], attachments2.manifests[0]],
                     fileSystem=JobAttachmentsFileSystem.VIRTUAL.value)
mounted.clear()
sync.attachment_sync_inputs(settings, merged, "queue-1", "job-1", session_dir,
                            fs_permission_settings=perms, os_env_vars=env,
                            on_vfs_mount_complete=mounted.append)
assert mounted == [True], mounted
assert job("read") == tree(src), "merged inputs differ through the replacing mount"
print("second mount serves the merged manifest", file=sys.stderr)

sync.cleanup_session(session_dir, JobAttachmentsFileSystem.VIRTUAL.value, os_user=user)
assert not VFSProcessManager.is_mount(mount_point), "still mounted after cleanup_session"
print(f"MOUNT_POINT {mount_point}")
"#;

/// Runs as the job user inside the mount: `read` prints every file's sha256; `write` writes the
/// task's outputs and prints what the output sync must find (relative path -> sha256).
const JOB: &str = r#"
import hashlib, json, os, sys
from pathlib import Path
root, step = Path(sys.argv[1]), sys.argv[2]
if step == "read":
    print(json.dumps({str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in sorted(root.rglob("*")) if p.is_file()}))
    sys.exit(0)
written = {}
def put(rel, data, mode="wb"):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, mode) as f:
        f.write(data)
    written[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
put("out/new.txt", b"a new output\n")
put("out/frames/frame_0001.exr", os.urandom(3 << 20))
put("out/change.txt", b" appended by the task\n", "ab")
# Changed, but outside the output directory: not an output.
with open(root / "scene/notes.txt", "ab") as f:
    f.write(b"edited\n")
print(json.dumps(written))
"#;

/// A user created for the test, deleted (with whatever it still runs) on drop.
struct JobUser {
    name: String,
}

impl JobUser {
    fn create() -> JobUser {
        let name = format!("mvfs-job-{}", std::process::id());
        let o = Command::new("useradd")
            .args(["--no-create-home", "--user-group", "--shell", "/bin/sh"])
            .arg(&name)
            .output()
            .expect("useradd");
        assert!(
            o.status.success(),
            "useradd: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        JobUser { name }
    }

    fn uid(&self) -> u32 {
        let o = Command::new("id")
            .arg("-u")
            .arg(&self.name)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
    }

    /// Pids of this user's processes (from /proc).
    fn processes(&self) -> Vec<(u32, String)> {
        let uid = self.uid();
        let mut found = Vec::new();
        for entry in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(status) = fs::read_to_string(entry.path().join("status")) else {
                continue;
            };
            let real_uid = status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|u| u.parse::<u32>().ok());
            if real_uid == Some(uid) {
                let cmd = fs::read_to_string(entry.path().join("cmdline"))
                    .unwrap_or_default()
                    .replace('\0', " ");
                found.push((pid, cmd));
            }
        }
        found
    }
}

impl Drop for JobUser {
    fn drop(&mut self) {
        for (pid, _) in self.processes() {
            common::signal(pid, libc::SIGKILL);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}

/// Unmounts (lazily) whatever is still mounted under `dir` on drop, after a failed test.
struct NoMountsLeft(PathBuf);

impl NoMountsLeft {
    fn mounts(&self) -> Vec<PathBuf> {
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .map(PathBuf::from)
            .filter(|p| p.starts_with(&self.0))
            .collect()
    }
}

impl Drop for NoMountsLeft {
    fn drop(&mut self) {
        for mount in self.mounts() {
            let _ = Command::new("umount").arg("-l").arg(&mount).output();
        }
    }
}

/// What the test needs from the machine, or why it cannot run.
fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("it must run as root (it creates a job user and sudoes to it)".into());
    }
    for tool in ["sudo", "fusermount3", "findmnt", "useradd"] {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .any(|d| d.join(tool).is_file());
        if !found {
            return Some(format!("{tool} is not installed (run scripts/setup.sh)"));
        }
    }
    let mode = fs::metadata("/dev/fuse").map(|m| m.permissions().mode() & 0o777);
    if mode.map_or(true, |m| m & 0o006 != 0o006) {
        return Some("/dev/fuse is not 0666 (run scripts/setup.sh)".into());
    }
    let conf = fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
    if !conf.lines().any(|l| l.trim() == "user_allow_other") {
        return Some("/etc/fuse.conf lacks user_allow_other (run scripts/setup.sh)".into());
    }
    None
}

fn write(path: &Path, data: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
}

#[test]
fn deadline_worker_mounts_reads_writes_and_syncs_outputs_as_a_job_user() {
    let test = "deadline_worker_mounts_reads_writes_and_syncs_outputs_as_a_job_user";
    let started = Instant::now();
    if let Some(why) = missing_prerequisite() {
        skip::skip_or_fail(test, &why);
        return;
    }
    let Some(venv) = deadline_venv::deadline_venv(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let tmp = tmp.path();
    let _no_mounts = NoMountsLeft(tmp.to_path_buf());

    // The job's inputs (one root: the submitter's project directory).
    let project = tmp.join("project");
    write(
        &project.join("scene/scene.ma"),
        &common::pattern(1, 5 << 20),
    );
    write(&project.join("scene/notes.txt"), b"notes\n");
    write(
        &project.join("tex/a b/wood.png"),
        &common::pattern(2, 300_000),
    );
    write(&project.join("tex/empty"), b"");
    write(&project.join("out/keep.txt"), b"left alone\n");
    write(&project.join("out/change.txt"), b"changed by the task:");

    // The install layout the worker finds through DEADLINE_VFS_PATH.
    let prefix = tmp.join("deadline_vfs");
    let o = Command::new(common::BIN)
        .arg("install-deadline-vfs")
        .arg("--prefix")
        .arg(&prefix)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "install-deadline-vfs: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for path in [
        "bin/deadline_vfs",
        "link/fusermount3",
        "scripts/production/al2/run_deadline_vfs_al2.sh",
    ] {
        assert!(prefix.join(path).exists(), "{path} not installed");
    }

    let moto = common::s3_servers::Moto::start();
    moto.create_bucket("job-attachments");
    let aws = tmp.join("aws");
    write(
        &aws.join("credentials"),
        b"[e2e]\naws_access_key_id = testing\naws_secret_access_key = testing\n",
    );
    write(&aws.join("config"), b"[profile e2e]\nregion = us-east-1\n");
    let job_script = tmp.join("job.py");
    write(&job_script, JOB.as_bytes());
    let session_dir = tmp.join("session");
    fs::create_dir_all(&session_dir).unwrap();
    fs::create_dir_all(tmp.join("home")).unwrap();

    let user = JobUser::create();
    // Everything that the job user must read (the test's tree is root's).
    let o = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(tmp)
        .output()
        .unwrap();
    assert!(o.status.success());

    let o = Command::new(venv.join("bin/python"))
        .args(["-c", WORKER])
        .arg(&project)
        .arg(&session_dir)
        .arg(&user.name)
        .arg("job-attachments")
        .arg(&job_script)
        .arg(tmp)
        .current_dir(tmp)
        .env("HOME", tmp.join("home"))
        .env("DEADLINE_VFS_PATH", &prefix)
        .env("AWS_PROFILE", "e2e")
        .env("AWS_CONFIG_FILE", aws.join("config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", aws.join("credentials"))
        .env("AWS_ENDPOINT_URL_S3", moto.endpoint())
        .env("AWS_ENDPOINT_URL", moto.endpoint())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("DEADLINE_CLOUD_TELEMETRY_OPT_OUT", "true")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("{out}");
    assert!(o.status.success(), "the worker failed (log above)");
    assert!(out.contains("MOUNT_POINT "), "{out}");

    // Nothing left mounted or running: the VFS exits once the worker unmounts it.
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while !user.processes().is_empty() && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        user.processes(),
        vec![],
        "the job user's processes outlived the unmount"
    );
    assert_eq!(
        _no_mounts.mounts(),
        Vec::<PathBuf>::new(),
        "mounts left behind"
    );
    eprintln!("{test}: {:.1}s", started.elapsed().as_secs_f64());
}

#[test]
fn deadline_vfs_refuses_what_it_does_not_understand_with_one_line() {
    let bin = env!("CARGO_BIN_EXE_deadline_vfs");
    for (args, expected) in [
        (
            &[
                "/mnt",
                "-f",
                "--bucket=b",
                "--manifest=m.json",
                "--casprefix=P/Data",
                "--bogus",
            ][..],
            "unknown option --bogus",
        ),
        (
            &[
                "/mnt",
                "-f",
                "--bucket=b",
                "--manifest=m.json",
                "--casprefix=P/Objects",
            ][..],
            "expected ROOT_PREFIX/Data",
        ),
        (
            &["/mnt", "-f", "--bucket=b", "--manifest=m.json"][..],
            "--casprefix=ROOT_PREFIX/Data is required",
        ),
    ] {
        let o = Command::new(bin).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("deadline_vfs: "), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    }
}
