//! `Value`: the grid's data model. A JSON-compatible tree plus bytes: null, bool, i64, f64,
//! string, bytes, list, and map (string keys, insertion order kept).
//!
//! Stored form (what a table keeps in its heap):
//!
//! ```text
//! u8  VALUE_FORMAT_VERSION (1)
//! ..  postcard encoding of `Value` (enum tag as varint, then the variant's fields; strings and
//!     bytes as varint length + bytes; lists as varint length + items; maps as varint length +
//!     (string key, value) pairs in insertion order; i64 zigzag varint; f64 8 bytes LE)
//! ```
//!
//! postcard is not self-describing, so only this type is ever stored, never a user's struct:
//! typed values convert to and from `Value` through serde (via `serde_json::Value` with its
//! insertion order kept). Results leave the server as JSON, where bytes appear as
//! `{"$bytes": "<base64>"}`.
//!
//! Invariant: decoding untrusted bytes never recurses deeper than `VALUE_DEPTH_MAX` (a
//! non-recursive scan checks depth and structure before postcard runs) and never panics.
//! Invariant: an encoded value is at most `VALUE_ENCODED_BYTES_MAX` bytes.

use base64::Engine as _;
use indexmap::IndexMap;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Nesting depth of lists and maps (the top value is depth 0).
pub const VALUE_DEPTH_MAX: usize = 64;
/// Bytes of one encoded value: what a heap value may hold after a table's 8-byte record header.
pub const VALUE_ENCODED_BYTES_MAX: usize = heapgrid_heap::limits::VALUE_BYTES_MAX as usize - 8;
/// Version byte in front of every stored value.
pub const VALUE_FORMAT_VERSION: u8 = 1;

/// A document: see the module docs.
///
/// Serde: in binary formats (postcard) a `Value` is its tagged enum (`Repr` below); in
/// human-readable formats (JSON) it is the natural JSON form, so `Table::put(k, &value)` and
/// `get::<Value>` round-trip. Deserializing counts nodes against a per-decode budget
/// (`with_node_budget`), so a small message cannot expand into gigabytes of tiny values.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum Value {
    #[default]
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// Serialized as one byte string (`serde_bytes`); in postcard that is the same bytes as a
    /// sequence of u8, only far faster to produce.
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Map(IndexMap<String, Value>),
}

/// The binary representation (variant order is the postcard tag: never reorder).
#[derive(Serialize, Deserialize)]
#[serde(rename = "Value")]
enum Repr {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
    List(#[serde(deserialize_with = "de_nested")] Vec<Value>),
    Map(#[serde(deserialize_with = "de_nested")] IndexMap<String, Value>),
}

#[derive(Serialize)]
#[serde(rename = "Value")]
enum ReprRef<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'a str),
    Bytes(#[serde(with = "serde_bytes")] &'a [u8]),
    List(&'a [Value]),
    Map(&'a IndexMap<String, Value>),
}

impl Serialize for Value {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            return self.to_json().serialize(s);
        }
        match self {
            Value::Null => ReprRef::Null,
            Value::Bool(b) => ReprRef::Bool(*b),
            Value::Int(i) => ReprRef::Int(*i),
            Value::Float(f) => ReprRef::Float(*f),
            Value::Str(x) => ReprRef::Str(x),
            Value::Bytes(b) => ReprRef::Bytes(b),
            Value::List(l) => ReprRef::List(l),
            Value::Map(m) => ReprRef::Map(m),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let j = serde_json::Value::deserialize(d)?;
            return Value::from_json(&j).map_err(serde::de::Error::custom);
        }
        take_node().map_err(serde::de::Error::custom)?;
        Ok(match Repr::deserialize(d)? {
            Repr::Null => Value::Null,
            Repr::Bool(b) => Value::Bool(b),
            Repr::Int(i) => Value::Int(i),
            Repr::Float(f) => Value::Float(f),
            Repr::Str(s) => Value::Str(s),
            Repr::Bytes(b) => Value::Bytes(b),
            Repr::List(l) => Value::List(l),
            Repr::Map(m) => Value::Map(m),
        })
    }
}

thread_local! {
    /// Nesting depth of the `Value` being deserialized on this thread.
    static DE_DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Deserializes a list or map one level deeper, refusing to go past `VALUE_DEPTH_MAX`: a value
/// arriving from the network (inside any message) cannot make deserialization overflow the stack.
fn de_nested<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            DE_DEPTH.with(|c| c.set(c.get().saturating_sub(1)));
        }
    }
    let depth = DE_DEPTH.with(|c| {
        c.set(c.get() + 1);
        c.get()
    });
    let _leave = Leave;
    if depth > VALUE_DEPTH_MAX {
        return Err(serde::de::Error::custom(format!("value nests deeper than {VALUE_DEPTH_MAX} levels")));
    }
    T::deserialize(d)
}

