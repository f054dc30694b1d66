//! RESP on the real binary (issue 18): `redis-cli` runs every command (RESP2 and RESP3 replies),
//! auth failures, a pipelined burst checked reply by reply against a model, random bytes thrown
//! at the port (the server keeps serving, nothing acknowledged is lost), and a round trip with
//! redis-py, a Redis client library. `redis-cli` (Debian's redis-tools) and redis-py are
//! installed by scripts/test-all.sh where missing.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_heapgrid");

/// A `heapgrid serve` with RESP on.
struct Served {
    child: std::process::Child,
    resp: SocketAddr,
}

impl Served {
    fn start(dir: &Path, extra: &[&str]) -> Served {
        let child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--resp-listen", "127.0.0.1:0"])
            .arg("--data")
            .arg(dir.join("data"))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("server.log")).unwrap())
            .spawn()
            .unwrap();
        let unset: SocketAddr = ([0, 0, 0, 0], 0).into();
        let mut s = Served { child, resp: unset };
        let mut out = BufReader::new(s.child.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "the server ended early");
            if let Some(a) = line.trim().strip_prefix("heapgrid resp on ") {
                s.resp = a.parse().unwrap();
            } else if line.starts_with("heapgrid listening on ") {
                assert_ne!(s.resp, unset, "the RESP line comes first");
                return s;
            }
        }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `redis-cli` against `at` with `flags`, running `args`: its standard output, trimmed.
fn cli(at: SocketAddr, flags: &[&str], args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", &at.ip().to_string(), "-p", &at.port().to_string(), "--no-auth-warning"])
        .args(flags)
        .args(args)
        .output()
        .expect("redis-cli runs (scripts/test-all.sh installs Debian's redis-tools)");
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}

/// `redis-cli --no-raw` (typed output: `(integer) 1`, `"v"`, `(nil)`, `(error) ...`).
fn typed(at: SocketAddr, args: &[&str]) -> String {
    cli(at, &["--no-raw"], args)
}

