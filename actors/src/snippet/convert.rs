//! `Value` ↔ Python values (`MontyObject`, the engine's boundary type), and result shaping.
//!
//! Mapping: null ↔ None, bool, int (i64; a larger Python int cannot be stored), float, string,
//! bytes, list (a tuple is stored as a list), map ↔ dict with string keys (insertion order kept).
//!
//! Result shaping: past `result_depth` levels, or for a list or map longer than `result_items`,
//! a value that came from a stored document is answered as `{"$ref": PATH, "len": N}`; the
//! client fetches it by path (`fetch`), in pages. A computed value that big is a `result size`
//! budget error. A ref path is `collection/key/seg/...`: segments escaped as in JSON Pointer
//! (`~0` for `~`, `~1` for `/`), an int table key written `#42` (a string key starting with `#`
//! escapes it as `~2`), list positions as decimal indices.

use indexmap::IndexMap;
use monty_types::{DictPairs, MontyObject};

use crate::key::Key;
use crate::value::{VALUE_DEPTH_MAX, VALUE_NODES_MAX, Value};

pub(crate) fn to_monty(v: &Value) -> MontyObject {
    match v {
        Value::Null => MontyObject::None,
        Value::Bool(b) => MontyObject::Bool(*b),
        Value::Int(i) => MontyObject::Int(*i),
        Value::Float(f) => MontyObject::Float(*f),
        Value::Str(s) => MontyObject::String(s.clone()),
        Value::Bytes(b) => MontyObject::Bytes(b.clone()),
        Value::List(l) => MontyObject::List(l.iter().map(to_monty).collect()),
        Value::Map(m) => MontyObject::Dict(DictPairs::from(
            m.iter().map(|(k, x)| (MontyObject::String(k.clone()), to_monty(x))).collect::<Vec<_>>(),
        )),
    }
}

pub(crate) fn key_to_monty(k: &Key) -> MontyObject {
    match k {
        Key::Int(i) => MontyObject::Int(*i),
        Key::Str(s) => MontyObject::String(s.clone()),
    }
}

pub(crate) fn key_of(v: &MontyObject) -> Option<Key> {
    match v {
        MontyObject::Int(i) => Some(Key::Int(*i)),
        MontyObject::String(s) => Some(Key::Str(s.clone())),
        _ => None,
    }
}

/// A Python type's name, for messages.
pub(crate) fn type_name(v: &MontyObject) -> String {
    match v {
        MontyObject::None => "NoneType".into(),
        MontyObject::Bool(_) => "bool".into(),
        MontyObject::Int(_) | MontyObject::BigInt(_) => "int".into(),
        MontyObject::Float(_) => "float".into(),
        MontyObject::String(_) => "str".into(),
        MontyObject::Bytes(_) => "bytes".into(),
        MontyObject::List(_) => "list".into(),
        MontyObject::Tuple(_) | MontyObject::NamedTuple { .. } => "tuple".into(),
        MontyObject::Dict(_) => "dict".into(),
        MontyObject::Set(_) => "set".into(),
        MontyObject::FrozenSet(_) => "frozenset".into(),
        MontyObject::Function { .. } | MontyObject::BuiltinFunction(_) => "function".into(),
        MontyObject::ClassInstance(_) => "object".into(),
        MontyObject::Type(_) => "type".into(),
        other => {
            let d = format!("{other:?}");
            d.split(['(', ' ', '{']).next().unwrap_or("value").to_lowercase()
        }
    }
}

/// A Python value as a storable `Value` (error: why not). At most `VALUE_NODES_MAX` nodes and
/// `VALUE_DEPTH_MAX` levels.
pub(crate) fn to_value(v: &MontyObject) -> Result<Value, String> {
    let mut nodes = 0u64;
    to_value_at(v, 0, &mut nodes)
}