/// Most `Value` nodes one decode may produce (a node costs ~40 bytes in memory).
pub const VALUE_NODES_MAX: u64 = 4_000_000;

thread_local! {
    /// Nodes the current decode may still produce (`None`: no decode in progress).
    static NODES_LEFT: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

fn take_node() -> Result<(), String> {
    NODES_LEFT.with(|c| match c.get() {
        Some(0) => Err(format!("message holds more than {VALUE_NODES_MAX} values")),
        Some(n) => {
            c.set(Some(n - 1));
            Ok(())
        }
        None => Ok(()),
    })
}

/// Runs a decode with a budget of `VALUE_NODES_MAX` value nodes (nested calls share it).
pub fn with_node_budget<R>(f: impl FnOnce() -> R) -> R {
    let outer = NODES_LEFT.with(|c| c.get());
    if outer.is_some() {
        return f();
    }
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            NODES_LEFT.with(|c| c.set(None));
        }
    }
    NODES_LEFT.with(|c| c.set(Some(VALUE_NODES_MAX)));
    let _reset = Reset;
    f()
}

/// Why a value could not be decoded, converted or updated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueError {
    #[error("stored value is malformed: {0}")]
    Malformed(String),
    #[error("value nests deeper than {VALUE_DEPTH_MAX} levels")]
    TooDeep,
    #[error("encoded value is {got} bytes, the limit is {max}")]
    TooLarge { got: usize, max: usize },
    #[error("cannot convert: {0}")]
    Convert(String),
    #[error("no value at path {0}")]
    PathNotFound(String),
    #[error("type mismatch at {path}: {why}")]
    Type { path: String, why: String },
}

const TAG_NULL: u64 = 0;
const TAG_BOOL: u64 = 1;
const TAG_INT: u64 = 2;
const TAG_FLOAT: u64 = 3;
const TAG_STR: u64 = 4;
const TAG_BYTES: u64 = 5;
const TAG_LIST: u64 = 6;
const TAG_MAP: u64 = 7;

impl Value {
    /// The stored form: version byte + postcard.
    pub fn encode(&self) -> Result<Vec<u8>, ValueError> {
        if self.depth() > VALUE_DEPTH_MAX {
            return Err(ValueError::TooDeep);
        }
        let v = postcard::to_extend(self, vec![VALUE_FORMAT_VERSION])
            .map_err(|e| ValueError::Convert(e.to_string()))?;
        if v.len() > VALUE_ENCODED_BYTES_MAX {
            return Err(ValueError::TooLarge { got: v.len(), max: VALUE_ENCODED_BYTES_MAX });
        }
        Ok(v)
    }