#[test]
fn redis_cli_runs_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let s = Served::start(dir.path(), &[]);
    let at = s.resp;
    let t = |args: &[&str]| typed(at, args);
    assert_eq!(t(&["PING"]), "PONG");
    assert_eq!(t(&["PING", "hi"]), "\"hi\"");
    assert_eq!(t(&["ECHO", "a b"]), "\"a b\"");
    assert_eq!(t(&["SELECT", "0"]), "OK");
    assert!(t(&["SELECT", "1"]).starts_with("(error) ERR heapgrid has one database"));
    // Strings; an integer is stored as one (INCR works on it), anything else as bytes.
    assert_eq!(t(&["SET", "a", "1"]), "OK");
    assert_eq!(t(&["GET", "a"]), "\"1\"");
    assert_eq!(t(&["INCR", "a"]), "(integer) 2");
    assert_eq!(t(&["INCRBY", "a", "10"]), "(integer) 12");
    assert_eq!(t(&["DECR", "a"]), "(integer) 11");
    assert_eq!(t(&["DECRBY", "a", "20"]), "(integer) -9");
    assert_eq!(t(&["INCR", "fresh"]), "(integer) 1");
    assert_eq!(t(&["GET", "a"]), "\"-9\"");
    assert_eq!(t(&["SET", "s", "hello world"]), "OK");
    assert_eq!(t(&["INCR", "s"]), "(error) ERR value is not an integer or out of range");
    assert_eq!(t(&["SET", "big", "9223372036854775807"]), "OK");
    assert_eq!(t(&["INCR", "big"]), "(error) ERR increment or decrement would overflow");
    assert_eq!(t(&["SET", "z", "007"]), "OK");
    assert_eq!(t(&["GET", "z"]), "\"007\"");
    assert_eq!(t(&["STRLEN", "s"]), "(integer) 11");
    // SET's conditions and GET.
    assert_eq!(t(&["SET", "k", "v1", "NX"]), "OK");
    assert_eq!(t(&["SET", "k", "v2", "NX"]), "(nil)");
    assert_eq!(t(&["SET", "k", "v3", "XX", "GET"]), "\"v1\"");
    assert_eq!(t(&["SET", "k", "v4", "GET"]), "\"v3\"");
    assert_eq!(t(&["SET", "absent", "v", "XX"]), "(nil)");
    assert_eq!(t(&["GET", "absent"]), "(nil)");
    assert_eq!(t(&["SET", "k2", "v", "NX", "GET"]), "(nil)");
    assert_eq!(t(&["SETNX", "k2", "w"]), "(integer) 0");
    assert_eq!(t(&["GETSET", "k2", "w"]), "\"v\"");
    assert_eq!(t(&["SET", "k", "v", "KEEPTTL"]), "OK");
    for refused in
        [&["SET", "k", "v", "EX", "10"][..], &["SET", "k", "v", "PX", "10"], &["SETEX", "k", "10", "v"]]
    {
        assert!(t(refused).contains("heapgrid keeps no expiry times"), "{refused:?}");
    }
    assert_eq!(t(&["GET", "k"]), "\"v\"", "a refused SET changes nothing");
    assert_eq!(t(&["SET", "k", "v", "NX", "XX"]), "(error) ERR syntax error");
    assert_eq!(t(&["GET"]), "(error) ERR wrong number of arguments for 'get' command");
    // Several keys.
    assert_eq!(t(&["MSET", "m1", "x", "m2", "y"]), "OK");
    assert_eq!(t(&["MGET", "m1", "nope", "m2"]), "1) \"x\"\n2) (nil)\n3) \"y\"");
    assert_eq!(t(&["EXISTS", "m1", "m2", "nope", "m1"]), "(integer) 3");
    assert_eq!(t(&["DEL", "m1", "nope"]), "(integer) 1");
    assert_eq!(t(&["UNLINK", "m2"]), "(integer) 1");
    assert_eq!(t(&["TYPE", "k"]), "string");
    assert_eq!(t(&["TYPE", "nope"]), "none");
    // The keyspace: a, fresh, s, big, z, k, k2.
    assert_eq!(t(&["DBSIZE"]), "(integer) 7");
    for i in 0..25 {
        t(&["SET", &format!("user:{i:02}"), "u"]);
    }
    assert_eq!(cli(at, &[], &["--scan", "--pattern", "user:*"]).lines().count(), 25);
    assert_eq!(cli(at, &[], &["--scan", "--pattern", "user:1?"]).lines().count(), 10);
    assert_eq!(cli(at, &[], &["--scan"]).lines().count(), 32);
    let page = t(&["SCAN", "0", "MATCH", "user:*", "COUNT", "5"]);
    assert!(page.starts_with("1) \"") && !page.starts_with("1) \"0\""), "{page}");
    assert_eq!(page.matches("user:").count(), 5, "{page}");
    assert!(t(&["SCAN", "12345"]).starts_with("(error) ERR invalid cursor"));
    let info = cli(at, &[], &["INFO"]);
    for field in [
        "redis_version:",
        "uptime_in_seconds:",
        "connected_clients:",
        "used_memory:",
        "total_commands_processed:",
        "db0:keys=32",
    ] {
        assert!(info.contains(field), "INFO lacks {field}: {info}");
    }
    assert!(!cli(at, &[], &["INFO", "keyspace"]).contains("# Server"));
    // Scripts: a snippet with `keys` and `args`; with keys it runs in the first key's shard.
    assert_eq!(t(&["EVAL", "redis[keys[0]]", "1", "k"]), "\"v\"");
    assert_eq!(
        t(&["EVAL", "redis[keys[0]] = int(args[0]) * 2\nredis[keys[0]]", "1", "n", "21"]),
        "(integer) 42"
    );
    assert_eq!(
        t(&["EVAL", "[len(keys), args, None, True]", "0", "x", "y"]),
        "1) (integer) 0\n2) 1) \"x\"\n   2) \"y\"\n3) (nil)\n4) (integer) 1"
    );
    let sha = cli(at, &[], &["SCRIPT", "LOAD", "args[0] + '!'"]);
    assert_eq!(sha.len(), 40);
    assert_eq!(t(&["EVALSHA", &sha, "0", "hey"]), "\"hey!\"");
    assert_eq!(
        t(&["SCRIPT", "EXISTS", &sha, "0000000000000000000000000000000000000000"]),
        "1) (integer) 1\n2) (integer) 0"
    );
    assert_eq!(
        t(&["EVALSHA", "0000000000000000000000000000000000000000", "0"]),
        "(error) NOSCRIPT No matching script. Please use EVAL."
    );
    assert!(t(&["EVAL", "fail('no')", "0"]).starts_with("(error) ERR"));
    // FCALL calls a stored procedure with (keys, args).
    let proc = "def bump(keys, args):\n    redis[keys[0]] = redis.get(keys[0], 0) + int(args[0])\n    return redis[keys[0]]\n";
    std::fs::write(dir.path().join("counters.py"), proc).unwrap();
    drop(s);
    let procs = dir.path().join("counters.py");
    let s = Served::start(dir.path(), &["--procedures", procs.to_str().unwrap()]);
    let at = s.resp;
    let t = |args: &[&str]| typed(at, args);
    assert_eq!(t(&["FCALL", "bump", "1", "ctr", "5"]), "(integer) 5");
    assert_eq!(t(&["FCALL", "bump", "1", "ctr", "5"]), "(integer) 10");
    assert!(t(&["FCALL", "bump()", "0"]).contains("Python identifier"));
    // The data survived the restart.
    assert_eq!(t(&["GET", "k"]), "\"v\"");
    assert_eq!(t(&["DBSIZE"]), "(integer) 34");
    // Lists are queues (take mode): pushes at the tail, pops from the head.
    assert_eq!(t(&["RPUSH", "q", "a", "b", "c"]), "(integer) 3");
    assert_eq!(t(&["LPUSH", "q", "d"]), "(integer) 4");
    assert_eq!(t(&["LLEN", "q"]), "(integer) 4");
    assert_eq!(t(&["LPOP", "q"]), "\"a\"");
    assert_eq!(t(&["RPOP", "q", "2"]), "1) \"b\"\n2) \"c\"");
    assert_eq!(t(&["BLPOP", "q", "1"]), "1) \"q\"\n2) \"d\"");
    assert_eq!(t(&["BLPOP", "q", "0.1"]), "(nil)");
    assert_eq!(t(&["LPOP", "q"]), "(nil)");
    assert!(t(&["BLPOP", "q", "r", "1"]).contains("one list"));
    // Streams are feeds (created by the first XADD).
    assert_eq!(t(&["XLEN", "events"]), "(integer) 0");
    assert_eq!(t(&["XRANGE", "events", "-", "+"]), "(empty array)");
    assert_eq!(t(&["XADD", "events", "*", "kind", "login", "who", "bob"]), "\"1-0\"");
    assert_eq!(t(&["XADD", "events", "*", "kind", "logout"]), "\"2-0\"");
    assert_eq!(t(&["XADD", "events", "MAXLEN", "5", "*", "kind", "x"]), "\"3-0\"");
    assert_eq!(t(&["XADD", "nostream", "NOMKSTREAM", "*", "a", "b"]), "(nil)");
    assert_eq!(t(&["XLEN", "events"]), "(integer) 3");
    assert_eq!(
        t(&["XRANGE", "events", "-", "+", "COUNT", "2"]),
        "1) 1) \"1-0\"\n   2) 1) \"kind\"\n      2) \"login\"\n      3) \"who\"\n      4) \"bob\"\n2) 1) \"2-0\"\n   2) 1) \"kind\"\n      2) \"logout\""
    );
    assert_eq!(t(&["XRANGE", "events", "2", "2"]), "1) 1) \"2-0\"\n   2) 1) \"kind\"\n      2) \"logout\"");
    assert_eq!(
        t(&["XREVRANGE", "events", "+", "-", "COUNT", "1"]),
        "1) 1) \"3-0\"\n   2) 1) \"kind\"\n      2) \"x\""
    );
    assert_eq!(
        t(&["XREAD", "COUNT", "1", "STREAMS", "events", "2-0"]),
        "1) 1) \"events\"\n   2) 1) 1) \"3-0\"\n         2) 1) \"kind\"\n            2) \"x\""
    );
    assert_eq!(t(&["XREAD", "STREAMS", "events", "3"]), "(nil)");
    assert_eq!(t(&["XREAD", "BLOCK", "100", "STREAMS", "events", "$"]), "(nil)");
    assert_eq!(t(&["XTRIM", "events", "MAXLEN", "1"]), "(integer) 2");
    assert_eq!(t(&["XLEN", "events"]), "(integer) 1");
    // The connection's own commands.
    assert_eq!(cli(at, &[], &["CLIENT", "SETNAME", "me"]), "OK");
    assert_eq!(t(&["CLIENT", "GETNAME"]), "(nil)", "a name is the connection's");
    assert!(t(&["COMMAND", "COUNT"]).starts_with("(integer) "));
    assert!(t(&["MULTI"]).starts_with("(error) ERR unknown command 'MULTI'"));
    assert_eq!(t(&["QUIT"]), "OK");
}