fn to_value_at(v: &MontyObject, depth: usize, nodes: &mut u64) -> Result<Value, String> {
    if depth > VALUE_DEPTH_MAX {
        return Err(format!("value nests deeper than {VALUE_DEPTH_MAX} levels (or contains itself)"));
    }
    *nodes += 1;
    if *nodes > VALUE_NODES_MAX {
        return Err(format!("value has more than {VALUE_NODES_MAX} elements"));
    }
    Ok(match v {
        MontyObject::None => Value::Null,
        MontyObject::Bool(b) => Value::Bool(*b),
        MontyObject::Int(i) => Value::Int(*i),
        MontyObject::BigInt(b) => return Err(format!("integer {b} does not fit in 64 bits")),
        MontyObject::Float(f) => Value::Float(*f),
        MontyObject::String(s) => Value::Str(s.clone()),
        MontyObject::Bytes(b) => Value::Bytes(b.clone()),
        MontyObject::List(l) | MontyObject::Tuple(l) => {
            Value::List(l.iter().map(|x| to_value_at(x, depth + 1, nodes)).collect::<Result<_, _>>()?)
        }
        MontyObject::Dict(d) => {
            let mut m = IndexMap::new();
            for (k, x) in d {
                let MontyObject::String(k) = k else {
                    return Err(format!("a stored map's keys are strings, not {}", type_name(k)));
                };
                m.insert(k.clone(), to_value_at(x, depth + 1, nodes)?);
            }
            Value::Map(m)
        }
        other => return Err(format!("a {} cannot be stored or returned", type_name(other))),
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefPath {
    pub collection: String,
    pub key: Key,
    pub path: Vec<crate::value::PathSeg>,
}

fn escape(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '~' => out.push_str("~0"),
            '/' => out.push_str("~1"),
            c => out.push(c),
        }
    }
}

impl std::fmt::Display for RefPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        escape(&self.collection, &mut s);
        s.push('/');
        match &self.key {
            Key::Int(i) => s.push_str(&format!("#{i}")),
            Key::Str(k) => {
                if let Some(rest) = k.strip_prefix('#') {
                    s.push_str("~2");
                    escape(rest, &mut s);
                } else {
                    escape(k, &mut s);
                }
            }
        }
        for seg in &self.path {
            s.push('/');
            match seg {
                crate::value::PathSeg::Key(k) => escape(k, &mut s),
                crate::value::PathSeg::Index(i) => s.push_str(&i.to_string()),
            }
        }
        f.write_str(&s)
    }
}

