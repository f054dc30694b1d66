//! Snippets end to end: over TCP against the real binary (client API and CLI), and on the
//! embedded grid.

use std::collections::BTreeMap;

use heapgrid::{
    Budget, Client, ClientOptions, Grid, GridError, GridOptions, Key, SnippetErrorKind, SnippetFailure,
    TableOptions, Value,
};

use crate::server::{Server, cli};

fn json(s: &str) -> Value {
    Value::from_json(&serde_json::from_str(s).unwrap()).unwrap()
}

fn failure(r: Result<Value, GridError>) -> SnippetFailure {
    match r {
        Err(GridError::Snippet(f)) => f,
        r => panic!("expected a snippet error, got {r:?}"),
    }
}

async fn client(s: &Server) -> Client {
    Client::connect(s.addr).await.unwrap()
}

/// Every entry of a table, in key order.
async fn contents(c: &Client, table: &str) -> Vec<(Key, Value)> {
    c.table(table).scan_page(.., 10_000, false).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_read_and_change_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    let c = client(&s).await;
    let users = c.create_table("users", TableOptions::default()).await.unwrap();
    users.put_value("bob", json(r#"{"name": "Bob", "visits": 1, "tags": ["a"]}"#)).await.unwrap();
    assert_eq!(c.eval("users['bob']").await.unwrap(), json(r#"{"name": "Bob", "visits": 1, "tags": ["a"]}"#));
    // Nested mutation persists, grid-scoped and collection-scoped.
    assert_eq!(c.eval("users['bob']['visits'] += 1\nusers['bob']['visits']").await.unwrap(), Value::Int(2));
    assert_eq!(users.eval("users['bob']['tags'].append('b')\nlen(users)").await.unwrap(), Value::Int(1));
    assert_eq!(
        users.get_value("bob").await.unwrap().unwrap(),
        json(r#"{"name": "Bob", "visits": 2, "tags": ["a", "b"]}"#)
    );
    // Loops and functions.
    let src = r#"
def score(doc):
    return doc["visits"] * 10 + len(doc["tags"])

for i in range(5):
    users[f"u{i}"] = {"visits": i, "tags": []}
out = {}
for k, doc in users.scan(prefix="u"):
    out[k] = score(doc)
del users["u0"]
out
"#;
    assert_eq!(c.eval(src).await.unwrap(), json(r#"{"u0":0,"u1":10,"u2":20,"u3":30,"u4":40}"#));
    assert_eq!(users.count().await.unwrap(), 5);
    // Errors carry a kind, a line and a column.
    let f = failure(c.eval("x = 1\ny = x + nosuch").await);
    assert_eq!((f.kind, f.line, f.col), (SnippetErrorKind::Name, 2, 9), "{f}");
    let f = failure(c.eval("x = [1,\n").await);
    assert_eq!(f.kind, SnippetErrorKind::Syntax, "{f}");
    let f = failure(c.eval("users['zed'] = 1\nusers['nobody']['x']").await);
    assert_eq!((f.kind, f.line), (SnippetErrorKind::Value, 2), "{f}");
    assert!(!users.contains("zed").await.unwrap(), "a failed snippet leaves no trace");
    // Big stored values come back as references the client fetches by path.
    c.eval("users['bob']['friends'] = [f'f{i}' for i in range(1200)]").await.unwrap();
    let bob = c.eval("users['bob']").await.unwrap();
    assert_eq!(bob.to_json()["friends"], serde_json::json!({"$ref": "users/bob/friends", "len": 1200}));
    assert_eq!(c.fetch("users/bob/friends", 1199, 5).await.unwrap(), json(r#"["f1199"]"#));
    // The CLI runs snippets too.
    let a = s.addr.to_string();
    let (ok, out) = cli(&["eval", "--addr", &a, "users['bob']['visits']"], None);
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "2");
    let (ok, out) = cli(
        &["shell", "--addr", &a],
        Some("for k in ['p', 'q']:\n    users[k] = 1\n\ndel users['p']\ncount users\nlen(users)\n"),
    );
    assert!(ok, "{out}");
    // `del users['p']` is a snippet, `count users` a command; both see 6 keys.
    assert!(out.trim_end().ends_with("6\n6") || out.trim_end().ends_with("6\r\n6"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_queue_built_as_a_list() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    let c = client(&s).await;
    let q = c.create_table("queues", TableOptions::default()).await.unwrap();
    let push = |p: u32, i: u32| format!("queues.setdefault('jobs', []).append({{'from': {p}, 'n': {i}}})");
    let pop = "q = queues.get('jobs', [])\nq.pop(0) if q else None";
    // Four producers push concurrently; every push is atomic in the shard actor.
    let mut tasks = Vec::new();
    for p in 0..4 {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                q.eval(&push(p, i)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Two consumers pop concurrently until empty: each job exactly once, each producer in order.
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let q = q.clone();
        consumers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                match q.eval(pop).await.unwrap() {
                    Value::Null => return got,
                    v => got.push(v),
                }
            }
        }));
    }
    let mut all = Vec::new();
    for t in consumers {
        all.push(t.await.unwrap());
    }
    let mut per_producer: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    let total: usize = all.iter().map(Vec::len).sum();
    assert_eq!(total, 100);
    for got in &all {
        let mut last: BTreeMap<i64, i64> = BTreeMap::new();
        for v in got {
            let j = v.to_json();
            let (p, n) = (j["from"].as_i64().unwrap(), j["n"].as_i64().unwrap());
            assert!(last.get(&p).is_none_or(|l| *l < n), "FIFO per producer within a consumer");
            last.insert(p, n);
            per_producer.entry(p).or_default().push(n);
        }
    }
    for (_, mut ns) in per_producer {
        ns.sort();
        assert_eq!(ns, (0..25).collect::<Vec<_>>());
    }
    assert_eq!(q.get_value("jobs").await.unwrap(), Some(json("[]")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_stop_snippets_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), &[]);
    let c = client(&s).await;
    let users = c.create_table("users", TableOptions::default()).await.unwrap();
    // Runs in the server's sandbox workers: wall time, memory and reads are budgets.
    let wall = || heapgrid::LimitOverrides { wall_ms: Some(300), ..Default::default() };
    let f = failure(
        c.eval_with("users['x'] = 1\nfor i in range(1000000000):\n    users['y'] = i", Value::Null, wall())
            .await,
    );
    assert_eq!(f.kind, SnippetErrorKind::Budget(Budget::WallTime), "{f}");
    let f = failure(
        users
            .eval_at(None, "users['x'] = 1\nfor i in range(1000000000):\n    pass", Value::Null, wall())
            .await,
    );
    assert_eq!(f.kind, SnippetErrorKind::Budget(Budget::WallTime), "{f}");
    let f = failure(c.eval("users['x'] = 1\ns = 'a'\nfor i in range(64):\n    s = s + s\nlen(s)").await);
    assert_eq!(f.kind, SnippetErrorKind::Budget(Budget::Memory), "{f}");
    let f = failure(c.eval("users['x'] = [0] * 1000000000").await);
    assert_eq!(f.kind, SnippetErrorKind::Budget(Budget::Memory), "{f}");
    // A generous wall budget: under a loaded debug build, building the list can take seconds.
    let slow_ok = heapgrid::LimitOverrides { wall_ms: Some(20_000), ..Default::default() };
    let f = failure(c.eval_with("[i for i in range(100000)]", Value::Null, slow_ok).await);
    assert_eq!(f.kind, SnippetErrorKind::Budget(Budget::ResultSize), "{f}");
    let tight = heapgrid::LimitOverrides { steps: Some(50), ..Default::default() };
    let f =
        failure(c.eval_with("users['x'] = 1\n[users.get(i) for i in range(100)]", Value::Null, tight).await);
    assert_eq!(f.kind, SnippetErrorKind::Budget(Budget::Steps), "{f}");
    assert_eq!(users.count().await.unwrap(), 0, "no write of a stopped snippet is left");
    c.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_snippets_on_two_fresh_grids_give_the_same_contents() {
    let snippets: Vec<String> = (0..60)
        .map(|i| match i % 4 {
            0 => format!("users['k{}'] = {{'n': {i}, 'log': []}}", i % 7),
            1 => format!("d = users.get('k{}')\nif d != None:\n    d['n'] = d['n'] * 3 + {i}\n    d['log'].append({i})", i % 7),
            2 => format!("for k in users.keys(prefix='k', limit=3):\n    users[k]['n'] += {i}"),
            _ => format!("users.delete('k{}')", (i * 5) % 7),
        })
        .collect();
    let mut results = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let s = Server::start(dir.path(), &[]);
        let c = client(&s).await;
        c.create_table("users", TableOptions { shards: 3, fsync: None }).await.unwrap();
        let mut answers = Vec::new();
        for src in &snippets {
            answers.push(c.eval(src).await.map_err(|e| e.to_string()));
        }
        results.push((answers, contents(&c, "users").await));
    }
    assert_eq!(results[0], results[1]);
    assert!(!results[0].1.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn procedures_permissions_and_sharded_tables() {
    let dir = tempfile::tempdir().unwrap();
    let procs = dir.path().join("social.py");
    std::fs::write(
        &procs,
        "def visit(who):\n    users[who]['visits'] += 1\n    return users[who]['visits']\n",
    )
    .unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        serde_json::json!({"tokens": [
            {"token": "root", "permissions": {"*": ["admin", "read", "write", "eval"]}},
            {"token": "app", "permissions": {"users": ["read", "write"]}},
            {"token": "viewer", "permissions": {"users": ["read", "eval"]}}
        ]})
        .to_string(),
    )
    .unwrap();
    let data = dir.path().join("data");
    let args = ["--config", config.to_str().unwrap(), "--procedures", procs.to_str().unwrap()];
    let s = Server::start(&data, &args);
    let as_at = |addr, t: &str| {
        Client::connect_with(addr, ClientOptions { token: Some(t.into()), ..Default::default() })
    };
    let addr = s.addr;
    let as_ = |t: &str| as_at(addr, t);
    let root = as_("root").await.unwrap();
    let users = root.create_table("users", TableOptions { shards: 4, fsync: None }).await.unwrap();
    users.put_value("bob", json(r#"{"visits": 0}"#)).await.unwrap();
    assert_eq!(root.eval("visit('bob')\nvisit('bob')").await.unwrap(), Value::Int(2));
    // Collection-scoped on a sharded table: routed by key, and limited to that key's shard.
    assert_eq!(users.eval_on("bob", "visit(key)").await.unwrap(), Value::Int(3));
    let who = json(r#"{"who": "bob"}"#);
    let v = root.eval_with("users[args['who']]['visits']", who, Default::default()).await.unwrap();
    assert_eq!(v, Value::Int(3));
    assert!(matches!(users.eval("users['bob']").await, Err(GridError::Invalid(_))));
    // Stored procedures survive a restart.
    root.put_procedures(
        "stats",
        "def total():\n    n = 0\n    for _, d in users.scan():\n        n += d['visits']\n    return n\n",
    )
    .await
    .unwrap();
    assert_eq!(root.eval("total()").await.unwrap(), Value::Int(3));
    let f = failure(root.eval("visit('bob'").await);
    assert_eq!(f.kind, SnippetErrorKind::Syntax);
    // Permissions: eval is its own permission; writing needs write.
    let app = as_("app").await.unwrap();
    assert!(matches!(app.eval("users['bob']").await, Err(GridError::PermissionDenied { .. })));
    let viewer = as_("viewer").await.unwrap();
    assert_eq!(viewer.eval("users['bob']['visits']").await.unwrap(), Value::Int(3));
    assert!(matches!(
        viewer.eval("users['bob']['visits'] = 0").await,
        Err(GridError::PermissionDenied { .. })
    ));
    assert!(matches!(
        viewer.table("users").eval_on("bob", "users['bob'] = 1").await,
        Err(GridError::PermissionDenied { .. })
    ));
    assert!(matches!(
        viewer.put_procedures("x", "def f():\n    pass\n").await,
        Err(GridError::PermissionDenied { .. })
    ));
    drop((root, app, viewer, users));
    s.kill9();
    let s = Server::start(&data, &args);
    let root = as_at(s.addr, "root").await.unwrap();
    assert_eq!(root.eval("total()").await.unwrap(), Value::Int(3));
    root.drop_procedures("stats").await.unwrap();
    assert_eq!(failure(root.eval("total()").await).kind, SnippetErrorKind::Name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_grid_scoped_snippets_span_tables() {
    let dir = tempfile::tempdir().unwrap();
    let grid = Grid::open(dir.path(), GridOptions::default()).await.unwrap();
    grid.create_table("accounts", TableOptions { shards: 2, fsync: None }).await.unwrap();
    grid.create_table("log", TableOptions::default()).await.unwrap();
    let src = "accounts['a'] = {'balance': 10}\naccounts['b'] = {'balance': 0}\nlog['n'] = 0";
    grid.eval(src).await.unwrap();
    let transfer = r#"
amount = 3
accounts['a']['balance'] -= amount
accounts['b']['balance'] += amount
log['n'] += 1
[accounts['a']['balance'], accounts['b']['balance'], log['n']]
"#;
    assert_eq!(grid.eval(transfer).await.unwrap(), json("[7, 3, 1]"));
    assert_eq!(grid.eval(transfer).await.unwrap(), json("[4, 6, 2]"));
    let t = grid.table("accounts").unwrap();
    assert_eq!(t.get_value("b").await.unwrap(), Some(json(r#"{"balance": 6}"#)));
    // One sharded table: tried in the shard `args` names, grid-scoped when it reaches further.
    grid.create_table("kv", TableOptions { shards: 4, fsync: None }).await.unwrap();
    for i in 0..20 {
        grid.eval_with("kv[args] = {'n': args}", Value::Int(i), Default::default()).await.unwrap();
    }
    let all = grid.eval("[kv[i]['n'] for i in range(20)]").await.unwrap();
    assert_eq!(all, Value::List((0..20).map(Value::Int).collect()));
    let v = grid.eval_with("kv[args]['n'] += 100\nkv[args]['n']", Value::Int(3), Default::default());
    assert_eq!(v.await.unwrap(), Value::Int(103));
    let v = grid.eval_with("kv[args]['n'] + kv[args + 1]['n'] + len(kv)", Value::Int(5), Default::default());
    assert_eq!(v.await.unwrap(), Value::Int(5 + 6 + 20));
    assert_eq!(grid.table("kv").unwrap().get_value(3).await.unwrap(), Some(json(r#"{"n": 103}"#)));
    // A snippet slower than 1 ms runs under `block_in_place` from its second run on: same answer,
    // and a concurrent read is answered too.
    let slow = "n = 0
for i in range(20000):
    n += i
accounts[key]['sum'] = n
n";
    for _ in 0..3 {
        let (a, b) = tokio::join!(t.eval_on("a", slow), t.get_value("b"));
        assert_eq!(a.unwrap(), Value::Int(199_990_000));
        assert_eq!(b.unwrap(), Some(json(r#"{"balance": 6}"#)));
    }
    grid.close().await.unwrap();
}