    /// Decodes a stored value. Untrusted input: checked for depth and structure first.
    pub fn decode(bytes: &[u8]) -> Result<Value, ValueError> {
        let Some((&version, body)) = bytes.split_first() else {
            return Err(ValueError::Malformed("empty".into()));
        };
        if version != VALUE_FORMAT_VERSION {
            return Err(ValueError::Malformed(format!("value format version {version}")));
        }
        scan(body)?;
        with_node_budget(|| postcard::from_bytes(body)).map_err(|e| ValueError::Malformed(e.to_string()))
    }

    /// Nesting depth (0 for a scalar).
    pub fn depth(&self) -> usize {
        // Iterative, so a deep value built in memory cannot overflow the stack here either.
        let mut max = 0;
        let mut stack = vec![(self, 0usize)];
        while let Some((v, d)) = stack.pop() {
            max = max.max(d);
            match v {
                Value::List(items) => stack.extend(items.iter().map(|i| (i, d + 1))),
                Value::Map(m) => stack.extend(m.values().map(|i| (i, d + 1))),
                _ => {}
            }
        }
        max
    }

    /// Converts any serde value (a user's struct) into a `Value`.
    pub fn from_serde<T: Serialize + ?Sized>(t: &T) -> Result<Value, ValueError> {
        let j = serde_json::to_value(t).map_err(|e| ValueError::Convert(e.to_string()))?;
        Value::from_json(&j)
    }

    /// Converts into any serde type.
    pub fn to_serde<T: DeserializeOwned>(&self) -> Result<T, ValueError> {
        serde_json::from_value(self.to_json()).map_err(|e| ValueError::Convert(e.to_string()))
    }

    /// From JSON. `{"$bytes": "<base64>"}` becomes `Bytes`; integers above `i64::MAX` are an error.
    pub fn from_json(j: &serde_json::Value) -> Result<Value, ValueError> {
        fn go(j: &serde_json::Value, depth: usize) -> Result<Value, ValueError> {
            if depth > VALUE_DEPTH_MAX {
                return Err(ValueError::TooDeep);
            }
            Ok(match j {
                serde_json::Value::Null => Value::Null,
                serde_json::Value::Bool(b) => Value::Bool(*b),
                serde_json::Value::Number(n) => match (n.as_i64(), n.as_f64()) {
                    (Some(i), _) => Value::Int(i),
                    (None, Some(_)) if n.is_u64() => {
                        return Err(ValueError::Convert(format!("integer {n} is above i64::MAX")));
                    }
                    (None, Some(f)) => Value::Float(f),
                    (None, None) => return Err(ValueError::Convert(format!("number {n}"))),
                },
                serde_json::Value::String(s) => Value::Str(s.clone()),
                serde_json::Value::Array(a) => {
                    Value::List(a.iter().map(|x| go(x, depth + 1)).collect::<Result<_, _>>()?)
                }
                serde_json::Value::Object(o) => {
                    if o.len() == 1
                        && let Some(serde_json::Value::String(b64)) = o.get("$bytes")
                    {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(b64)
                            .map_err(|e| ValueError::Convert(format!("$bytes: {e}")))?;
                        return Ok(Value::Bytes(bytes));
                    }
                    let mut m = IndexMap::with_capacity(o.len());
                    for (k, v) in o {
                        m.insert(k.clone(), go(v, depth + 1)?);
                    }
                    Value::Map(m)
                }
            })
        }
        go(j, 0)
    }

    /// To JSON (bytes as `{"$bytes": "<base64>"}`, non-finite floats as null).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Int(i) => serde_json::Value::from(*i),
            Value::Float(f) => {
                serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, serde_json::Value::Number)
            }
            Value::Str(s) => serde_json::Value::String(s.clone()),
            Value::Bytes(b) => {
                let mut o = serde_json::Map::new();
                o.insert("$bytes".into(), base64::engine::general_purpose::STANDARD.encode(b).into());
                serde_json::Value::Object(o)
            }
            Value::List(l) => serde_json::Value::Array(l.iter().map(Value::to_json).collect()),
            Value::Map(m) => {
                serde_json::Value::Object(m.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
            }
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "string",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "list",
            Value::Map(_) => "map",
        }
    }
}

