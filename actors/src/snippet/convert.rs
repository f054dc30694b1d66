//! `Value` ↔ Starlark values, and result shaping.
//!
//! Mapping: null ↔ None, bool, int (i64; a larger Starlark int cannot be stored), float, string,
//! bytes, list (a tuple is stored as a list), map ↔ dict with string keys (insertion order kept).
//!
//! Result shaping: past `result_depth` levels, or for a list or map longer than `result_items`,
//! a value that came from a stored document is answered as `{"$ref": PATH, "len": N}`; the
//! client fetches it by path (`fetch`), in pages. A computed value that big is a `result size`
//! budget error. A ref path is `collection/key/seg/...`: segments escaped as in JSON Pointer
//! (`~0` for `~`, `~1` for `/`), an int table key written `#42` (a string key starting with `#`
//! escapes it as `~2`), list positions as decimal indices.

use std::collections::HashMap;

use indexmap::IndexMap;
use starlark::values::dict::{AllocDict, DictRef};
use starlark::values::float::StarlarkFloat;
use starlark::values::list::{AllocList, ListRef};
use starlark::values::none::NoneType;
use starlark::values::tuple::TupleRef;
use starlark::values::{Heap, UnpackValue, Value as SValue, ValueIdentity, ValueLike};

use crate::key::Key;
use crate::value::{VALUE_DEPTH_MAX, VALUE_NODES_MAX, Value};

pub(crate) fn to_starlark<'v>(v: &Value, heap: Heap<'v>) -> SValue<'v> {
    match v {
        Value::Null => SValue::new_none(),
        Value::Bool(b) => SValue::new_bool(*b),
        Value::Int(i) => heap.alloc(*i),
        Value::Float(f) => heap.alloc(StarlarkFloat(*f)),
        Value::Str(s) => heap.alloc(s.as_str()),
        Value::Bytes(b) => heap.alloc(b.as_slice()),
        Value::List(l) => {
            let items: Vec<SValue<'v>> = l.iter().map(|x| to_starlark(x, heap)).collect();
            heap.alloc(AllocList(items))
        }
        Value::Map(m) => {
            let items: Vec<(SValue<'v>, SValue<'v>)> =
                m.iter().map(|(k, x)| (heap.alloc(k.as_str()), to_starlark(x, heap))).collect();
            heap.alloc(AllocDict(items))
        }
    }
}

/// A Starlark value as a storable `Value` (error: why not). At most `VALUE_NODES_MAX` nodes, so a
/// value that shares one list many times over (`l = [l, l]` repeated) cannot expand without bound.
pub(crate) fn to_value(v: SValue) -> Result<Value, String> {
    let mut nodes = 0u64;
    to_value_at(v, 0, &mut nodes)
}

fn to_value_at(v: SValue, depth: usize, nodes: &mut u64) -> Result<Value, String> {
    if depth > VALUE_DEPTH_MAX {
        return Err(format!("value nests deeper than {VALUE_DEPTH_MAX} levels (or contains itself)"));
    }
    *nodes += 1;
    if *nodes > VALUE_NODES_MAX {
        return Err(format!("value has more than {VALUE_NODES_MAX} elements"));
    }
    if v.is_none() {
        return Ok(Value::Null);
    }
    if let Some(b) = v.unpack_bool() {
        return Ok(Value::Bool(b));
    }
    if let Some(s) = v.unpack_str() {
        return Ok(Value::Str(s.to_string()));
    }
    if v.get_type() == "int" {
        return match i64::unpack_value(v) {
            Ok(Some(i)) => Ok(Value::Int(i)),
            _ => Err(format!("integer {} does not fit in 64 bits", v.to_repr())),
        };
    }
    if let Some(f) = v.downcast_ref::<StarlarkFloat>() {
        return Ok(Value::Float(f.0));
    }
    if let Some(b) = v.downcast_ref::<starlark::values::bytes::StarlarkBytes>() {
        return Ok(Value::Bytes(b.as_bytes().to_vec()));
    }
    if let Some(l) = ListRef::from_value(v) {
        return l.iter().map(|x| to_value_at(x, depth + 1, nodes)).collect::<Result<_, _>>().map(Value::List);
    }
    if let Some(t) = TupleRef::from_value(v) {
        return t.iter().map(|x| to_value_at(x, depth + 1, nodes)).collect::<Result<_, _>>().map(Value::List);
    }
    if let Some(d) = DictRef::from_value(v) {
        let mut m = IndexMap::with_capacity(d.len());
        for (k, x) in d.iter() {
            let Some(k) = k.unpack_str() else {
                return Err(format!("a stored map's keys are strings, not {}", k.get_type()));
            };
            m.insert(k.to_string(), to_value_at(x, depth + 1, nodes)?);
        }
        return Ok(Value::Map(m));
    }
    Err(format!("a {} cannot be stored or returned", v.get_type()))
}

/// Where a stored value lives: collection, key, then map keys and list indices.
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

    /// Shapes a Starlark result; `origins` maps documents read from collections to their place.
    pub(crate) fn shape_starlark(
        &mut self,
        v: SValue,
        origins: &HashMap<ValueIdentity, RefPath>,
        at: Option<RefPath>,
        depth: u32,
    ) -> Result<Result<Value, String>, TooBig> {
        let at = origins.get(&v.identity()).cloned().or(at);
        let child = |at: &Option<RefPath>, seg: crate::value::PathSeg| {
            at.as_ref().map(|p| {
                let mut p = p.clone();
                p.path.push(seg);
                p
            })
        };
        if let Some(l) = ListRef::from_value(v)
            .map(|l| l.content())
            .or_else(|| TupleRef::from_value(v).map(|t| t.content()))
        {
            if self.too_deep_or_long(depth, l.len()) {
                return match &at {
                    Some(p) => self.reference(p, l.len()).map(Ok),
                    None => Err(self.refuse(depth, l.len())),
                };
            }
            let mut out = Vec::with_capacity(l.len());
            for (i, x) in l.iter().enumerate() {
                let c = child(&at, crate::value::PathSeg::Index(i as i64));
                match self.shape_starlark(*x, origins, c, depth + 1)? {
                    Ok(v) => out.push(v),
                    Err(e) => return Ok(Err(e)),
                }
            }
            self.add(2)?;
            return Ok(Ok(Value::List(out)));
        }
        if let Some(d) = DictRef::from_value(v) {
            if self.too_deep_or_long(depth, d.len()) {
                return match &at {
                    Some(p) => self.reference(p, d.len()).map(Ok),
                    None => Err(self.refuse(depth, d.len())),
                };
            }
            let mut m = IndexMap::with_capacity(d.len());
            for (k, x) in d.iter() {
                let Some(k) = k.unpack_str() else {
                    return Ok(Err(format!("a result map's keys are strings, not {}", k.get_type())));
                };
                let c = child(&at, crate::value::PathSeg::Key(k.to_string()));
                match self.shape_starlark(x, origins, c, depth + 1)? {
                    Ok(v) => {
                        self.add(k.len() as u64 + 4)?;
                        m.insert(k.to_string(), v);
                    }
                    Err(e) => return Ok(Err(e)),
                }
            }
            self.add(2)?;
            return Ok(Ok(Value::Map(m)));
        }
        if v.downcast_ref::<NoneType>().is_some() {
            self.add(4)?;
            return Ok(Ok(Value::Null));
        }
        match to_value(v) {
            Ok(x) => {
                self.add(scalar_bytes(&x))?;
                Ok(Ok(x))
            }
            Err(e) => Ok(Err(e)),
        }
    }

    /// Shapes a stored value (a fetch), `at` being its place.
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
