//! A PostgreSQL cluster of a test's own, for what the shared cluster must not go
//! through: moving the transaction counter with `pg_resetwal`, stopping the server,
//! swapping its data directory for an older copy. Trust authentication on loopback,
//! no TLS; stopped and removed when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

use tidemark_core::db::DbSettings;

/// Transaction ids per `pg_xact` segment file (32 pages of 8 kB, 2 bits per xid).
const XACTS_PER_SEGMENT: u64 = 32 * 8192 * 4;

#[derive(Debug)]
pub struct PrivateCluster {
    dir: tempfile::TempDir,
    bin_dir: PathBuf,
    pub port: u16,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a server program as the `postgres` OS user when we are root (the server
/// refuses root), as ourselves otherwise; panics with its output on failure.
fn as_pg(program: &Path, args: &[&str]) {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    let out = cmd.args(args).output().expect("run a server program");
    assert!(
        out.status.success(),
        "{} {args:?}: {}{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl PrivateCluster {
    /// initdb and start a new cluster with the test cluster's binaries.
    pub fn start() -> Self {
        let bin_dir: PathBuf = std::env::var("TIDEMARK_TEST_PG_BIN")
            .expect("TIDEMARK_TEST_PG_BIN is set by scripts/test")
            .into();
        let dir = tempfile::Builder::new()
            .prefix("tidemark-private-pg.")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let cluster = Self {
            dir,
            bin_dir,
            port: free_port(),
        };
        cluster.chown();
        as_pg(
            &cluster.bin_dir.join("initdb"),
            &[
                "-D",
                cluster.data().to_str().expect("utf8"),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
        );
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             shared_buffers = 32MB\nmax_connections = 40\n",
            cluster.port,
            cluster.dir.path().display()
        );
        let path = cluster.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).expect("postgresql.conf");
        text.push_str(&conf);
        std::fs::write(&path, text).expect("write postgresql.conf");
        cluster.pg_ctl_start();
        cluster
    }

    fn chown(&self) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(self.dir.path())
                .status()
                .expect("chown")
                .success();
            assert!(ok, "chown the private cluster to postgres");
        }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn pg_ctl_start(&self) {
        let log = self.dir.path().join("postgres.log");
        as_pg(
            &self.bin_dir.join("pg_ctl"),
            &[
                "-D",
                self.data().to_str().expect("utf8"),
                "-l",
                log.to_str().expect("utf8"),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    pub fn stop(&self) {
        as_pg(
            &self.bin_dir.join("pg_ctl"),
            &[
                "-D",
                self.data().to_str().expect("utf8"),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    pub fn restart(&self) {
        self.pg_ctl_start();
    }

    pub fn url(&self, dbname: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{dbname}?sslmode=disable",
            self.port
        )
    }

    pub fn settings(&self, dbname: &str) -> DbSettings {
        DbSettings::from_url(&self.url(dbname).into()).expect("private cluster URL")
    }

    pub async fn create_database(&self, name: &str) -> DbSettings {
        crate::exec(
            &self.settings("postgres"),
            &format!("CREATE DATABASE \"{name}\""),
        )
        .await;
        self.settings(name)
    }

    /// Freezes every database (template0 included), so the counter may move on by
    /// almost 2^31 without the server refusing new transactions.
    pub async fn freeze_all(&self) {
        crate::exec(
            &self.settings("postgres"),
            "UPDATE pg_database SET datallowconn = true WHERE datname = 'template0'",
        )
        .await;
        let client = tidemark_core::db::connect(&self.settings("postgres"))
            .await
            .expect("connect");
        let names: Vec<String> = client
            .query("SELECT datname::text FROM pg_database", &[])
            .await
            .expect("databases")
            .iter()
            .map(|r| r.get(0))
            .collect();
        for name in names {
            crate::exec(&self.settings(&name), "VACUUM (FREEZE)").await;
        }
    }

    /// The server's 64-bit next transaction id.
    pub async fn next_xid(&self) -> u64 {
        let client = tidemark_core::db::connect(&self.settings("postgres"))
            .await
            .expect("connect");
        let text: String = client
            .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
            .await
            .expect("xmax")
            .get(0);
        text.parse().expect("an xid")
    }

    /// Moves the 64-bit transaction counter to `xid` with `pg_resetwal` (server stopped
    /// and restarted), creating the `pg_xact` segment the new ids need, as the
    /// `pg_resetwal` documentation says to.
    pub fn jump_xid(&self, xid: u64) {
        self.stop();
        let epoch = (xid >> 32).to_string();
        let low = (xid & 0xffff_ffff).to_string();
        as_pg(
            &self.bin_dir.join("pg_resetwal"),
            &[
                "-x",
                &low,
                "-e",
                &epoch,
                "-D",
                self.data().to_str().expect("utf8"),
            ],
        );
        let segment = self
            .data()
            .join("pg_xact")
            .join(format!("{:04X}", (xid & 0xffff_ffff) / XACTS_PER_SEGMENT));
        if !segment.exists() {
            std::fs::write(&segment, vec![0u8; (XACTS_PER_SEGMENT / 4) as usize])
                .expect("write pg_xact segment");
            self.chown();
        }
        self.restart();
    }

    /// Moves the counter to `target` in steps the server accepts (each less than 2^31
    /// past the oldest unfrozen xid), freezing everything before each step.
    pub async fn advance_xid_to(&self, target: u64) {
        const STEP: u64 = 2_000_000_000;
        loop {
            let now = self.next_xid().await;
            if now >= target {
                return;
            }
            self.freeze_all().await;
            self.jump_xid(target.min(now + STEP));
        }
    }

    /// Copies the stopped cluster's data directory to `to` (a file-level snapshot).
    pub fn snapshot_data(&self, to: &Path) {
        let ok = Command::new("cp")
            .args(["-a"])
            .arg(self.data())
            .arg(to)
            .status()
            .expect("cp")
            .success();
        assert!(ok, "copy the data directory");
    }

    /// Replaces the stopped cluster's data directory with `from` (as a restore of a
    /// file-level snapshot would).
    pub fn replace_data(&self, from: &Path) {
        std::fs::remove_dir_all(self.data()).expect("remove data");
        let ok = Command::new("cp")
            .args(["-a"])
            .arg(from)
            .arg(self.data())
            .status()
            .expect("cp")
            .success();
        assert!(ok, "copy the data directory back");
    }

    /// The directory tests may keep files in (removed with the cluster).
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let program = self.bin_dir.join("pg_ctl");
        let data = self.data();
        let args = [
            "-D",
            data.to_str().unwrap_or(""),
            "-m",
            "immediate",
            "-w",
            "stop",
        ];
        let _ = if is_root() {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&program)
                .args(args)
                .output()
        } else {
            Command::new(&program).args(args).output()
        };
    }
}