/// Reads a postcard varint (LEB128, at most 10 bytes).
fn varint(b: &[u8], pos: &mut usize) -> Result<u64, ValueError> {
    let mut v = 0u64;
    for shift in (0..70).step_by(7) {
        let byte = *b.get(*pos).ok_or_else(|| ValueError::Malformed("truncated varint".into()))?;
        *pos += 1;
        if shift == 63 && byte > 1 {
            return Err(ValueError::Malformed("varint overflow".into()));
        }
        v |= ((byte & 0x7f) as u64) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(ValueError::Malformed("varint too long".into()))
}

fn skip(b: &[u8], pos: &mut usize, n: u64) -> Result<(), ValueError> {
    let end = (*pos as u64).checked_add(n).filter(|&e| e <= b.len() as u64);
    match end {
        Some(e) => {
            *pos = e as usize;
            Ok(())
        }
        None => Err(ValueError::Malformed("length past the end".into())),
    }
}

/// Checks structure and depth of an encoded value without recursion.
fn scan(b: &[u8]) -> Result<(), ValueError> {
    // Each frame: values still to read at that level, and whether it is a map (key before value).
    struct Frame {
        left: u64,
        map: bool,
    }
    let mut pos = 0;
    let mut stack = vec![Frame { left: 1, map: false }];
    while let Some(top) = stack.last_mut() {
        if top.left == 0 {
            stack.pop();
            continue;
        }
        top.left -= 1;
        if top.map {
            let klen = varint(b, &mut pos)?;
            let start = pos;
            skip(b, &mut pos, klen)?;
            std::str::from_utf8(&b[start..pos])
                .map_err(|_| ValueError::Malformed("map key is not UTF-8".into()))?;
        }
        match varint(b, &mut pos)? {
            TAG_NULL => {}
            TAG_BOOL => skip(b, &mut pos, 1)?,
            TAG_INT => {
                varint(b, &mut pos)?;
            }
            TAG_FLOAT => skip(b, &mut pos, 8)?,
            TAG_STR | TAG_BYTES => {
                let n = varint(b, &mut pos)?;
                skip(b, &mut pos, n)?;
            }
            tag @ (TAG_LIST | TAG_MAP) => {
                let n = varint(b, &mut pos)?;
                // Every item takes at least one byte: a count beyond the input is a lie.
                if n > (b.len() - pos) as u64 {
                    return Err(ValueError::Malformed("container count past the end".into()));
                }
                if stack.len() > VALUE_DEPTH_MAX {
                    return Err(ValueError::TooDeep);
                }
                stack.push(Frame { left: n, map: tag == TAG_MAP });
            }
            t => return Err(ValueError::Malformed(format!("unknown value tag {t}"))),
        }
    }
    if pos != b.len() {
        return Err(ValueError::Malformed("trailing bytes".into()));
    }
    Ok(())
}

/// One step of a path into a document: a map key or a list index (negative counts from the end).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathSeg {
    Key(String),
    Index(i64),
}

impl From<&str> for PathSeg {
    fn from(s: &str) -> Self {
        PathSeg::Key(s.to_string())
    }
}
impl From<i64> for PathSeg {
    fn from(i: i64) -> Self {
        PathSeg::Index(i)
    }
}

/// A partial update at a path inside a stored document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Update {
    /// Sets the value at the path (creating the last map key if missing).
    Set(Value),
    /// Adds a number to the int or float at the path (a missing map key counts as 0).
    Increment(Value),
    /// Appends to the list at the path (a missing map key becomes a one-item list).
    Append(Value),
    /// Removes the map key or list item at the path.
    Remove,
}

