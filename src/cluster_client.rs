//! A client of a cluster: it fetches the cluster map from any node, keeps a connection per
//! node, and sends each table operation to the primary of its key's shard. A node that does not
//! serve the shard answers `NotPrimary` (nothing ran): the client refreshes its map and tries
//! again, as it does when a node cannot be reached at all, until `ROUTE_DEADLINE`. An error
//! after a request was sent (the connection broke, `Indeterminate`) is returned: the write may
//! or may not have applied, and only the caller knows whether retrying it is safe.
//!
//! A request to a node that stopped answering (paused, partitioned) ends at the options'
//! `request_timeout`, as with `Client`: pick one shorter than a failover to move on sooner.
//!
//! Tables are `Table` handles, as with `Client` and `Grid` (the same `RemoteTable`, over this
//! client's routing). `count` and `scan` need every shard: they go to any node, which gathers
//! each shard's part from its primary.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use heapgrid_actors::cluster::map::ClusterMap;
use heapgrid_actors::{GridError, Key};

use crate::client::{Client, ClientOptions, OpRoute, RemoteTable};
use crate::grid::Table;
use crate::protocol::{OpResult, RequestBody, ResponseBody, TableOp};
use heapgrid_actors::grid::TableOptions;

/// How long an operation keeps looking for its shard's primary (a failover takes about a
/// second).
pub const ROUTE_DEADLINE: Duration = Duration::from_secs(10);
/// The longest a connection's handshake may take (less if `request_timeout` is less).
const CONNECT_WAIT: Duration = Duration::from_secs(2);
/// How long a map refresh waits for the nodes' answers.
const REFRESH_WAIT: Duration = Duration::from_millis(500);
/// Pause between tries while no primary answers.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

struct Inner {
    opts: ClientOptions,
    seeds: Vec<SocketAddr>,
    conns: Mutex<HashMap<SocketAddr, Client>>,
    map: Mutex<ClusterMap>,
    /// Spreads `ReadFrom::Replica` gets over a shard's copies.
    next_pick: std::sync::atomic::AtomicU64,
}

/// A client of every node of a cluster.
#[derive(Clone)]
pub struct ClusterClient {
    inner: Arc<Inner>,
}

impl ClusterClient {
    /// Connects through any of `seeds` (client addresses) and fetches the map.
    pub async fn connect(seeds: &[SocketAddr], opts: ClientOptions) -> Result<ClusterClient, GridError> {
        let opts = ClientOptions { connect_attempts: 1, ..opts };
        let inner = Inner {
            opts,
            seeds: seeds.to_vec(),
            conns: Mutex::default(),
            map: Mutex::default(),
            next_pick: Default::default(),
        };
        let c = ClusterClient { inner: Arc::new(inner) };
        c.refresh().await?;
        Ok(c)
    }

    /// The map as last fetched.
    pub fn map(&self) -> ClusterMap {
        self.inner.map.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        let map = self.map();
        let mut out: Vec<SocketAddr> = map.members().filter_map(|m| m.addr.parse().ok()).collect();
        out.extend(self.inner.seeds.iter().filter(|s| !out.contains(s)).copied().collect::<Vec<_>>());
        out
    }

    async fn client(&self, addr: SocketAddr) -> Result<Client, GridError> {
        if let Some(c) = self.inner.conns.lock().unwrap_or_else(|e| e.into_inner()).get(&addr) {
            return Ok(c.clone());
        }
        // A stopped node's kernel still accepts the connection; its handshake never comes.
        let wait = self.inner.opts.request_timeout.min(CONNECT_WAIT);
        let c =
            tokio::time::timeout(wait, Client::connect_with(addr, self.inner.opts.clone())).await.map_err(
                |_| GridError::Unavailable(format!("{addr} did not complete the handshake within {wait:?}")),
            )??;
        self.inner.conns.lock().unwrap_or_else(|e| e.into_inner()).insert(addr, c.clone());
        Ok(c)
    }

