//! A throwaway PyKMIP server for tests, with certificates made here.
//!
//! [`Pki::new`] makes an ECDSA P-256 certificate authority with `openssl`
//! in a directory, and [`Pki::issue`] leaf certificates for `127.0.0.1`
//! (serverAuth and clientAuth). [`PykmipServer::start`] writes a server
//! configuration (TLS 1.2, client certificates required, sqlite database
//! and policy directory in its temp dir), starts `pykmip-server` on a free
//! loopback port, waits until it completes a mutual-TLS handshake
//! (`openssl s_client`), and kills it by PID when dropped, so it also dies
//! when a test panics. Keys are created, activated and revoked with
//! PyKMIP's own Python client ([`PykmipServer::py`]), never through kmsfs.
//!
//! `pykmip-server` comes from `pip install pykmip` (scripts/setup).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::bao::reserve_port_pair;

/// How long to wait for a fresh server to accept TLS.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A certificate and its private key (mode 0600).
#[derive(Debug, Clone)]
pub struct CertPair {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key, mode 0600.
    pub key: PathBuf,
}

/// A test certificate authority in a directory.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
    name: String,
    /// The CA certificate (PEM).
    pub ca_cert: PathBuf,
    ca_key: PathBuf,
}

fn openssl(args: &[&str], dir: &Path) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn new_key(dir: &Path, file: &str) -> Result<PathBuf> {
    openssl(
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            file,
        ],
        dir,
    )?;
    let p = dir.join(file);
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600))?;
    Ok(p)
}

impl Pki {
    /// A new ECDSA P-256 CA named `name`, valid for `days`, in `dir`.
    pub fn new(dir: &Path, name: &str, days: u32) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let ext = dir.join(format!("{name}-ext.cnf"));
        fs::write(
            &ext,
            "[ca]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n\
             subjectKeyIdentifier=hash\n\
             [leaf]\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyAgreement\n\
             extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1\n\
             subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n\
             [req]\ndistinguished_name=dn\n[dn]\n",
        )?;
        let ca_key = new_key(dir, &format!("{name}-ca.key"))?;
        let ca_cert = dir.join(format!("{name}-ca.pem"));
        openssl(
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                ca_key.to_str().ok_or_else(|| anyhow!("path"))?,
                "-subj",
                &format!("/CN={name} test CA"),
                "-days",
                &days.to_string(),
                "-config",
                ext.to_str().ok_or_else(|| anyhow!("path"))?,
                "-extensions",
                "ca",
                "-out",
                ca_cert.to_str().ok_or_else(|| anyhow!("path"))?,
            ],
            dir,
        )?;
        Ok(Pki {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            ca_cert,
            ca_key,
        })
    }

    /// A leaf certificate with common name `cn` for 127.0.0.1, valid for `days`.
    pub fn issue(&self, cn: &str, days: u32) -> Result<CertPair> {
        self.issue_as(cn, cn, days)
    }

    /// Like [`Pki::issue`], into files named after `file` (so a second
    /// certificate for the same common name does not replace the first).
    pub fn issue_as(&self, file: &str, cn: &str, days: u32) -> Result<CertPair> {
        let stem = format!("{}-{file}", self.name);
        let key = new_key(&self.dir, &format!("{stem}.key"))?;
        let csr = self.dir.join(format!("{stem}.csr"));
        let cert = self.dir.join(format!("{stem}.pem"));
        let ext = self.dir.join(format!("{}-ext.cnf", self.name));
        let s = |p: &Path| {
            p.to_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("path"))
        };
        openssl(
            &[
                "req",
                "-new",
                "-key",
                &s(&key)?,
                "-subj",
                &format!("/CN={cn}"),
                "-config",
                &s(&ext)?,
                "-out",
                &s(&csr)?,
            ],
            &self.dir,
        )?;
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &s(&csr)?,
                "-CA",
                &s(&self.ca_cert)?,
                "-CAkey",
                &s(&self.ca_key)?,
                "-set_serial",
                &format!("{}", rand_serial()),
                "-days",
                &days.to_string(),
                "-extfile",
                &s(&ext)?,
                "-extensions",
                "leaf",
                "-out",
                &s(&cert)?,
            ],
            &self.dir,
        )?;
        Ok(CertPair { cert, key })
    }
}

