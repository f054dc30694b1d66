//! Engine tests over an in-memory `Store` (a `BTreeMap` per collection).

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::error::GridError;
use crate::key::Key;
use crate::value::Value;

#[derive(Default, Clone, Debug, PartialEq)]
struct Mem {
    colls: BTreeMap<String, BTreeMap<Key, Value>>,
    reads: u64,
}

impl Store for Mem {
    fn get(&mut self, coll: &str, key: &Key) -> Result<Option<Value>, GridError> {
        self.reads += 1;
        let c = self.colls.get(coll).ok_or_else(|| GridError::NoSuchTable(coll.into()))?;
        Ok(c.get(key).cloned())
    }
    fn contains(&mut self, coll: &str, key: &Key) -> Result<bool, GridError> {
        Ok(self.get(coll, key)?.is_some())
    }
    fn count(&mut self, coll: &str) -> Result<u64, GridError> {
        Ok(self.colls.get(coll).map_or(0, |c| c.len() as u64))
    }
    fn check_write(&mut self, coll: &str, _: &Key) -> Result<(), GridError> {
        self.colls.get(coll).map(|_| ()).ok_or_else(|| GridError::NoSuchTable(coll.into()))
    }
    fn scan(&mut self, coll: &str, q: &ScanQuery) -> Result<Vec<(Key, Value)>, GridError> {
        let c = self.colls.get(coll).ok_or_else(|| GridError::NoSuchTable(coll.into()))?;
        let it = c.iter().filter(|(k, _)| q.matches(k)).map(|(k, v)| (k.clone(), v.clone()));
        Ok(if q.reverse {
            it.rev().take(q.limit as usize).collect()
        } else {
            it.take(q.limit as usize).collect()
        })
    }
}

impl Mem {
    fn apply(&mut self, o: &Outcome) {
        for w in &o.writes {
            let c = self.colls.entry(w.collection.clone()).or_default();
            match &w.value {
                Some(v) => {
                    c.insert(w.key.clone(), v.clone());
                }
                None => {
                    c.remove(&w.key);
                }
            }
        }
    }
}

fn json(s: &str) -> Value {
    Value::from_json(&serde_json::from_str(s).unwrap()).unwrap()
}

