//! The Starlark side of snippets: the `collection` type behind every collection global, and the
//! builtins the source rewrites call (`__del__` for `del`, `__mul__` for `*` and `*=`).
//!
//! A `Collection` value is frozen into the environment and only carries its name; every
//! operation goes to the current run's session (`session::with`).

use allocative::Allocative;
use starlark::environment::{GlobalsBuilder, Methods, MethodsBuilder};
use starlark::starlark_module;
use starlark::starlark_simple_value;
use starlark::values::dict::DictMut;
use starlark::values::list::ListRef;
use starlark::values::none::NoneType;
use starlark::values::tuple::TupleRef;
use starlark::values::{
    Heap, NoSerialize, ProvidesStaticType, StarlarkPagable, StarlarkValue, UnpackValue, Value, ValueLike,
    starlark_value,
};

use super::session::{self, ScanQuery, stop, value_error};
use super::{Budget, SnippetErrorKind};
use crate::key::Key;

/// A collection global (`users`): a name; its data lives in the grid.
#[derive(Debug, ProvidesStaticType, NoSerialize, StarlarkPagable, Allocative)]
pub(crate) struct Collection {
    pub name: String,
}

starlark_simple_value!(Collection);

impl std::fmt::Display for Collection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<collection {}>", self.name)
    }
}

/// A table key from a Starlark value: an int or a string.
pub(crate) fn key_of(v: Value) -> starlark::Result<Key> {
    if let Some(s) = v.unpack_str() {
        return Ok(Key::Str(s.to_string()));
    }
    if let Ok(Some(i)) = i64::unpack_value(v) {
        return Ok(Key::Int(i));
    }
    Err(stop(SnippetErrorKind::Type, format!("a collection key is an int or a string, not {}", v.get_type())))
}

fn missing(coll: &str, key: &Key) -> starlark::Error {
    value_error(format!("key {key} not found in {coll}"))
}

#[starlark_value(type = "collection")]
impl<'v> StarlarkValue<'v> for Collection {
    fn at(&self, index: Value<'v>, heap: Heap<'v>) -> starlark::Result<Value<'v>> {
        let key = key_of(index)?;
        session::with(|s| s.get(&self.name, key.clone(), heap))?.ok_or_else(|| missing(&self.name, &key))
    }

    fn set_at(&self, index: Value<'v>, new_value: Value<'v>) -> starlark::Result<()> {
        let key = key_of(index)?;
        session::with(|s| s.set(&self.name, key, new_value))
    }

    fn is_in(&self, other: Value<'v>) -> starlark::Result<bool> {
        let key = key_of(other)?;
        session::with(|s| s.contains(&self.name, key))
    }

    fn length(&self) -> starlark::Result<i32> {
        let n = session::with(|s| s.count(&self.name))?;
        i32::try_from(n)
            .map_err(|_| value_error(format!("{} holds {n} keys, more than len() reports", self.name)))
    }

    fn get_methods() -> Option<&'static Methods> {
        starlark::methods_static!(RES = collection_methods);
        Some(RES.methods())
    }
}

fn this(v: Value<'_>) -> starlark::Result<&Collection> {
    v.downcast_ref::<Collection>().ok_or_else(|| value_error("not a collection"))
}

fn scan_query<'v>(
    prefix: Option<&str>,
    start: Option<Value<'v>>,
    end: Option<Value<'v>>,
    limit: i32,
    reverse: bool,
) -> starlark::Result<ScanQuery> {
    let max = crate::limits::SCAN_LIMIT_MAX as i32;
    if !(0..=max).contains(&limit) {
        return Err(value_error(format!("scan limit {limit} is outside 0..={max}")));
    }
    Ok(ScanQuery {
        prefix: prefix.map(str::to_string),
        start: start.filter(|v| !v.is_none()).map(key_of).transpose()?,
        end: end.filter(|v| !v.is_none()).map(key_of).transpose()?,
        limit: limit as u32,
        reverse,
    })
}