fn rand_serial() -> u64 {
    let mut b = [0u8; 8];
    getrandom_fill(&mut b);
    u64::from_le_bytes(b) >> 2
}

fn getrandom_fill(b: &mut [u8]) {
    // /dev/urandom is enough for certificate serials in tests.
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        use std::io::Read as _;
        let _ = f.read_exact(b);
    }
}

/// A running PyKMIP server, killed on drop.
pub struct PykmipServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// The CA that signed the server and client certificates.
    pub pki: Pki,
    /// The server's certificate.
    pub server: CertPair,
    /// The client certificate kmsfs and the Python client use (objects
    /// belong to the certificate's common name that created them).
    pub client: CertPair,
}

impl PykmipServer {
    /// Makes certificates and starts a server on a free loopback port.
    pub fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let pki = Pki::new(&dir.path().join("pki"), "kmip", 365)?;
        let server = pki.issue("kmip-server", 365)?;
        let client = pki.issue("kmsfs-client", 365)?;
        fs::create_dir(dir.path().join("policies"))?;
        let mut last = anyhow!("not started");
        let mut me = PykmipServer {
            child: None,
            port: 0,
            dir,
            pki,
            server,
            client,
        };
        for _ in 0..3 {
            me.port = reserve_port_pair()?;
            match me.launch() {
                Ok(()) => return Ok(me),
                Err(e) => {
                    me.kill();
                    last = e;
                }
            }
        }
        Err(last)
    }

    fn write_config(&self) -> Result<PathBuf> {
        let d = self.dir.path();
        let conf = d.join("server.conf");
        fs::write(
            &conf,
            format!(
                "[server]\nhostname=127.0.0.1\nport={}\ncertificate_path={}\nkey_path={}\n\
                 ca_path={}\nauth_suite=TLS1.2\npolicy_path={}\nenable_tls_client_auth=True\n\
                 database_path={}\nlogging_level=INFO\n",
                self.port,
                self.server.cert.display(),
                self.server.key.display(),
                self.pki.ca_cert.display(),
                d.join("policies").display(),
                d.join("pykmip.db").display(),
            ),
        )?;
        Ok(conf)
    }

    fn launch(&mut self) -> Result<()> {
        let conf = self.write_config()?;
        let d = self.dir.path();
        let out = fs::File::create(d.join("stdout.log"))?;
        // Its own process group: `pykmip-server` may be a wrapper script
        // (pyenv shim) whose Python child outlives a kill of the wrapper
        // alone, so the whole group is killed on stop.
        let child = Command::new("pykmip-server")
            .process_group(0)
            .arg("-f")
            .arg(&conf)
            .arg("-l")
            .arg(d.join("server.log"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawning pykmip-server (pip install pykmip; scripts/setup does it)")?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    bail!("pykmip-server exited early ({status}): {}", self.log_tail());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "pykmip-server did not accept TLS in time: {}",
                    self.log_tail()
                );
            }
            if self.handshake_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// True when a mutual-TLS handshake with the client certificate succeeds.
    fn handshake_ok(&self) -> bool {
        Command::new("openssl")
            .args(["s_client", "-brief", "-verify_return_error", "-connect"])
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("-CAfile")
            .arg(&self.pki.ca_cert)
            .arg("-cert")
            .arg(&self.client.cert)
            .arg("-key")
            .arg(&self.client.key)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(pgid) = i32::try_from(c.id()) {
                // SAFETY: kill(2) with a negative PID signals the process
                // group this child leads (made by `process_group(0)`); it
                // touches no memory.
                unsafe {
                    libc::kill(-pgid, libc::SIGKILL);
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server (its database and certificates stay).
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts the stopped server again on the same port with the same
    /// database.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.launch()
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The server's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of the server's log, for error messages.
    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        for f in ["stdout.log", "server.log"] {
            let text = fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(15);
            s.push_str(&lines[from..].join("\n"));
            s.push('\n');
        }
        s
    }

    /// Runs `code` in Python with `c`, a connected PyKMIP `ProxyKmipClient`
    /// using the client certificate, and `enums` imported; returns stdout.
    pub fn py(&self, code: &str) -> Result<String> {
        let prelude = format!(
            "import warnings\nwarnings.filterwarnings('ignore')\n\
             from kmip.pie.client import ProxyKmipClient\nfrom kmip.core import enums\n\
             c = ProxyKmipClient(hostname='127.0.0.1', port={}, cert={:?}, key={:?}, ca={:?}, \
             config_file='/dev/null', kmip_version=enums.KMIPVersion.KMIP_1_2)\nc.open()\n",
            self.port,
            self.client.cert.display().to_string(),
            self.client.key.display().to_string(),
            self.pki.ca_cert.display().to_string(),
        );
        let out = Command::new("python3")
            .arg("-c")
            .arg(format!("{prelude}{code}\nc.close()\n"))
            .stdin(Stdio::null())
            .output()
            .context("running python3")?;
        if !out.status.success() {
            bail!(
                "PyKMIP client failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log_tail()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Creates an AES-256 key with usage mask Encrypt|Decrypt (and `name`,
    /// if given); activates it when `activate`. Returns its Unique Identifier.
    pub fn create_key(&self, name: Option<&str>, activate: bool) -> Result<String> {
        self.create_key_with_usage(name, &["ENCRYPT", "DECRYPT"], activate)
    }

    /// Like [`PykmipServer::create_key`] with the given usage mask bits
    /// (`enums.CryptographicUsageMask` names).
    pub fn create_key_with_usage(
        &self,
        name: Option<&str>,
        usage: &[&str],
        activate: bool,
    ) -> Result<String> {
        let mask: Vec<String> = usage
            .iter()
            .map(|u| format!("enums.CryptographicUsageMask.{u}"))
            .collect();
        // The high-level `c.create` always adds Encrypt and Decrypt to the
        // mask, so the request is built with the lower-level proxy.
        let name_attr = name
            .map(|n| format!("attrs.append(f.create_attribute(enums.AttributeType.NAME, {n:?}))\n"))
            .unwrap_or_default();
        let code = format!(
            "from kmip.core import objects as cobjects\n\
             f = c.attribute_factory\n\
             attrs = [f.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_ALGORITHM, enums.CryptographicAlgorithm.AES),\n\
             f.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_LENGTH, 256),\n\
             f.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_USAGE_MASK, [{}])]\n\
             {name_attr}\
             r = c.proxy.create(enums.ObjectType.SYMMETRIC_KEY, cobjects.TemplateAttribute(attributes=attrs))\n\
             assert r.result_status.value == enums.ResultStatus.SUCCESS, r.result_message\n\
             uid = r.uuid\n{}print(uid)",
            mask.join(", "),
            if activate { "c.activate(uid)\n" } else { "" }
        );
        self.py(&code)
    }

    /// Revokes key `uid`: reason "cessation of operation" leaves it
    /// Deactivated, "key compromise" Compromised.
    pub fn revoke(&self, uid: &str, compromised: bool) -> Result<()> {
        let reason = if compromised {
            "KEY_COMPROMISE"
        } else {
            "CESSATION_OF_OPERATION"
        };
        self.py(&format!(
            "c.revoke(enums.RevocationReasonCode.{reason}, {uid:?})"
        ))
        .map(|_| ())
    }
}

impl Drop for PykmipServer {
    fn drop(&mut self) {
        self.kill();
    }
}