    fn forget(&self, addr: SocketAddr) {
        self.inner.conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&addr);
    }

    /// Fetches the map from every node at once and keeps the newest that arrives within
    /// `REFRESH_WAIT` (a node that is down or stopped does not hold it up).
    pub async fn refresh(&self) -> Result<(), GridError> {
        let asks = self.addrs().into_iter().map(|addr| async move {
            let ask = async {
                let c = self.client(addr).await?;
                c.cluster_status().await
            };
            match tokio::time::timeout(REFRESH_WAIT, ask).await {
                Ok(Ok(s)) => Ok(s.map),
                Ok(Err(e)) => {
                    self.forget(addr);
                    Err(e)
                }
                Err(_) => {
                    self.forget(addr);
                    Err(GridError::Unavailable(format!("{addr} did not answer within {REFRESH_WAIT:?}")))
                }
            }
        });
        let mut last = GridError::Unavailable("no node to ask".into());
        let mut newest: Option<ClusterMap> = None;
        for r in futures_util::future::join_all(asks).await {
            match r {
                Ok(m) if newest.as_ref().is_none_or(|n| m.version > n.version) => newest = Some(m),
                Ok(_) => {}
                Err(e) => last = e,
            }
        }
        let Some(m) = newest else { return Err(last) };
        let mut map = self.inner.map.lock().unwrap_or_else(|e| e.into_inner());
        if m.version >= map.version {
            *map = m;
        }
        Ok(())
    }

    /// A connection to the node that serves the cluster's locks (`Client::session`, fenced
    /// writes): one node, the service's primary, serves them for every client; its replicas
    /// take over if it fails (call this again then: the map is refreshed first).
    pub async fn locks(&self) -> Result<Client, GridError> {
        self.service(heapgrid_actors::cluster::map::LOCKS_SERVICE).await
    }

    /// A connection to the primary of feed `name` (`Client::feed`), which serves it for every
    /// client (other nodes answer `NotPrimary` naming it); call it again after a failover.
    pub async fn feed_node(&self, name: &str) -> Result<Client, GridError> {
        self.service(&heapgrid_actors::cluster::map::feed_map_name(name)).await
    }

    /// A connection to the node that serves the cluster's queues (`Client::queue`).
    pub async fn queues(&self) -> Result<Client, GridError> {
        self.service(heapgrid_actors::cluster::map::QUEUES_SERVICE).await
    }

    async fn service(&self, name: &str) -> Result<Client, GridError> {
        let until = tokio::time::Instant::now() + ROUTE_DEADLINE;
        // A service fails over like a shard: ask for the map's placement of it now.
        let _ = self.refresh().await;
        loop {
            let addr = {
                let map = self.inner.map.lock().unwrap_or_else(|e| e.into_inner());
                map.placement(&(name.to_string(), 0))
                    .and_then(|p| map.member(p.primary))
                    .and_then(|m| m.addr.parse::<SocketAddr>().ok())
            };
            if let Some(addr) = addr {
                return self.client(addr).await;
            }
            if tokio::time::Instant::now() >= until {
                return Err(GridError::Unavailable(format!(
                    "the cluster map places no {} service",
                    name.trim_start_matches('$')
                )));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
            let _ = self.refresh().await;
        }
    }

    /// Creates a replicated table (through any node; the map places it).
    pub async fn create_table(&self, name: &str, options: TableOptions) -> Result<Table, GridError> {
        let body = RequestBody::CreateTable { name: name.into(), options };
        self.any(body).await?;
        self.refresh().await?;
        Ok(self.table(name))
    }

    /// Sends a request that any node can answer.
    async fn any(&self, body: RequestBody) -> Result<ResponseBody, GridError> {
        let mut last = GridError::Unavailable("no node to ask".into());
        for addr in self.addrs() {
            match self.client(addr).await {
                Ok(c) => return c.request(body).await,
                Err(e) => {
                    self.forget(addr);
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// A table of the cluster.
    pub fn table(&self, name: &str) -> Table {
        Table::over(Arc::new(RemoteTable::new(self.clone(), name)))
    }

    /// Whether the map lists `table`.
    fn in_map(&self, table: &str) -> bool {
        self.inner.map.lock().unwrap_or_else(|e| e.into_inner()).table(table).is_some()
    }

    /// Where the primary of the shard of `key` in `table` is, per the map; for `any_copy`, the
    /// primary or one of its in-sync replicas, at random.
    fn primary_of(&self, table: &str, key: &Key, any_copy: bool) -> Option<SocketAddr> {
        let map = self.inner.map.lock().unwrap_or_else(|e| e.into_inner());
        let spec = map.table(table)?;
        let shard = key.shard(spec.shards);
        let p = map.placement(&(table.to_string(), shard))?;
        let mut node = p.primary;
        if any_copy && !p.in_sync.is_empty() {
            let pick = self.inner.next_pick.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as usize;
            let i = pick % (p.in_sync.len() + 1);
            if i > 0 {
                node = p.in_sync[i - 1];
            }
        }
        map.member(node)?.addr.parse().ok()
    }

    /// Runs `op` on the primary of `key`'s shard, following the map.
    async fn route(&self, table: &str, key: &Key, op: TableOp) -> Result<OpResult, GridError> {
        let until = tokio::time::Instant::now() + ROUTE_DEADLINE;
        let mut last;
        loop {
            let any_copy = matches!(op, TableOp::GetCopy { .. });
            let addr = match self.primary_of(table, key, any_copy) {
                Some(a) => Some(a),
                None => {
                    let _ = self.refresh().await;
                    self.primary_of(table, key, any_copy)
                }
            };
            match addr {
                None => last = GridError::NoSuchTable(table.into()),
                Some(addr) => match self.client(addr).await {
                    // Not reached: nothing was sent.
                    Err(e) => {
                        self.forget(addr);
                        last = e;
                    }
                    Ok(c) => {
                        match c.request(RequestBody::Table { table: table.into(), op: op.clone() }).await {
                            Ok(ResponseBody::Op(r)) => return Ok(r),
                            Ok(r) => {
                                return Err(GridError::Protocol(format!("a table operation answered {r:?}")));
                            }
                            // Refused before it ran: ask again where the primary is.
                            Err(e @ GridError::NotPrimary { .. }) => last = e,
                            // A table just created: the map has it, the node has not started
                            // it yet (nothing ran).
                            Err(e @ GridError::NoSuchTable(_)) if self.in_map(table) => last = e,
                            Err(e) => {
                                if matches!(e, GridError::Unavailable(_)) {
                                    self.forget(addr);
                                }
                                return Err(e);
                            }
                        }
                    }
                },
            }
            if tokio::time::Instant::now() >= until {
                return Err(last);
            }
            tokio::time::sleep(RETRY_PAUSE).await;
            let _ = self.refresh().await;
        }
    }
}

impl OpRoute for ClusterClient {
    fn send<'a>(&'a self, table: &'a str, op: TableOp) -> BoxFuture<'a, Result<OpResult, GridError>> {
        Box::pin(async move {
            let Some(key) = op.routing_key().cloned() else {
                // Count, scan, prefix: any node gathers every shard's part from its primary.
                return match self.any(RequestBody::Table { table: table.into(), op }).await? {
                    ResponseBody::Op(r) => Ok(r),
                    r => Err(GridError::Protocol(format!("a table operation answered {r:?}"))),
                };
            };
            self.route(table, &key, op).await
        })
    }

    fn read_from(&self) -> crate::client::ReadFrom {
        self.inner.opts.read_from
    }
}