#[test]
fn resp3_replies() {
    let dir = tempfile::tempdir().unwrap();
    let s = Served::start(dir.path(), &[]);
    let t3 = |args: &[&str]| cli(s.resp, &["-3", "--no-raw"], args);
    let hello = t3(&["HELLO", "3"]);
    assert!(
        hello.contains("\"proto\" => (integer) 3") && hello.contains("\"server\" => \"heapgrid\""),
        "{hello}"
    );
    assert_eq!(t3(&["GET", "nope"]), "(nil)");
    assert_eq!(t3(&["EVAL", "{'a': 1.5, 'b': True}", "0"]), "1# \"a\" => (double) 1.5\n2# \"b\" => (true)");
    assert_eq!(t3(&["EVAL", "2.5", "0"]), "(double) 2.5");
    assert_eq!(cli(s.resp, &["-2", "--no-raw"], &["EVAL", "{'a': 1.5}", "0"]), "1) \"a\"\n2) \"1.5\"");
    assert!(t3(&["INFO", "server"]).contains("redis_version:"));
    assert!(t3(&["HELLO", "4"]).starts_with("(error) NOPROTO"));
    // RESP3 over a raw socket: the map header and null as RESP3 writes them.
    let mut c = Raw::connect(s.resp);
    c.send(&[&["HELLO", "3"], &["GET", "nope"], &["EVAL", "{'x': None}", "0"]]);
    assert!(c.read_raw_until(b"_\r\n%1\r\n$1\r\nx\r\n_\r\n"));
}