fn unescape(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '~' {
            match it.next() {
                Some('0') => out.push('~'),
                Some('1') => out.push('/'),
                Some('2') => out.push('#'),
                _ => return Err(format!("bad escape in ref segment {s:?}")),
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// Parses a `$ref` path. Segments after the key are map keys; the container decides whether a
/// decimal segment is a list index (`fetch` resolves that against the stored value).
pub fn parse_ref(r: &str) -> Result<RefPath, String> {
    let mut parts = r.split('/');
    let collection = unescape(parts.next().unwrap_or(""))?;
    let key = parts.next().ok_or_else(|| format!("ref {r:?} names no key"))?;
    let key = match key.strip_prefix('#') {
        Some(i) => Key::Int(i.parse().map_err(|_| format!("bad int key in ref {r:?}"))?),
        None => Key::Str(unescape(key)?),
    };
    let path = parts.map(|p| unescape(p).map(crate::value::PathSeg::Key)).collect::<Result<_, _>>()?;
    if collection.is_empty() {
        return Err(format!("ref {r:?} names no collection"));
    }
    Ok(RefPath { collection, key, path })
}

/// Shaping limits and accounting.
pub(crate) struct Shaper {
    pub depth_max: u32,
    pub items_max: u32,
    pub bytes_max: u64,
    pub bytes: u64,
}

/// Why a result cannot be shaped within its budget.
pub(crate) struct TooBig(pub String);

impl Shaper {
    fn add(&mut self, n: u64) -> Result<(), TooBig> {
        self.bytes += n;
        if self.bytes > self.bytes_max {
            return Err(TooBig(format!(
                "the result is more than {} bytes; return less, or a stored document (answered with $ref)",
                self.bytes_max
            )));
        }
        Ok(())
    }

    fn reference(&mut self, at: &RefPath, len: usize) -> Result<Value, TooBig> {
        let r = at.to_string();
        self.add(r.len() as u64 + 16)?;
        let mut m = IndexMap::new();
        m.insert("$ref".to_string(), Value::Str(r));
        m.insert("len".to_string(), Value::Int(len as i64));
        Ok(Value::Map(m))
    }

    fn too_deep_or_long(&self, depth: u32, len: usize) -> bool {
        depth >= self.depth_max || len > self.items_max as usize
    }

    fn refuse(&self, depth: u32, len: usize) -> TooBig {
        if depth >= self.depth_max {
            TooBig(format!(
                "the result nests deeper than {} levels; only stored documents are answered with $ref",
                self.depth_max
            ))
        } else {
            TooBig(format!(
                "a list or map in the result has {len} entries, more than {}; only stored documents are answered with $ref",
                self.items_max
            ))
        }
    }

    /// Shapes a run's result. `refs`: the positions in it (list index, dict entry index) that
    /// are stored documents, and where they are stored.
    pub(crate) fn shape_result(
        &mut self,
        v: &MontyObject,
        refs: &[(Vec<usize>, RefPath)],
        pos: &mut Vec<usize>,
        at: Option<RefPath>,
        depth: u32,
    ) -> Result<Result<Value, String>, TooBig> {
        let at = refs.iter().find(|(p, _)| p == pos).map(|(_, r)| r.clone()).or(at);
        let child = |at: &Option<RefPath>, seg: crate::value::PathSeg| {
            at.as_ref().map(|p| {
                let mut p = p.clone();
                p.path.push(seg);
                p
            })
        };
        match v {
            MontyObject::List(l) | MontyObject::Tuple(l) => {
                if self.too_deep_or_long(depth, l.len()) {
                    return match &at {
                        Some(p) => self.reference(p, l.len()).map(Ok),
                        None => Err(self.refuse(depth, l.len())),
                    };
                }
                let mut out = Vec::with_capacity(l.len());
                for (i, x) in l.iter().enumerate() {
                    let c = child(&at, crate::value::PathSeg::Index(i as i64));
                    pos.push(i);
                    let r = self.shape_result(x, refs, pos, c, depth + 1);
                    pos.pop();
                    match r? {
                        Ok(v) => out.push(v),
                        Err(e) => return Ok(Err(e)),
                    }
                }
                self.add(2)?;
                Ok(Ok(Value::List(out)))
            }
            MontyObject::Dict(d) => {
                let n = d.into_iter().count();
                if self.too_deep_or_long(depth, n) {
                    return match &at {
                        Some(p) => self.reference(p, n).map(Ok),
                        None => Err(self.refuse(depth, n)),
                    };
                }
                let mut m = IndexMap::with_capacity(n);
                for (i, (k, x)) in d.into_iter().enumerate() {
                    let MontyObject::String(k) = k else {
                        return Ok(Err(format!("a result map's keys are strings, not {}", type_name(k))));
                    };
                    let c = child(&at, crate::value::PathSeg::Key(k.clone()));
                    pos.push(i);
                    let r = self.shape_result(x, refs, pos, c, depth + 1);
                    pos.pop();
                    match r? {
                        Ok(v) => {
                            self.add(k.len() as u64 + 4)?;
                            m.insert(k.clone(), v);
                        }
                        Err(e) => return Ok(Err(e)),
                    }
                }
                self.add(2)?;
                Ok(Ok(Value::Map(m)))
            }
            v => match to_value(v) {
                Ok(x) => {
                    self.add(scalar_bytes(&x))?;
                    Ok(Ok(x))
                }
                Err(e) => Ok(Err(e)),
            },
        }
    }

    pub(crate) fn shape_value(&mut self, v: &Value, at: &RefPath, depth: u32) -> Result<Value, TooBig> {
        let child = |seg: crate::value::PathSeg| {
            let mut p = at.clone();
            p.path.push(seg);
            p
        };
        match v {
            Value::List(l) => {
                if self.too_deep_or_long(depth, l.len()) {
                    return self.reference(at, l.len());
                }
                let mut out = Vec::with_capacity(l.len());
                for (i, x) in l.iter().enumerate() {
                    out.push(self.shape_value(
                        x,
                        &child(crate::value::PathSeg::Index(i as i64)),
                        depth + 1,
                    )?);
                }
                self.add(2)?;
                Ok(Value::List(out))
            }
            Value::Map(m) => {
                if self.too_deep_or_long(depth, m.len()) {
                    return self.reference(at, m.len());
                }
                let mut out = IndexMap::with_capacity(m.len());
                for (k, x) in m {
                    let s = self.shape_value(x, &child(crate::value::PathSeg::Key(k.clone())), depth + 1)?;
                    self.add(k.len() as u64 + 4)?;
                    out.insert(k.clone(), s);
                }
                self.add(2)?;
                Ok(Value::Map(out))
            }
            x => {
                self.add(scalar_bytes(x))?;
                Ok(x.clone())
            }
        }
    }
}

fn scalar_bytes(v: &Value) -> u64 {
    match v {
        Value::Str(s) => s.len() as u64 + 2,
        Value::Bytes(b) => b.len() as u64 * 4 / 3 + 16,
        _ => 8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::PathSeg;

    #[test]
    fn ref_paths_round_trip() {
        for (coll, key, path) in [
            ("users", Key::Str("bob".into()), vec![PathSeg::Key("friends".into())]),
            ("a-b", Key::Int(-42), vec![]),
            ("t", Key::Str("#x/y~z".into()), vec![PathSeg::Key("a/b".into()), PathSeg::Key("~".into())]),
        ] {
            let r = RefPath { collection: coll.into(), key, path };
            assert_eq!(parse_ref(&r.to_string()).unwrap(), r, "{r}");
        }
        assert_eq!(
            RefPath {
                collection: "users".into(),
                key: "bob".into(),
                path: vec![PathSeg::Key("friends".into())]
            }
            .to_string(),
            "users/bob/friends"
        );
        assert!(parse_ref("users").is_err());
        assert!(parse_ref("users/#x").is_err());
        assert!(parse_ref("users/a~9").is_err());
    }
}