fn path_string(path: &[PathSeg]) -> String {
    let mut s = String::new();
    for p in path {
        match p {
            PathSeg::Key(k) => s.push_str(&format!("[{k:?}]")),
            PathSeg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    if s.is_empty() { "[]".into() } else { s }
}

fn index(len: usize, i: i64) -> Option<usize> {
    let i = if i < 0 { len as i64 + i } else { i };
    (0..len as i64).contains(&i).then_some(i as usize)
}

impl Value {
    /// The value at `path`, if any.
    pub fn at(&self, path: &[PathSeg]) -> Option<&Value> {
        let mut v = self;
        for p in path {
            v = match (v, p) {
                (Value::Map(m), PathSeg::Key(k)) => m.get(k)?,
                (Value::List(l), PathSeg::Index(i)) => &l[index(l.len(), *i)?],
                _ => return None,
            };
        }
        Some(v)
    }

    /// Applies `update` at `path` and returns the value now at the path (`Null` after `Remove`).
    /// On error the document is unchanged.
    pub fn update(&mut self, path: &[PathSeg], update: &Update) -> Result<Value, ValueError> {
        let err_path = || path_string(path);
        let Some((last, parents)) = path.split_last() else {
            return self.update_here(update, &err_path());
        };
        let mut parent = &mut *self;
        for (n, p) in parents.iter().enumerate() {
            let here = path_string(&path[..=n]);
            parent = match (parent, p) {
                (Value::Map(m), PathSeg::Key(k)) => m.get_mut(k).ok_or(ValueError::PathNotFound(here))?,
                (Value::List(l), PathSeg::Index(i)) => {
                    let len = l.len();
                    &mut l[index(len, *i).ok_or(ValueError::PathNotFound(here))?]
                }
                (v, _) => {
                    return Err(ValueError::Type {
                        path: here,
                        why: format!("cannot index a {}", v.type_name()),
                    });
                }
            };
        }
        match (parent, last, update) {
            (Value::Map(m), PathSeg::Key(k), Update::Remove) => {
                m.shift_remove(k).ok_or_else(|| ValueError::PathNotFound(err_path()))?;
                Ok(Value::Null)
            }
            (Value::List(l), PathSeg::Index(i), Update::Remove) => {
                let at = index(l.len(), *i).ok_or_else(|| ValueError::PathNotFound(err_path()))?;
                l.remove(at);
                Ok(Value::Null)
            }
            (Value::Map(m), PathSeg::Key(k), u) => match m.get_mut(k) {
                Some(v) => v.update_here(u, &err_path()),
                None => {
                    let new = match u {
                        Update::Set(v) => v.clone(),
                        Update::Increment(d) => Value::Null.incremented(d, &err_path())?,
                        Update::Append(v) => Value::List(vec![v.clone()]),
                        Update::Remove => unreachable!("handled above"),
                    };
                    m.insert(k.clone(), new.clone());
                    Ok(new)
                }
            },
            (Value::List(l), PathSeg::Index(i), u) => {
                let len = l.len();
                let at = index(len, *i).ok_or_else(|| ValueError::PathNotFound(err_path()))?;
                l[at].update_here(u, &err_path())
            }
            (v, _, _) => {
                Err(ValueError::Type { path: err_path(), why: format!("cannot index a {}", v.type_name()) })
            }
        }
    }

    fn update_here(&mut self, update: &Update, path: &str) -> Result<Value, ValueError> {
        match update {
            Update::Set(v) => *self = v.clone(),
            Update::Increment(d) => *self = self.incremented(d, path)?,
            Update::Append(v) => match self {
                Value::List(l) => l.push(v.clone()),
                other => {
                    return Err(ValueError::Type {
                        path: path.into(),
                        why: format!("append to a {}", other.type_name()),
                    });
                }
            },
            Update::Remove => *self = Value::Null,
        }
        Ok(self.clone())
    }

    fn incremented(&self, by: &Value, path: &str) -> Result<Value, ValueError> {
        let bad = |why: String| ValueError::Type { path: path.into(), why };
        Ok(match (self, by) {
            (Value::Null, Value::Int(d)) => Value::Int(*d),
            (Value::Null, Value::Float(d)) => Value::Float(*d),
            (Value::Int(a), Value::Int(d)) => {
                Value::Int(a.checked_add(*d).ok_or_else(|| bad("integer overflow".into()))?)
            }
            (Value::Int(a), Value::Float(d)) => Value::Float(*a as f64 + d),
            (Value::Float(a), Value::Int(d)) => Value::Float(a + *d as f64),
            (Value::Float(a), Value::Float(d)) => Value::Float(a + d),
            (a, d) => return Err(bad(format!("increment a {} by a {}", a.type_name(), d.type_name()))),
        })
    }
}

/// Plain Rust values as `Value`s (appending `feed.append(42)`, `feed.append("x")`).
macro_rules! value_from {
    ($($t:ty => $v:ident $(as $as:ty)?),*) => {$(
        impl From<$t> for Value {
            fn from(x: $t) -> Value {
                Value::$v((x $(as $as)?).into())
            }
        }
    )*};
}
value_from!(i64 => Int, i32 => Int as i64, u32 => Int as i64, bool => Bool, f64 => Float, String => Str, &str => Str);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn encode_decode_roundtrip_keeps_order_and_bytes() {
        let v =
            Value::from_json(&json!({"z": 1, "a": [true, null, 2.5, "s"], "m": {"$bytes": "AAEC"}})).unwrap();
        let back = Value::decode(&v.encode().unwrap()).unwrap();
        assert_eq!(back, v);
        let keys: Vec<_> = match &back {
            Value::Map(m) => m.keys().cloned().collect(),
            _ => unreachable!(),
        };
        assert_eq!(keys, ["z", "a", "m"]);
        assert_eq!(back.at(&["m".into()]), Some(&Value::Bytes(vec![0, 1, 2])));
        assert_eq!(back.to_json(), json!({"z": 1, "a": [true, null, 2.5, "s"], "m": {"$bytes": "AAEC"}}));
    }

    #[test]
    fn typed_roundtrip() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct User {
            name: String,
            visits: u32,
            tags: Vec<String>,
        }
        let u = User { name: "bob".into(), visits: 3, tags: vec!["a".into()] };
        let v = Value::from_serde(&u).unwrap();
        assert_eq!(v.to_serde::<User>().unwrap(), u);
        assert!(Value::from_serde(&u64::MAX).is_err());
    }

    #[test]
    fn depth_limit_at_and_past() {
        let mut v = Value::Int(1);
        for _ in 0..VALUE_DEPTH_MAX {
            v = Value::List(vec![v]);
        }
        let bytes = v.encode().unwrap();
        assert_eq!(Value::decode(&bytes).unwrap(), v);
        let deeper = Value::List(vec![v]);
        assert_eq!(deeper.encode(), Err(ValueError::TooDeep));
        // The same through plain postcard (as inside a network message): refused, no overflow.
        let mut raw = Vec::new();
        for _ in 0..100_000 {
            raw.extend_from_slice(&[TAG_LIST as u8, 1]);
        }
        raw.push(TAG_NULL as u8);
        assert!(postcard::from_bytes::<Value>(&raw).is_err());
        // A hand-made encoding nested far too deep is refused before postcard recurses.
        let mut evil = vec![VALUE_FORMAT_VERSION];
        for _ in 0..100_000 {
            evil.extend_from_slice(&[TAG_LIST as u8, 1]);
        }
        evil.push(TAG_NULL as u8);
        assert_eq!(Value::decode(&evil), Err(ValueError::TooDeep));
    }

    #[test]
    fn size_limit_at_and_one_past() {
        // A Bytes value encodes as version + tag + length varint (4 bytes here) + payload.
        let at = VALUE_ENCODED_BYTES_MAX - 6;
        let v = Value::Bytes(vec![7; at]);
        assert_eq!(v.encode().unwrap().len(), VALUE_ENCODED_BYTES_MAX);
        let over = Value::Bytes(vec![7; at + 1]);
        assert!(matches!(over.encode(), Err(ValueError::TooLarge { .. })));
    }

    fn arb_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            (-1e12f64..1e12).prop_map(Value::Float),
            "\\PC{0,12}".prop_map(Value::Str),
            prop::collection::vec(any::<u8>(), 0..16).prop_map(Value::Bytes),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::List),
                prop::collection::vec(("[a-z]{1,6}", inner), 0..6)
                    .prop_map(|kv| Value::Map(kv.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn stored_and_json_forms_roundtrip(v in arb_value()) {
            proptest::prop_assert_eq!(Value::decode(&v.encode().unwrap()).unwrap(), v.clone());
            proptest::prop_assert_eq!(Value::from_json(&v.to_json()).unwrap(), v);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = Value::decode(&bytes);
        }
    }

    #[test]
    fn a_small_message_cannot_expand_past_the_node_budget() {
        // A list of 5M nulls is 10 MB of postcard but ~200 MB in memory: refused.
        let n = VALUE_NODES_MAX as usize + 1;
        let mut raw = vec![TAG_LIST as u8];
        let mut len = n as u64;
        while len >= 0x80 {
            raw.push((len as u8) | 0x80);
            len >>= 7;
        }
        raw.push(len as u8);
        raw.resize(raw.len() + n, TAG_NULL as u8);
        let r = with_node_budget(|| postcard::from_bytes::<Value>(&raw));
        assert!(r.is_err());
    }

    #[test]
    fn json_form_is_natural() {
        let v = Value::from_json(&serde_json::json!({"a": [1, "x"]})).unwrap();
        assert_eq!(serde_json::to_value(&v).unwrap(), serde_json::json!({"a": [1, "x"]}));
        assert_eq!(serde_json::from_value::<Value>(serde_json::json!({"a": [1, "x"]})).unwrap(), v);
        assert_eq!(Value::from_serde(&Value::Int(1)).unwrap(), Value::Int(1));
    }

    #[test]
    fn malformed_bytes_are_errors() {
        for bad in [&[][..], &[9, 0], &[1, 9], &[1, 4, 200], &[1, 6, 255, 255, 255, 255, 15], &[1, 0, 0]] {
            assert!(Value::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn updates_at_paths() {
        let mut doc =
            Value::from_json(&json!({"visits": 1, "friends": ["a", "b"], "addr": {"city": "x"}})).unwrap();
        assert_eq!(doc.update(&["visits".into()], &Update::Increment(Value::Int(2))).unwrap(), Value::Int(3));
        doc.update(&["friends".into()], &Update::Append(Value::Str("c".into()))).unwrap();
        doc.update(&["friends".into(), PathSeg::Index(0)], &Update::Remove).unwrap();
        doc.update(&["addr".into(), "zip".into()], &Update::Set(Value::Int(12345))).unwrap();
        doc.update(&["score".into()], &Update::Increment(Value::Float(0.5))).unwrap();
        assert_eq!(
            doc.to_json(),
            json!({"visits": 3, "friends": ["b", "c"], "addr": {"city": "x", "zip": 12345}, "score": 0.5})
        );
        let before = doc.clone();
        assert!(matches!(
            doc.update(&["visits".into(), "x".into()], &Update::Remove),
            Err(ValueError::Type { .. })
        ));
        assert!(matches!(
            doc.update(&["nope".into(), "x".into()], &Update::Remove),
            Err(ValueError::PathNotFound(_))
        ));
        assert!(doc.update(&["addr".into()], &Update::Increment(Value::Int(1))).is_err());
        assert!(doc.update(&["visits".into()], &Update::Increment(Value::Int(i64::MAX))).is_err());
        assert_eq!(doc, before, "failed updates leave the document unchanged");
    }
}