fn setup() -> (Engine, Mem) {
    let e = Engine::new();
    e.set_collections(["users".to_string(), "queues".to_string()]);
    let mut m = Mem::default();
    m.colls.entry("users".into()).or_default().insert("bob".into(), json(r#"{"name":"Bob","visits":1}"#));
    m.colls.entry("queues".into()).or_default();
    (e, m)
}

/// Test budgets: the defaults with a wall time that an unoptimised build meets.
fn limits() -> Limits {
    Limits { wall_ms: 5_000, ..Limits::default() }
}

fn run(e: &Engine, m: &mut Mem, src: &str) -> Result<Outcome, GridError> {
    let c = e.compile(src)?;
    let o = c.run(m, &limits(), None, &Value::Null)?;
    m.apply(&o);
    Ok(o)
}

/// `engine::fetch` of a ref against the document the store holds for it.
fn fetch(m: &mut Mem, r: &str, offset: u32, limit: u32) -> Result<Value, GridError> {
    let at = parse_ref(r).map_err(GridError::Invalid)?;
    let doc = m.get(&at.collection, &at.key)?;
    engine::fetch(at, r, doc, offset, limit, &Limits::default())
}

fn fail_kind(r: Result<Outcome, GridError>) -> SnippetFailure {
    match r {
        Err(GridError::Snippet(f)) => f,
        r => panic!("expected a snippet error, got {r:?}"),
    }
}

#[test]
fn reads_and_nested_mutation_persist() {
    let (e, mut m) = setup();
    let o = run(&e, &mut m, "users['bob']").unwrap();
    assert_eq!(o.value, json(r#"{"name":"Bob","visits":1}"#));
    assert!(o.writes.is_empty(), "a read writes nothing: {:?}", o.writes);
    let o = run(&e, &mut m, "users['bob']['visits'] += 1\nusers['bob']['visits']").unwrap();
    assert_eq!(o.value, Value::Int(2));
    assert_eq!(o.writes.len(), 1);
    assert_eq!(m.colls["users"][&Key::from("bob")], json(r#"{"name":"Bob","visits":2}"#));
    // get / in / len / del
    let o = run(&e, &mut m, "[users.get('nobody', 7), 'bob' in users, 'x' in users, len(users)]").unwrap();
    assert_eq!(o.value, json("[7, true, false, 1]"));
    run(&e, &mut m, "users['amy'] = {'visits': 0}\ndel users['bob']").unwrap();
    assert_eq!(m.colls["users"].keys().cloned().collect::<Vec<_>>(), vec![Key::from("amy")]);
    let o = run(&e, &mut m, "users[1] = 'one'\nusers.setdefault('z', []).append(3)\nlen(users)").unwrap();
    assert_eq!(o.value, Value::Int(3));
    assert_eq!(m.colls["users"][&Key::from("z")], json("[3]"));
}

#[test]
fn list_as_a_queue() {
    let (e, mut m) = setup();
    run(&e, &mut m, "queues['jobs'] = []").unwrap();
    for i in 0..3 {
        run(&e, &mut m, &format!("queues['jobs'].append({{'job': {i}}})")).unwrap();
    }
    let pop = "q = queues['jobs']\nq.pop(0) if q else None";
    assert_eq!(run(&e, &mut m, pop).unwrap().value, json(r#"{"job":0}"#));
    assert_eq!(run(&e, &mut m, pop).unwrap().value, json(r#"{"job":1}"#));
    assert_eq!(m.colls["queues"][&Key::from("jobs")], json(r#"[{"job":2}]"#));
}

#[test]
fn loops_functions_scans() {
    let (e, mut m) = setup();
    let src = r#"
def key(i):
    return ("k0" if i < 10 else "k") + str(i)

for i in range(20):
    users[key(i)] = {"n": i, "sq": i * i}
total = 0
for k, doc in users.scan(prefix="k0", limit=5, reverse=True):
    total += doc["n"]
    doc["seen"] = True
[total, len(users), users.keys(prefix="k1")]
"#;
    let o = run(&e, &mut m, src).unwrap();
    assert_eq!(o.value, json(r#"[35, 21, ["k10","k11","k12","k13","k14","k15","k16","k17","k18","k19"]]"#));
    assert_eq!(m.colls["users"][&Key::from("k09")], json(r#"{"n":9,"sq":81,"seen":true}"#));
    assert_eq!(m.colls["users"][&Key::from("k04")], json(r#"{"n":4,"sq":16}"#));
}

#[test]
fn a_name_that_is_no_collection_is_answered_with_the_collections_and_how_to_create_one() {
    let (e, mut m) = setup();
    let f = fail_kind(run(&e, &mut m, "orders['x'] = {'n': 1}"));
    assert_eq!(f.kind, SnippetErrorKind::Name, "{f}");
    assert!(f.message.contains("\"orders\""), "{f}");
    assert!(f.message.contains("there are: queues, users"), "{f}");
    assert!(f.message.contains("heapgrid eval create orders"), "{f}");
    let bare = Engine::new();
    let f = fail_kind(run(&bare, &mut m, "users['bob']"));
    assert!(f.message.contains("there are none yet"), "{f}");
}

#[test]
fn print_is_captured_beside_the_result_and_bounded() {
    let (e, mut m) = setup();
    let o = run(&e, &mut m, "for i in range(2):\n    print('n', i)\nprint(users['bob']['name'], end='')\n7")
        .unwrap();
    assert_eq!(o.value, Value::Int(7));
    assert_eq!(o.printed, "n 0\nn 1\nBob");
    let big = format!("for i in range({}):\n    print('x' * 1000)\n1", vm::PRINT_BYTES_MAX / 1000 + 2);
    let f = fail_kind(run(&e, &mut m, &big));
    assert_eq!(f.kind, SnippetErrorKind::Budget(Budget::Memory), "{f}");
}

#[test]
fn errors_carry_kind_and_position() {
    let (e, mut m) = setup();
    let f = fail_kind(run(&e, &mut m, "x = 1\ny = [1,\n"));
    assert_eq!(f.kind, SnippetErrorKind::Syntax, "{f}");
    let f = fail_kind(run(&e, &mut m, "x = 1\n  nosuch + 1"));
    assert_eq!(f.kind, SnippetErrorKind::Syntax, "{f}");
    let f = fail_kind(run(&e, &mut m, "x = 1\ny = nosuch + 1"));
    assert_eq!((f.kind, f.line, f.col), (SnippetErrorKind::Name, 2, 5), "{f}");
    let f = fail_kind(run(&e, &mut m, "x = 1\ny = 'a' + 1"));
    assert_eq!((f.kind, f.line), (SnippetErrorKind::Type, 2), "{f}");
    let f = fail_kind(run(&e, &mut m, "users['amy'] = 1\nusers['nobody']"));
    assert_eq!((f.kind, f.line, f.col), (SnippetErrorKind::Value, 2, 1), "{f}");
    assert!(!m.colls["users"].contains_key(&Key::from("amy")), "a failed snippet leaves no trace");
    let f = fail_kind(run(&e, &mut m, "fail('nope')"));
    assert_eq!(f.kind, SnippetErrorKind::Fail, "{f}");
    let f = fail_kind(run(&e, &mut m, "del users['nobody']"));
    assert_eq!((f.kind, f.line), (SnippetErrorKind::Value, 1), "{f}");
    let f = fail_kind(run(&e, &mut m, "users['f'] = lambda: 1"));
    assert_eq!(f.kind, SnippetErrorKind::Value, "{f}");
}

#[test]
fn budgets_stop_runs_without_writes() {
    let (e, mut m) = setup();
    let before = m.clone();
    let short = Limits { wall_ms: 200, ..limits() };
    let run_with =
        |m: &mut Mem, src: &str, l: &Limits| e.compile(src).and_then(|c| c.run(m, l, None, &Value::Null));
    let f = fail_kind(run_with(&mut m, "users['x'] = 1\nfor i in range(1000000000):\n    pass", &short));
    assert_eq!(f.kind, SnippetErrorKind::Budget(Budget::WallTime), "{f}");
    let f = fail_kind(run_with(&mut m, "users['x'] = 1\n[i for i in range(1000000000)]", &short));
    assert!(matches!(f.kind, SnippetErrorKind::Budget(Budget::WallTime | Budget::Memory)), "{f}");
    // Allocations Monty sizes before making them are refused in process too (a sandbox worker
    // has a hard ceiling for the rest: tests/it/snippet_sandbox.rs).
    let f = fail_kind(run(&e, &mut m, "x = [0] * 2000000000"));
    assert_eq!(f.kind, SnippetErrorKind::Budget(Budget::Memory), "{f}");
    let f = fail_kind(run(&e, &mut m, "x = 'ab'\nx *= 1500000000"));
    assert_eq!(f.kind, SnippetErrorKind::Budget(Budget::Memory), "{f}");
    let f = fail_kind(run(&e, &mut m, "def f(n):\n    return [f(n)]\nf(1)"));
    // Recursion runs until the call-depth budget stops it, at the recursive call.
    assert_eq!((f.kind, f.line), (SnippetErrorKind::Budget(Budget::CallDepth), 2), "{f}");
    // A chain of 80 distinct functions passes the default call depth of 64 too; 40 do not.
    let mut chain = "def f0():\n    return 0\n".to_string();
    for i in 1..80 {
        chain += &format!("def f{i}():\n    return f{}()\n", i - 1);
    }
    let f = fail_kind(run(&e, &mut m, &(chain.clone() + "f79()")));
    assert_eq!(f.kind, SnippetErrorKind::Budget(Budget::CallDepth), "{f}");
    assert_eq!(run(&e, &mut m, &(chain + "f40()")).unwrap().value, Value::Int(0));
    let f = fail_kind(run(&e, &mut m, "[i for i in range(50000)]"));
    assert_eq!(f.kind, SnippetErrorKind::Budget(Budget::ResultSize), "{f}");
    run(&e, &mut m, "users['w'] = 1").unwrap();
    let c = e.compile("[users.get(i) for i in range(100)]").unwrap();
    let f = fail_kind(c.run(&mut m, &Limits { steps: 10, ..limits() }, None, &Value::Null));
    assert_eq!(f.kind, SnippetErrorKind::Budget(Budget::Steps), "reads past the steps budget: {f}");
    let mut b = before.clone();
    b.colls.get_mut("users").unwrap().insert("w".into(), Value::Int(1));
    b.reads = m.reads;
    assert_eq!(m, b);
    // Overrides are capped by the server's maximums.
    let l = Limits::default().with_overrides(
        &LimitOverrides { steps: Some(u64::MAX), ..Default::default() },
        &Limits::server_max(),
    );
    assert_eq!(l.steps, Limits::server_max().steps);
}

#[test]
fn wall_time_budget() {
    let (e, mut m) = setup();
    let c = e.compile("x = 0\nfor i in range(100000000):\n    x += 1").unwrap();
    let l = Limits { wall_ms: 20, steps: u64::MAX / 2, ..Limits::default() };
    let f = match c.run(&mut m, &l, None, &Value::Null) {
        Err(GridError::Snippet(f)) => f,
        r => panic!("{r:?}"),
    };
    assert_eq!(f.kind, SnippetErrorKind::Budget(Budget::WallTime), "{f}");
}

#[test]
fn big_stored_documents_come_back_as_refs() {
    let (e, mut m) = setup();
    run(&e, &mut m, "users['bob']['friends'] = [f'f{i}' for i in range(1200)]").unwrap();
    let o = run(&e, &mut m, "users['bob']").unwrap();
    assert_eq!(
        o.value,
        json(r#"{"name":"Bob","visits":1,"friends":{"$ref":"users/bob/friends","len":1200}}"#)
    );
    let got = fetch(&mut m, "users/bob/friends", 1198, 10).unwrap();
    assert_eq!(got, json(r#"["f1198","f1199"]"#));
    let got = fetch(&mut m, "users/bob/friends/3", 0, 10).unwrap();
    assert_eq!(got, json(r#""f3""#));
}

#[test]
fn compiled_snippets_are_cached_and_recompiled_when_collections_change() {
    let (e, mut m) = setup();
    let a = e.compile("users['bob']").unwrap();
    let b = e.compile("users['bob']").unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    assert_eq!(a.collections, vec!["users".to_string()]);
    let f = run(&e, &mut m, "orders['x']").unwrap_err();
    assert!(matches!(f, GridError::Snippet(SnippetFailure { kind: SnippetErrorKind::Name, .. })), "{f}");
    e.set_collections(["users".to_string(), "queues".to_string(), "orders".to_string()]);
    m.colls.entry("orders".into()).or_default().insert("x".into(), Value::Int(5));
    assert_eq!(run(&e, &mut m, "orders['x']").unwrap().value, Value::Int(5));
    let c = e.compile("users['bob']").unwrap();
    assert!(!std::sync::Arc::ptr_eq(&a, &c), "a new environment recompiles");
}

#[test]
fn stored_procedures() {
    let (e, mut m) = setup();
    e.set_procedures(
        "social",
        "def visit(who):\n    users[who]['visits'] += 1\n    return users[who]['visits']\n",
    )
    .unwrap();
    assert_eq!(run(&e, &mut m, "visit('bob')\nvisit('bob')").unwrap().value, Value::Int(3));
    assert!(e.set_procedures("bad", "def x(:\n").is_err());
    assert!(e.set_procedures("dup", "def visit():\n    pass\n").is_err());
    assert!(e.remove_procedures("social"));
    let f = fail_kind(run(&e, &mut m, "visit('bob')"));
    assert_eq!(f.kind, SnippetErrorKind::Name, "{f}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random sequences of snippet writes against a `BTreeMap` model; the same sequence on two
    /// fresh engines gives the same contents.
    #[test]
    fn snippets_match_a_model(ops in prop::collection::vec((0u8..4, 0u8..6, -5i64..5), 1..40)) {
        let (e1, mut m1) = setup();
        let (e2, mut m2) = setup();
        let mut model: BTreeMap<Key, Value> = m1.colls["users"].clone();
        for (op, k, v) in ops {
            let key = format!("k{k}");
            let src = match op {
                0 => format!("users['{key}'] = {{'v': {v}}}"),
                1 => format!("users.delete('{key}')"),
                2 => format!("d = users.get('{key}')\nif d != None:\n    d['v'] = d['v'] + {v}"),
                _ => format!("users.setdefault('{key}', {{'v': 0}})['v'] *= 2"),
            };
            let r1 = run(&e1, &mut m1, &src);
            let r2 = run(&e2, &mut m2, &src);
            prop_assert_eq!(&r1, &r2);
            r1.unwrap();
            let kk = Key::from(key.as_str());
            match op {
                0 => { model.insert(kk, json(&format!(r#"{{"v":{v}}}"#))); }
                1 => { model.remove(&kk); }
                2 => {
                    if let Some(Value::Map(d)) = model.get_mut(&kk) {
                        let n = match d["v"] { Value::Int(n) => n, _ => unreachable!() };
                        d.insert("v".into(), Value::Int(n + v));
                    }
                }
                _ => {
                    let d = model.entry(kk).or_insert_with(|| json(r#"{"v":0}"#));
                    if let Value::Map(d) = d {
                        let n = match d["v"] { Value::Int(n) => n, _ => unreachable!() };
                        d.insert("v".into(), Value::Int(n * 2));
                    }
                }
            }
            prop_assert_eq!(&m1.colls["users"], &model);
        }
        prop_assert_eq!(&m1.colls, &m2.colls);
    }
}

#[test]
fn procedures_may_name_tables_that_do_not_exist_yet() {
    let e = Engine::new();
    e.set_procedures(
        "social",
        "def visit(who):\n    users[who]['visits'] += 1\n    return users[who]['visits']\n",
    )
    .unwrap();
    e.set_collections(["users".to_string()]);
    let mut m = Mem::default();
    m.colls.entry("users".into()).or_default().insert("bob".into(), json(r#"{"visits":1}"#));
    assert_eq!(run(&e, &mut m, "visit('bob')").unwrap().value, Value::Int(2));
}

#[test]
fn writes_nan_and_key_order() {
    let (e, mut m) = setup();
    m.colls.get_mut("users").unwrap().insert("f".into(), json(r#"{"a": 1, "b": 2}"#));
    m.colls
        .get_mut("users")
        .unwrap()
        .insert("n".into(), Value::Map([("x".to_string(), Value::Float(f64::NAN))].into_iter().collect()));
    // Reading a document holding NaN is not a write.
    assert!(run(&e, &mut m, "users['n']['x'] != 0").unwrap().writes.is_empty());
    // Reordering a map's keys is a change.
    let o = run(&e, &mut m, "d = users['f']\nv = d.pop('a')\nd['a'] = v").unwrap();
    assert_eq!(o.writes.len(), 1);
    let order: Vec<String> = match &m.colls["users"][&Key::from("f")] {
        Value::Map(m) => m.keys().cloned().collect(),
        v => panic!("{v:?}"),
    };
    assert_eq!(order, ["b", "a"]);
}

#[test]
fn exponential_values_and_deep_sources_are_refused() {
    let (e, mut m) = setup();
    let f = fail_kind(run(&e, &mut m, "l = [0]\nfor i in range(70):\n    l = [l]\nusers['x'] = l"));
    assert_eq!(f.kind, SnippetErrorKind::Value, "{f}");
    let deep = format!("x = {}1{}", "(".repeat(500), ")".repeat(500));
    assert_eq!(fail_kind(run(&e, &mut m, &deep)).kind, SnippetErrorKind::Syntax);
    let long = format!("x = {}1", "1+".repeat(100_000));
    assert_eq!(fail_kind(run(&e, &mut m, &long)).kind, SnippetErrorKind::Syntax);
    let neg = format!("x = {}1", "-".repeat(100_000));
    assert_eq!(fail_kind(run(&e, &mut m, &neg)).kind, SnippetErrorKind::Syntax);
    // A procedure's `*` is guarded too, and its top-level code has budgets.
    e.set_procedures("pad", "def pad(s, n):\n    return s + ' ' * n\n").unwrap();
    let f = fail_kind(run(&e, &mut m, "pad('', 1 << 40)"));
    assert_eq!(f.kind, SnippetErrorKind::Budget(Budget::Memory), "{f}");
    assert!(e.set_procedures("spin", "for i in range(1000000000):\n    pass\n").is_err());
    assert!(e.set_procedures("shadow", "def len(x):\n    return 0\n").is_err());
}

#[test]
fn writes_outside_the_store_scope_are_refused() {
    struct OnlyUsers(Mem);
    impl Store for OnlyUsers {
        fn get(&mut self, c: &str, k: &Key) -> Result<Option<Value>, GridError> {
            self.0.get(c, k)
        }
        fn contains(&mut self, c: &str, k: &Key) -> Result<bool, GridError> {
            self.0.contains(c, k)
        }
        fn count(&mut self, c: &str) -> Result<u64, GridError> {
            self.0.count(c)
        }
        fn scan(&mut self, c: &str, q: &ScanQuery) -> Result<Vec<(Key, Value)>, GridError> {
            self.0.scan(c, q)
        }
        fn check_write(&mut self, c: &str, _: &Key) -> Result<(), GridError> {
            if c == "users" { Ok(()) } else { Err(GridError::Invalid(format!("cannot write {c}"))) }
        }
    }
    let (e, m) = setup();
    let mut s = OnlyUsers(m);
    let c = e.compile("users['a'] = 1\nqueues['x'] = 1").unwrap();
    let r = c.run(&mut s, &limits(), None, &Value::Null);
    assert_eq!(r, Err(GridError::Invalid("cannot write queues".into())));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random programs made of snippet fragments compile or fail with an error, and run or fail
    /// with an error: never a panic. A failed run writes nothing.
    #[test]
    fn random_programs_never_panic(parts in prop::collection::vec(prop::sample::select(vec![
        "users['a']", "users[1]", "del ", "*=", "+=", "[", "]", "(", ")", "{", "}", "'", "\"", "'''",
        "\n", "    ", ":", ",", ";", "=", "==", "*", "+", "-", "%", "1", "2.5", "None", "True", "x", "y",
        "for x in range(3):", "if x:", "def f(a):", "return ", "lambda a: a", "len(users)",
        "users.scan(prefix='a')", "users.get('a', 0)", "users.setdefault('b', [])", "users.pop('a', 0)",
        ".append(1)", "é", "#", "\\", "fail('x')", "key", "args", "class C:", "import json", "json.dumps(x)",
        "[0] * 3", "'ab' * 2", "{'k': [1]}", "x[0]", "d['k']", "del x[0]", "del users['a']",
    ]), 0..30)) {
        let src: String = parts.concat();
        let (e, mut m) = setup();
        let before = m.colls.clone();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            match e.compile(&src) {
                Ok(c) => c.run(&mut m, &limits(), Some(&Key::from("a")), &Value::Null).map(|_| ()),
                Err(e) => Err(e),
            }
        }));
        prop_assert!(r.is_ok(), "panicked on {:?}", src);
        if let Ok(Err(_)) = r {
            prop_assert_eq!(&m.colls, &before);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Random sequences of valid statements: they run (or fail cleanly, leaving nothing), and the
    /// same sequence gives the same outcome twice.
    #[test]
    fn random_statement_sequences(stmts in prop::collection::vec(prop::sample::select(vec![
        "x = users.get('a', {})", "x['n'] = x.get('n', 0) + 1", "users['a'] = x", "del users['a']",
        "users['b'] = [1, 2]", "users['b'].append(3)", "users['b'] *= 2", "y = users.keys(limit=5)",
        "z = [v for k, v in users.scan()]", "users.delete('c')", "users['c'] = {'d': {'e': [1]}}",
        "users['c']['d']['e'].append(len(users))", "del users['c']['d']", "w = 'a' in users",
        "users.pop('b', None)", "q = users.setdefault('q', [])", "q.append(1)", "q.pop(0) if q else None",
        "users[7] = 1.5", "users[7] = users.get(7, 0) + 1", "fail('stop')", "users['nope']",
    ]), 1..12)) {
        let src = stmts.join("\n");
        let (e, mut m1) = setup();
        let (_, mut m2) = setup();
        let before = m1.colls.clone();
        let r1 = e.compile(&src).and_then(|c| c.run(&mut m1, &limits(), None, &Value::Null));
        let r2 = e.compile(&src).and_then(|c| c.run(&mut m2, &limits(), None, &Value::Null));
        prop_assert_eq!(&r1, &r2);
        match r1 {
            Ok(o) => m1.apply(&o),
            Err(_) => prop_assert_eq!(&m1.colls, &before),
        }
    }
}