/// The entries `scan` and `keys` list.
fn scan_entries<'v>(
    this: Value<'v>,
    prefix: Option<&str>,
    start: Option<Value<'v>>,
    end: Option<Value<'v>>,
    limit: i32,
    reverse: bool,
    heap: Heap<'v>,
) -> starlark::Result<Vec<(Key, Value<'v>)>> {
    let c = self::this(this)?;
    let q = scan_query(prefix, start, end, limit, reverse)?;
    session::with(|s| s.scan(&c.name, &q, heap))
}

fn key_value<'v>(k: &Key, heap: Heap<'v>) -> Value<'v> {
    match k {
        Key::Int(i) => heap.alloc(*i),
        Key::Str(s) => heap.alloc(s.as_str()),
    }
}

#[starlark_module]
fn collection_methods(builder: &mut MethodsBuilder) {
    /// `t.get(k, default=None)`.
    fn get<'v>(
        this: Value<'v>,
        key: Value<'v>,
        #[starlark(default = NoneType)] default: Value<'v>,
        heap: Heap<'v>,
    ) -> starlark::Result<Value<'v>> {
        let c = self::this(this)?;
        let key = key_of(key)?;
        Ok(session::with(|s| s.get(&c.name, key, heap))?.unwrap_or(default))
    }

    /// `t.setdefault(k, default=None)`: the stored value, storing `default` first if absent.
    fn setdefault<'v>(
        this: Value<'v>,
        key: Value<'v>,
        #[starlark(default = NoneType)] default: Value<'v>,
        heap: Heap<'v>,
    ) -> starlark::Result<Value<'v>> {
        let c = self::this(this)?;
        let key = key_of(key)?;
        session::with(|s| match s.get(&c.name, key.clone(), heap)? {
            Some(v) => Ok(v),
            None => {
                s.set(&c.name, key, default)?;
                Ok(default)
            }
        })
    }

    /// `t.pop(k[, default])`: removes and returns the value.
    fn pop<'v>(
        this: Value<'v>,
        key: Value<'v>,
        default: Option<Value<'v>>,
        heap: Heap<'v>,
    ) -> starlark::Result<Value<'v>> {
        let c = self::this(this)?;
        let key = key_of(key)?;
        session::with(|s| match s.get(&c.name, key.clone(), heap)? {
            Some(v) => {
                s.delete(&c.name, key)?;
                Ok(v)
            }
            None => default.ok_or_else(|| missing(&c.name, &key)),
        })
    }

    /// `t.delete(k)`: removes the key; whether it existed.
    fn delete<'v>(this: Value<'v>, key: Value<'v>) -> starlark::Result<bool> {
        let c = self::this(this)?;
        let key = key_of(key)?;
        session::with(|s| s.delete(&c.name, key))
    }

    /// `t.scan(prefix=None, start=None, end=None, limit=100, reverse=False)`: a list of
    /// `(key, value)` in key order; values are live documents (changes to them persist).
    fn scan<'v>(
        this: Value<'v>,
        #[starlark(require = named)] prefix: Option<&str>,
        #[starlark(require = named)] start: Option<Value<'v>>,
        #[starlark(require = named)] end: Option<Value<'v>>,
        #[starlark(require = named, default = 100)] limit: i32,
        #[starlark(require = named, default = false)] reverse: bool,
        heap: Heap<'v>,
    ) -> starlark::Result<Vec<Value<'v>>> {
        let entries = scan_entries(this, prefix, start, end, limit, reverse, heap)?;
        Ok(entries.into_iter().map(|(k, v)| heap.alloc((key_value(&k, heap), v))).collect())
    }

    /// `t.keys(prefix=None, start=None, end=None, limit=100, reverse=False)`.
    fn keys<'v>(
        this: Value<'v>,
        #[starlark(require = named)] prefix: Option<&str>,
        #[starlark(require = named)] start: Option<Value<'v>>,
        #[starlark(require = named)] end: Option<Value<'v>>,
        #[starlark(require = named, default = 100)] limit: i32,
        #[starlark(require = named, default = false)] reverse: bool,
        heap: Heap<'v>,
    ) -> starlark::Result<Vec<Value<'v>>> {
        let entries = scan_entries(this, prefix, start, end, limit, reverse, heap)?;
        Ok(entries.into_iter().map(|(k, _)| key_value(&k, heap)).collect())
    }

    /// The collection's name.
    #[starlark(attribute)]
    fn name<'v>(this: Value<'v>) -> starlark::Result<String> {
        Ok(self::this(this)?.name.clone())
    }
}