#[test]
fn auth_maps_to_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tokens.json");
    let tokens = serde_json::json!({"tokens": [
        {"token": "root-token", "permissions": {"*": ["admin"]}},
        {"token": "reader", "permissions": {"redis": ["read"]}},
    ]});
    std::fs::write(&cfg, tokens.to_string()).unwrap();
    let s = Served::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    let t = |flags: &[&str], args: &[&str]| cli(s.resp, &[&["--no-raw"], flags].concat(), args);
    assert_eq!(t(&[], &["GET", "k"]), "(error) NOAUTH Authentication required.");
    assert_eq!(t(&[], &["PING"]), "(error) NOAUTH Authentication required.");
    // redis-cli reports the failed AUTH on stderr, then its command meets NOAUTH.
    assert_eq!(t(&["-a", "wrong"], &["GET", "k"]), "(error) NOAUTH Authentication required.");
    assert_eq!(t(&["-a", "root-token"], &["SET", "k", "v"]), "OK");
    assert_eq!(t(&["--user", "default", "--pass", "root-token"], &["GET", "k"]), "\"v\"");
    assert_eq!(t(&["-a", "reader"], &["GET", "k"]), "\"v\"");
    assert!(t(&["-a", "reader"], &["SET", "k", "w"]).starts_with("(error) NOPERM"), "read only");
    // A script needs `eval` on what it touches (the reader has only `read`).
    assert!(t(&["-a", "reader"], &["EVAL", "redis[keys[0]]", "1", "k"]).starts_with("(error) NOPERM"));
    assert!(t(&["-a", "reader"], &["EVAL", "len(redis)", "0"]).starts_with("(error) NOPERM"));
    assert_eq!(t(&["-a", "reader"], &["EVAL", "6 * 7", "0"]), "(integer) 42");
    assert_eq!(t(&["-a", "root-token"], &["GET", "k"]), "\"v\"");
    // Before login a command is small (Redis' limits for unauthenticated clients).
    let mut big = Raw::connect(s.resp);
    let eleven: Vec<Vec<String>> = vec![(0..11).map(|i| i.to_string()).collect()];
    big.send_owned(&eleven);
    assert_eq!(big.reply(), R::Err("ERR Protocol error: invalid multibulk length".into()));
    // HELLO with AUTH, on a raw socket.
    let mut c = Raw::connect(s.resp);
    c.send(&[
        &["HELLO", "2", "AUTH", "default", "nope"],
        &["HELLO", "2", "AUTH", "default", "root-token"],
        &["GET", "k"],
    ]);
    assert!(matches!(c.reply(), R::Err(e) if e.starts_with("WRONGPASS")));
    assert!(matches!(c.reply(), R::Arr(_)));
    assert_eq!(c.reply(), R::Bulk(Some(b"v".to_vec())));
}

/// One burst of random commands in a single write, on two connections at once: every reply,
/// in order, matches a model (a map), and so does the table afterwards.
#[test]
fn a_pipelined_burst_matches_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let s = Served::start(dir.path(), &[]);
    let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut rng = fastrand::Rng::with_seed(18);
    let mut cmds: Vec<Vec<String>> = Vec::new();
    let mut want: Vec<R> = Vec::new();
    let key = |rng: &mut fastrand::Rng| format!("k{}", rng.u8(..40));
    for _ in 0..3000 {
        let k = key(&mut rng);
        match rng.u8(..9) {
            0 | 1 => {
                let v = if rng.bool() { rng.i64(-100..100).to_string() } else { format!("v{}", rng.u32(..)) };
                cmds.push(vec!["SET".into(), k.clone(), v.clone()]);
                model.insert(k, v.into_bytes());
                want.push(R::Simple("OK".into()));
            }
            2 => {
                cmds.push(vec!["GET".into(), k.clone()]);
                want.push(R::Bulk(model.get(&k).cloned()));
            }
            3 => {
                cmds.push(vec!["DEL".into(), k.clone()]);
                want.push(R::Int(i64::from(model.remove(&k).is_some())));
            }
            4 => {
                cmds.push(vec!["INCR".into(), k.clone()]);
                let cur = model.get(&k).map(|v| String::from_utf8(v.clone()).unwrap());
                match cur.as_deref().map(str::parse::<i64>) {
                    None => {
                        model.insert(k, b"1".to_vec());
                        want.push(R::Int(1));
                    }
                    Some(Ok(n)) => {
                        model.insert(k, (n + 1).to_string().into_bytes());
                        want.push(R::Int(n + 1));
                    }
                    Some(Err(_)) => want.push(R::Err("ERR value is not an integer or out of range".into())),
                }
            }
            5 => {
                let k2 = key(&mut rng);
                cmds.push(vec!["MGET".into(), k.clone(), k2.clone()]);
                want.push(R::Arr(vec![R::Bulk(model.get(&k).cloned()), R::Bulk(model.get(&k2).cloned())]));
            }
            6 => {
                cmds.push(vec!["SET".into(), k.clone(), "nx".into(), "NX".into()]);
                match model.entry(k) {
                    std::collections::btree_map::Entry::Occupied(_) => want.push(R::Bulk(None)),
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(b"nx".to_vec());
                        want.push(R::Simple("OK".into()));
                    }
                }
            }
            // Answered by the connection itself, between commands that wait for shards.
            7 => {
                cmds.push(vec!["BOGUS".into(), k.clone()]);
                want.push(R::Err(format!("ERR unknown command 'BOGUS', with args beginning with: '{k}'")));
            }
            _ => {
                cmds.push(vec!["EXISTS".into(), k.clone()]);
                want.push(R::Int(i64::from(model.contains_key(&k))));
            }
        }
    }
    let mut c = Raw::connect(s.resp);
    // Another connection hammering keys of its own meanwhile.
    let other = s.resp;
    let noise = std::thread::spawn(move || {
        let mut c = Raw::connect(other);
        let burst: Vec<Vec<String>> =
            (0..2000).map(|i| vec!["SET".into(), format!("other{}", i % 50), i.to_string()]).collect();
        c.send_owned(&burst);
        for _ in 0..2000 {
            assert_eq!(c.reply(), R::Simple("OK".into()));
        }
    });
    c.send_owned(&cmds);
    for (i, (cmd, w)) in cmds.iter().zip(&want).enumerate() {
        assert_eq!(&c.reply(), w, "reply {i} to {cmd:?}");
    }
    noise.join().unwrap();
    for (k, v) in &model {
        c.send(&[&["GET", k]]);
        assert_eq!(c.reply(), R::Bulk(Some(v.clone())), "{k}");
    }
    c.send(&[&["DBSIZE"]]);
    assert_eq!(c.reply(), R::Int(model.len() as i64 + 50));
    // redis-cli --pipe: 10 000 commands in RESP from standard input.
    let mut input = Vec::new();
    for i in 0..10_000 {
        input.extend_from_slice(&encode(&[&["SET", &format!("piped:{i}"), &i.to_string()]]));
    }
    let mut p = Command::new("redis-cli")
        .args(["-p", &s.resp.port().to_string(), "--pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(&input).unwrap();
    let out = p.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("errors: 0, replies: 10000"), "{text}");
    assert_eq!(typed(s.resp, &["GET", "piped:9999"]), "\"9999\"");
}