/// Bytes a repetition of `v` `n` times would take, if `v` repeats (str, list, tuple, bytes).
fn repeat_bytes(v: Value, n: i64) -> Option<u64> {
    let unit = if let Some(s) = v.unpack_str() {
        s.len() as u64
    } else if let Some(l) = ListRef::from_value(v) {
        l.len() as u64 * 8
    } else if let Some(t) = TupleRef::from_value(v) {
        t.len() as u64 * 8
    } else if let Some(b) = v.downcast_ref::<starlark::values::bytes::StarlarkBytes>() {
        b.len() as u64
    } else {
        return None;
    };
    Some(unit.saturating_mul(n.max(0) as u64))
}

#[starlark_module]
pub(crate) fn builtins(builder: &mut GlobalsBuilder) {
    /// `del x[k]`: a collection key, a dict key or a list index (KeyError/IndexError if absent).
    fn __del__<'v>(
        target: Value<'v>,
        index: Value<'v>,
        eval: &mut starlark::eval::Evaluator<'v, '_, '_>,
    ) -> starlark::Result<NoneType> {
        if let Some(c) = target.downcast_ref::<Collection>() {
            let key = key_of(index)?;
            if !session::with(|s| s.delete(&c.name, key.clone()))? {
                return Err(missing(&c.name, &key));
            }
            return Ok(NoneType);
        }
        if let Ok(mut d) = DictMut::from_value(target) {
            let h = index.get_hashed()?;
            if d.aref.remove_hashed(h).is_none() {
                return Err(value_error(format!("key {} not found in dict", index.to_repr())));
            }
            return Ok(NoneType);
        }
        if ListRef::from_value(target).is_some() {
            if index.unpack_i32().is_none() {
                return Err(stop(SnippetErrorKind::Type, "list indices must be ints"));
            }
            // `list.pop(i)`: the list's own bounds check and error.
            let pop =
                target.get_attr("pop", eval.heap())?.ok_or_else(|| value_error("list has no pop method"))?;
            eval.eval_function(pop, &[index], &[])?;
            return Ok(NoneType);
        }
        Err(stop(SnippetErrorKind::Type, format!("cannot delete an item of {}", target.get_type())))
    }

    /// `a * b`, refusing a repetition that would exceed the memory budget before it allocates.
    fn __mul__<'v>(a: Value<'v>, b: Value<'v>, heap: Heap<'v>) -> starlark::Result<Value<'v>> {
        let n = i64::unpack_value(b).ok().flatten().or_else(|| i64::unpack_value(a).ok().flatten());
        if let Some(n) = n {
            let bytes = repeat_bytes(a, n).or_else(|| repeat_bytes(b, n));
            if let Some(bytes) = bytes {
                let max = session::with(|s| Ok(s.memory_max))?;
                let used = heap.allocated_bytes() as u64;
                if used.saturating_add(bytes) > max {
                    return Err(stop(
                        SnippetErrorKind::Budget(Budget::Memory),
                        format!("repetition would allocate {bytes} bytes; the memory budget is {max}"),
                    ));
                }
            }
        }
        a.mul(b, heap)
    }
}