/// Commands that make something first (a stream's feed) keep their place: pipelined on new
/// streams, every reply comes in order and each command sees the ones before it; a name a table
/// holds is refused once, not retried for ever. A later `HELLO 3` does not change the form of
/// earlier replies; a script's keys must share a shard.
#[test]
fn commands_that_create_keep_their_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = Served::start(dir.path(), &["--resp-shards", "4"]);
    let mut c = Raw::connect(s.resp);
    c.send(&[
        &["XADD", "s1", "*", "a", "1"],
        &["XLEN", "s1"],
        &["XADD", "s2", "*", "b", "2"],
        &["XADD", "s3", "*", "c", "3"],
        &["XADD", "s2", "*", "b", "3"],
        &["XLEN", "s2"],
        &["SET", "k", "v"],
        &["XADD", "redis", "*", "x", "1"],
        &["GET", "k"],
    ]);
    let bulk = |s: &str| R::Bulk(Some(s.as_bytes().to_vec()));
    assert_eq!(c.reply(), bulk("1-0"));
    assert_eq!(c.reply(), R::Int(1));
    assert_eq!(c.reply(), bulk("1-0"));
    assert_eq!(c.reply(), bulk("1-0"));
    assert_eq!(c.reply(), bulk("2-0"));
    assert_eq!(c.reply(), R::Int(2));
    assert_eq!(c.reply(), R::Simple("OK".into()));
    match c.reply() {
        R::Err(e) => assert!(e.contains("cannot be created"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.reply(), bulk("v"));
    c.send(&[&["GET", "nope"], &["HELLO", "3"], &["GET", "nope"]]);
    assert_eq!(c.reply(), R::Bulk(None), "in RESP2, as when it was sent");
    assert!(c.read_raw_until(b"_\r\n"), "then RESP3's null");
    // Four shards: some two of these keys are in different ones.
    let keys: Vec<String> = (0..8).map(|i| format!("key{i}")).collect();
    let mut cmd = vec!["EVAL", "len(keys)", "8"];
    cmd.extend(keys.iter().map(String::as_str));
    let mut c = Raw::connect(s.resp);
    c.send(&[&cmd]);
    match c.reply() {
        R::Err(e) => assert!(e.starts_with("CROSSSLOT"), "{e}"),
        other => panic!("{other:?}"),
    }
}

/// Random bytes, and valid commands cut off or corrupted, on many connections: the server
/// answers `Protocol error` or nothing, closes only those connections, keeps serving, and
/// loses nothing acknowledged.
#[test]
fn malformed_input_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Served::start(dir.path(), &[]);
    let mut c = Raw::connect(s.resp);
    c.send(&[&["SET", "kept", "yes"]]);
    assert_eq!(c.reply(), R::Simple("OK".into()));
    let mut rng = fastrand::Rng::with_seed(7);
    let valid = encode(&[&["SET", "fuzz", "1"], &["GET", "kept"]]);
    for round in 0..300 {
        let mut bytes: Vec<u8> = match round % 3 {
            0 => (0..rng.usize(1..600)).map(|_| rng.u8(..)).collect(),
            // A valid burst with a few bytes flipped.
            1 => {
                let mut v = valid.clone();
                for _ in 0..rng.usize(1..4) {
                    let i = rng.usize(..v.len());
                    v[i] = rng.u8(..);
                }
                v
            }
            // Headers that promise too much.
            _ => [&b"*99999999\r\n"[..], b"*1\r\n$999999999999\r\n", b"*1\r\n$-5\r\n", b"*1\r\n:1\r\n"]
                [rng.usize(..4)]
            .to_vec(),
        };
        if rng.bool() {
            bytes.extend_from_slice(&valid);
        }
        let Ok(mut sock) = TcpStream::connect(s.resp) else {
            panic!("the server stopped accepting at round {round}")
        };
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let _ = sock.write_all(&bytes);
        let _ = sock.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = sock.read_to_end(&mut sink);
    }
    assert!(s.alive(), "the server survived");
    let mut c2 = Raw::connect(s.resp);
    c2.send(&[&["GET", "kept"], &["PING"]]);
    assert_eq!(c2.reply(), R::Bulk(Some(b"yes".to_vec())));
    assert_eq!(c2.reply(), R::Simple("PONG".into()));
    // The first connection is untouched by the others' garbage; its own ends with the error.
    c.send(&[&["GET", "kept"]]);
    assert_eq!(c.reply(), R::Bulk(Some(b"yes".to_vec())));
    c.sock.write_all(b"*1\r\n+PING\r\n").unwrap();
    assert_eq!(c.reply(), R::Err("ERR Protocol error: expected '$', got '+'".into()));
    let mut rest = Vec::new();
    assert_eq!(c.sock.read_to_end(&mut rest).unwrap(), 0, "then the connection closes");
    assert!(s.alive());
}

/// The native connection limits hold for RESP: a command that does not arrive whole within the
/// frame deadline ends its connection with the reason; commands behind a blocked one wait (in
/// order) under the in-flight limit; the connection limit counts RESP connections.
#[test]
fn native_limits_hold_for_resp() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("limits.json");
    std::fs::write(&cfg, r#"{"frame_deadline_ms": 300, "inflight_max": 4, "connections_max": 3}"#).unwrap();
    let mut s = Served::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    // Half a command, then silence.
    let mut slow = Raw::connect(s.resp);
    slow.sock.write_all(b"*2\r\n$3\r\nGET\r\n$1").unwrap();
    match slow.reply() {
        R::Err(e) => assert!(e.contains("did not arrive whole"), "{e}"),
        other => panic!("{other:?}"),
    }
    let mut rest = Vec::new();
    assert_eq!(slow.rd.read_to_end(&mut rest).unwrap(), 0, "then the connection closes");
    // A blocked pop, then 50 commands behind it: all answered, in order, once it returns.
    let mut c = Raw::connect(s.resp);
    let mut burst: Vec<Vec<String>> = vec![vec!["BLPOP".into(), "jobs".into(), "0.5".into()]];
    for i in 0..50 {
        burst.push(vec!["ECHO".into(), i.to_string()]);
    }
    c.send_owned(&burst);
    assert_eq!(c.reply(), R::NilArr, "the pop timed out");
    for i in 0..50 {
        assert_eq!(c.reply(), R::Bulk(Some(i.to_string().into_bytes())));
    }
    // One connection is open (the slow one closed); two more fit, a fourth is refused.
    let _second = Raw::connect(s.resp);
    let mut third = Raw::connect(s.resp);
    third.send(&[&["PING"]]);
    assert_eq!(third.reply(), R::Simple("PONG".into()));
    let mut fourth = Raw::connect(s.resp);
    fourth.send(&[&["PING"]]);
    match fourth.reply() {
        R::Err(e) => assert!(e.contains("max number of clients"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(s.alive());
}

/// redis-py, a Redis client library, round-trips values, a pipeline and a script.
#[test]
fn a_redis_client_library_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let s = Served::start(dir.path(), &[]);
    let script = format!(
        r#"
import redis
r = redis.Redis(host="127.0.0.1", port={port}, protocol=3)
assert r.ping()
assert r.set("py", b"\x00\xffbytes")
assert r.get("py") == b"\x00\xffbytes", r.get("py")
assert r.incr("pyc", 5) == 5
p = r.pipeline(transaction=False)
for i in range(100):
    p.set(f"p{{i}}", i)
    p.incr("pyc")
res = p.execute()
assert res[-1] == 105, res[-1]
assert r.mget(["p0", "p99", "none"]) == [b"0", b"99", None]
assert r.eval("redis[keys[0]] + int(args[0])", 1, "pyc", 1) == 106
assert sorted(r.scan_iter(match="p9*", count=7)) == [b"p9"] + [f"p{{i}}".encode() for i in range(90, 100)]
assert r.delete("p0", "p1") == 2
assert r.rpush("pq", "a", "b") == 2 and r.lpop("pq") == b"a"
print("ok")
"#,
        port = s.resp.port()
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3 runs (scripts/test-all.sh installs redis-py)");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "redis-py: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A RESP reply, as the test reads it (its own reader, not the server's code).
#[derive(Debug, Clone, PartialEq)]
enum R {
    Simple(String),
    Err(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Arr(Vec<R>),
    /// RESP2's null array (`*-1`).
    NilArr,
}

fn encode(cmds: &[&[&str]]) -> Vec<u8> {
    let mut b = Vec::new();
    for c in cmds {
        b.extend_from_slice(format!("*{}\r\n", c.len()).as_bytes());
        for a in *c {
            b.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
    }
    b
}

struct Raw {
    sock: TcpStream,
    rd: BufReader<TcpStream>,
}

impl Raw {
    fn connect(at: SocketAddr) -> Raw {
        let sock = TcpStream::connect(at).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Raw { rd: BufReader::new(sock.try_clone().unwrap()), sock }
    }

    fn send(&mut self, cmds: &[&[&str]]) {
        self.sock.write_all(&encode(cmds)).unwrap();
    }

    fn send_owned(&mut self, cmds: &[Vec<String>]) {
        let refs: Vec<Vec<&str>> = cmds.iter().map(|c| c.iter().map(String::as_str).collect()).collect();
        let slices: Vec<&[&str]> = refs.iter().map(Vec::as_slice).collect();
        self.sock.write_all(&encode(&slices)).unwrap();
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.rd.read_line(&mut l).unwrap();
        assert!(l.ends_with("\r\n"), "a reply line: {l:?}");
        l.truncate(l.len() - 2);
        l
    }

    fn reply(&mut self) -> R {
        let l = self.line();
        let (tag, rest) = l.split_at(1);
        match tag {
            "+" => R::Simple(rest.into()),
            "-" => R::Err(rest.into()),
            ":" => R::Int(rest.parse().unwrap()),
            "$" => match rest.parse::<i64>().unwrap() {
                -1 => R::Bulk(None),
                n => {
                    let mut b = vec![0; n as usize + 2];
                    self.rd.read_exact(&mut b).unwrap();
                    b.truncate(n as usize);
                    R::Bulk(Some(b))
                }
            },
            "*" => match rest.parse::<i64>().unwrap() {
                -1 => R::NilArr,
                n => R::Arr((0..n).map(|_| self.reply()).collect()),
            },
            other => panic!("reply type {other:?}: {l}"),
        }
    }

    /// Reads until `want` has been seen (or the read times out: false).
    fn read_raw_until(&mut self, want: &[u8]) -> bool {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(want.len()).any(|w| w == want) {
            match self.rd.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        true
    }
}
