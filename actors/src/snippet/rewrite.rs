//! Collection syntax → prelude calls, on the parsed program (ruff's Python parser, the one the
//! engine itself uses), by splicing text at node ranges.
//!
//! Why a rewrite at all: Monty 0.0.x runs subscripts, `in` and `len` synchronously, so a user
//! class cannot suspend there to read the grid. Calls can. A name is a collection when a table
//! of that name exists and the program binds the name nowhere (no assignment, parameter, loop
//! or comprehension target, import, `def`, `class`, `except ... as`, `global`); `key` and `args`
//! are snippet variables and never collections. For a collection `c`:
//!
//! | source | becomes |
//! |---|---|
//! | `c[k]` | `_hg_get('c', k)` |
//! | `c[k] = v` | `_hg_set('c', k, v)` |
//! | `c[k] op= v` | `_hg_aug('c', k, 'op', v)` (k and v evaluated once) |
//! | `del c[k]` | `_hg_del('c', k)` |
//! | `k in c`, `k not in c` | `_hg_has('c', k)`, `(not _hg_has('c', k))` |
//! | `len(c)` | `_hg_len('c')` |
//! | any other use of `c` (`c.get(k)`, `f(c)`) | `_hg_coll('c')`, a `_HgCollection` |
//!
//! A snippet's last statement, when it is an expression, becomes `_hg_end(expr)`; otherwise
//! `_hg_end(None)` is appended. Collection documents assigned or deleted as part of a larger
//! target (`a, c[k] = ...`, `x = c[k] = v`, `del c[k], d[j]`) are refused: one per statement.
//!
//! Line numbers are kept (no edit adds or removes a newline); `origin` maps every output byte
//! back to the source offset it came from, for error positions.

use std::collections::BTreeSet;

use ruff_python_ast::visitor::{self, Visitor};
use ruff_python_ast::{CmpOp, Expr, ExprContext, Stmt};
use ruff_text_size::Ranged;

/// A program after the rewrite.
#[derive(Debug)]
pub struct Rewritten {
    pub text: String,
    /// Output byte → source byte offset.
    pub origin: Vec<u32>,
    /// Collections the program uses.
    pub collections: BTreeSet<String>,
    /// Names the program defines at its top level (`def`, `class`, assignments).
    pub top_level: BTreeSet<String>,
    /// Every name the program reads (to tell which procedures it may call).
    pub names: BTreeSet<String>,
    /// Documents the program reads by the request's own key: `c[key]`, `c[args]` (also as the
    /// target of `op=`), with `key`/`args` never rebound. The host reads them before the start.
    pub prefetch: BTreeSet<(String, Prefetch)>,
    /// Where the first top-level statement that is not a definition is (a procedure module may
    /// only define: `def`, `class`, assignments, imports, docstrings, `pass`).
    pub top_level_code: Option<usize>,
}

/// A refusal with the source offset it is about.
#[derive(Debug, Clone, PartialEq)]
pub struct RewriteError {
    pub offset: usize,
    pub message: String,
    /// A parse error (else a construct the rewrite refuses).
    pub syntax: bool,
}

/// Which request value names a prefetched document's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Prefetch {
    Key,
    Args,
}

struct Edit {
    start: usize,
    end: usize,
    text: String,
}

struct Binder<'a> {
    bound: BTreeSet<&'a str>,
}

impl<'a> Visitor<'a> for Binder<'a> {
    fn visit_stmt(&mut self, stmt: &'a Stmt) {
        match stmt {
            Stmt::FunctionDef(f) => {
                self.bound.insert(f.name.as_str());
            }
            Stmt::ClassDef(c) => {
                self.bound.insert(c.name.as_str());
            }
            Stmt::Global(g) => self.bound.extend(g.names.iter().map(|n| n.as_str())),
            Stmt::Nonlocal(g) => self.bound.extend(g.names.iter().map(|n| n.as_str())),
            _ => {}
        }
        visitor::walk_stmt(self, stmt);
    }

    fn visit_expr(&mut self, expr: &'a Expr) {
        if let Expr::Name(n) = expr
            && !matches!(n.ctx, ExprContext::Load)
        {
            self.bound.insert(n.id.as_str());
        }
        visitor::walk_expr(self, expr);
    }

    fn visit_parameter(&mut self, p: &'a ruff_python_ast::Parameter) {
        self.bound.insert(p.name.as_str());
        visitor::walk_parameter(self, p);
    }

    fn visit_alias(&mut self, a: &'a ruff_python_ast::Alias) {
        let n = a.asname.as_ref().unwrap_or(&a.name).as_str();
        self.bound.insert(n.split('.').next().unwrap_or(n));
    }

    fn visit_except_handler(&mut self, h: &'a ruff_python_ast::ExceptHandler) {
        let ruff_python_ast::ExceptHandler::ExceptHandler(x) = h;
        if let Some(n) = &x.name {
            self.bound.insert(n.as_str());
        }
        visitor::walk_except_handler(self, h);
    }
}

struct Rewriter<'a> {
    colls: BTreeSet<&'a str>,
    edits: Vec<Edit>,
    used: BTreeSet<String>,
    names: BTreeSet<String>,
    error: Option<RewriteError>,
    /// Which of `key` and `args` the program never rebinds.
    stable: (bool, bool),
    prefetch: BTreeSet<(String, Prefetch)>,
}

impl<'a> Rewriter<'a> {
    fn coll_of(&self, e: &Expr) -> Option<&'a str> {
        match e {
            Expr::Name(n) => self.colls.get(n.id.as_str()).copied(),
            _ => None,
        }
    }

    fn edit(&mut self, start: usize, end: usize, text: impl Into<String>) {
        self.edits.push(Edit { start, end, text: text.into() });
    }

    fn refuse(&mut self, at: usize, message: &str) {
        if self.error.is_none() {
            self.error = Some(RewriteError { offset: at, message: message.into(), syntax: false });
        }
    }

    /// A subscript of a collection, if `e` is one: (collection, slice).
    fn coll_subscript<'e>(&self, e: &'e Expr) -> Option<(&'a str, &'e Expr)> {
        match e {
            Expr::Subscript(s) => self.coll_of(&s.value).map(|c| (c, &*s.slice)),
            _ => None,
        }
    }

    /// Notes a read of `c[slice]` when the slice is the request's `key` or `args`.
    fn note_read(&mut self, c: &str, slice: &Expr) {
        if let Expr::Name(n) = slice {
            let which = match n.id.as_str() {
                "key" if self.stable.0 => Prefetch::Key,
                "args" if self.stable.1 => Prefetch::Args,
                _ => return,
            };
            self.prefetch.insert((c.to_string(), which));
        }
    }

    fn contains_coll_target(&self, e: &Expr) -> bool {
        match e {
            Expr::Tuple(t) => t.elts.iter().any(|x| self.contains_coll_target(x)),
            Expr::List(t) => t.elts.iter().any(|x| self.contains_coll_target(x)),
            Expr::Starred(s) => self.contains_coll_target(&s.value),
            e => self.coll_subscript(e).is_some(),
        }
    }
}

fn q(c: &str) -> String {
    format!("'{c}'")
}

impl<'a> Visitor<'a> for Rewriter<'a> {
    fn visit_stmt(&mut self, stmt: &'a Stmt) {
        match stmt {
            Stmt::Assign(a) if a.targets.iter().any(|t| self.contains_coll_target(t)) => {
                let [t] = a.targets.as_slice() else {
                    return self.refuse(
                        stmt.start().to_usize(),
                        "assign a collection document in a statement of its own (`c[k] = v`)",
                    );
                };
                let Some((c, slice)) = self.coll_subscript(t) else {
                    return self.refuse(
                        t.start().to_usize(),
                        "assign collection documents one at a time (`c[k] = v`)",
                    );
                };
                self.used.insert(c.to_string());
                self.edit(t.start().to_usize(), slice.start().to_usize(), format!("_hg_set({}, ", q(c)));
                self.edit(slice.end().to_usize(), a.value.start().to_usize(), ", ");
                self.edit(a.value.end().to_usize(), a.value.end().to_usize(), ")");
                self.visit_expr(slice);
                self.visit_expr(&a.value);
            }
            Stmt::AugAssign(a) if self.coll_subscript(&a.target).is_some() => {
                let (c, slice) = self.coll_subscript(&a.target).expect("checked");
                self.used.insert(c.to_string());
                self.note_read(c, slice);
                let t = &a.target;
                self.edit(t.start().to_usize(), slice.start().to_usize(), format!("_hg_aug({}, ", q(c)));
                self.edit(
                    slice.end().to_usize(),
                    a.value.start().to_usize(),
                    format!(", '{}', ", a.op.as_str()),
                );
                self.edit(a.value.end().to_usize(), a.value.end().to_usize(), ")");
                self.visit_expr(slice);
                self.visit_expr(&a.value);
            }
            Stmt::AnnAssign(a) if self.contains_coll_target(&a.target) => self.refuse(
                stmt.start().to_usize(),
                "an annotated assignment cannot store a collection document",
            ),
            Stmt::For(f) if self.contains_coll_target(&f.target) => {
                self.refuse(f.target.start().to_usize(), "a loop target cannot be a collection document")
            }
            Stmt::Delete(d) if d.targets.iter().any(|t| self.contains_coll_target(t)) => {
                let [t] = d.targets.as_slice() else {
                    return self.refuse(stmt.start().to_usize(), "delete one collection document per `del`");
                };
                let Some((c, slice)) = self.coll_subscript(t) else {
                    return self.refuse(t.start().to_usize(), "delete one collection document per `del`");
                };
                self.used.insert(c.to_string());
                self.edit(stmt.start().to_usize(), slice.start().to_usize(), format!("_hg_del({}, ", q(c)));
                self.edit(slice.end().to_usize(), t.end().to_usize(), ")");
                self.visit_expr(slice);
            }
            _ => visitor::walk_stmt(self, stmt),
        }
    }

    fn visit_expr(&mut self, expr: &'a Expr) {
        match expr {
            // A feed's `top`/`bottom`: one host call for the container.
            Expr::Attribute(at)
                if matches!(at.ctx, ExprContext::Load)
                    && matches!(at.attr.as_str(), "top" | "bottom")
                    && self.coll_of(&at.value).is_some() =>
            {
                let c = self.coll_of(&at.value).expect("checked");
                self.used.insert(c.to_string());
                self.edit(
                    expr.start().to_usize(),
                    expr.end().to_usize(),
                    format!("_hg_fattr({}, {})", q(c), q(at.attr.as_str())),
                );
            }
            Expr::Name(n) if matches!(n.ctx, ExprContext::Load) => {
                self.names.insert(n.id.to_string());
                if let Some(c) = self.coll_of(expr) {
                    self.used.insert(c.to_string());
                    self.edit(expr.start().to_usize(), expr.end().to_usize(), format!("_hg_coll({})", q(c)));
                }
            }
            Expr::Subscript(s) if self.coll_of(&s.value).is_some() => {
                let c = self.coll_of(&s.value).expect("checked");
                if !matches!(s.ctx, ExprContext::Load) {
                    return self.refuse(
                        expr.start().to_usize(),
                        "a collection document can only be stored by `c[k] = v` and deleted by `del c[k]`",
                    );
                }
                self.used.insert(c.to_string());
                self.note_read(c, &s.slice);
                self.edit(expr.start().to_usize(), s.slice.start().to_usize(), format!("_hg_get({}, ", q(c)));
                self.edit(s.slice.end().to_usize(), expr.end().to_usize(), ")");
                self.visit_expr(&s.slice);
            }
            Expr::Compare(cmp)
                if cmp.comparators.iter().any(|x| self.coll_of(x).is_some())
                    && cmp.ops.iter().any(|o| matches!(o, CmpOp::In | CmpOp::NotIn)) =>
            {
                let ([op], [right]) = (&*cmp.ops, &*cmp.comparators) else {
                    return self.refuse(
                        expr.start().to_usize(),
                        "`in` a collection cannot be chained with other comparisons",
                    );
                };
                let Some(c) = self.coll_of(right) else {
                    return self.refuse(
                        expr.start().to_usize(),
                        "`in` a collection cannot be chained with other comparisons",
                    );
                };
                if !matches!(op, CmpOp::In | CmpOp::NotIn) {
                    return visitor::walk_expr(self, expr);
                }
                self.used.insert(c.to_string());
                let not = if matches!(op, CmpOp::NotIn) { "(not " } else { "(" };
                self.edit(
                    cmp.left.start().to_usize(),
                    cmp.left.start().to_usize(),
                    format!("{not}_hg_has({}, ", q(c)),
                );
                self.visit_expr(&cmp.left);
                self.edit(cmp.left.end().to_usize(), expr.end().to_usize(), "))");
            }
            Expr::Call(call)
                if matches!(&*call.func, Expr::Name(f) if f.id.as_str() == "len")
                    && call.arguments.keywords.is_empty()
                    && matches!(&*call.arguments.args, [a] if self.coll_of(a).is_some()) =>
            {
                let c = self.coll_of(&call.arguments.args[0]).expect("checked");
                self.used.insert(c.to_string());
                self.edit(expr.start().to_usize(), expr.end().to_usize(), format!("_hg_len({})", q(c)));
            }
            Expr::Call(call) => {
                // `c.get(key)`, `c.setdefault(args, ...)`, ...: reads by the request's key.
                if let Expr::Attribute(a) = &*call.func
                    && let Some(c) = self.coll_of(&a.value)
                    && matches!(a.attr.as_str(), "get" | "setdefault" | "pop" | "delete")
                    && let Some(first) = call.arguments.args.first()
                {
                    self.note_read(c, first);
                }
                visitor::walk_expr(self, expr)
            }
            _ => visitor::walk_expr(self, expr),
        }
    }
}

/// Rewrites `src`. `collections`: the tables that exist. `snippet`: wrap the last statement
/// for the answer (a procedure module is rewritten without that).
pub fn rewrite(src: &str, collections: &BTreeSet<String>, snippet: bool) -> Result<Rewritten, RewriteError> {
    let parsed = ruff_python_parser::parse_module(src).map_err(|e| RewriteError {
        offset: e.location.start().to_usize(),
        message: e.error.to_string(),
        syntax: true,
    })?;
    let body = &parsed.syntax().body;
    let mut binder = Binder { bound: BTreeSet::new() };
    binder.visit_body(body);
    let reserved = ["key", "args"];
    let colls: BTreeSet<&str> = collections
        .iter()
        .map(String::as_str)
        .filter(|c| !binder.bound.contains(c) && !reserved.contains(c))
        .collect();
    let mut top_level = BTreeSet::new();
    for s in body {
        match s {
            Stmt::FunctionDef(f) => {
                top_level.insert(f.name.to_string());
            }
            Stmt::ClassDef(c) => {
                top_level.insert(c.name.to_string());
            }
            Stmt::Assign(a) => {
                for t in &a.targets {
                    if let Expr::Name(n) = t {
                        top_level.insert(n.id.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    let top_level_code = body
        .iter()
        .find(|s| {
            !matches!(
                s,
                Stmt::FunctionDef(_)
                    | Stmt::ClassDef(_)
                    | Stmt::Assign(_)
                    | Stmt::AnnAssign(_)
                    | Stmt::Import(_)
                    | Stmt::ImportFrom(_)
                    | Stmt::Pass(_)
            ) && !matches!(s, Stmt::Expr(e) if e.value.is_string_literal_expr())
        })
        .map(|s| s.start().to_usize());
    let stable = (!binder.bound.contains("key"), !binder.bound.contains("args"));
    let mut rw = Rewriter {
        colls,
        edits: Vec::new(),
        used: BTreeSet::new(),
        names: BTreeSet::new(),
        error: None,
        stable,
        prefetch: BTreeSet::new(),
    };
    let last_expr = match body.last() {
        Some(Stmt::Expr(e)) if snippet => Some((e.value.start().to_usize(), e.value.end().to_usize())),
        _ => None,
    };
    if let Some((s, _)) = last_expr {
        rw.edit(s, s, "_hg_end(");
    }
    rw.visit_body(body);
    if let Some(e) = rw.error {
        return Err(e);
    }
    if let Some((_, e)) = last_expr {
        rw.edit(e, e, ")");
    }
    // Stable: at one offset, insertions keep the order they were made in (outer first).
    let mut edits = rw.edits;
    edits.sort_by_key(|e| (e.start, e.end > e.start));
    let mut text = String::with_capacity(src.len() + 64 * edits.len() + 16);
    let mut origin = Vec::with_capacity(text.capacity());
    let mut at = 0usize;
    let copy = |text: &mut String, origin: &mut Vec<u32>, from: usize, to: usize| {
        text.push_str(&src[from..to]);
        origin.extend((from..to).map(|o| o as u32));
    };
    for e in &edits {
        if e.start < at {
            // Overlapping edits would mean a node handled twice: refuse rather than garble.
            return Err(RewriteError {
                offset: e.start,
                message: "this expression cannot be rewritten".into(),
                syntax: false,
            });
        }
        copy(&mut text, &mut origin, at, e.start);
        text.push_str(&e.text);
        origin.extend(std::iter::repeat_n(e.start as u32, e.text.len()));
        at = e.end;
    }
    copy(&mut text, &mut origin, at, src.len());
    if snippet && last_expr.is_none() {
        let tail = "\n_hg_end(None)\n";
        text.push_str(tail);
        origin.extend(std::iter::repeat_n(src.len() as u32, tail.len()));
    }
    Ok(Rewritten {
        text,
        origin,
        collections: rw.used,
        top_level,
        names: rw.names,
        top_level_code,
        prefetch: rw.prefetch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(src: &str) -> String {
        let colls: BTreeSet<String> = ["users", "t"].iter().map(|s| s.to_string()).collect();
        rewrite(src, &colls, true).map(|r| r.text).unwrap_or_else(|e| format!("ERR {}", e.message))
    }

    #[test]
    fn collection_forms() {
        assert_eq!(rw("users['bob']"), "_hg_end(_hg_get('users', 'bob'))");
        assert_eq!(rw("users['bob']['n'] += 1"), "_hg_get('users', 'bob')['n'] += 1\n_hg_end(None)\n");
        assert_eq!(rw("users[k] = v"), "_hg_set('users', k, v)\n_hg_end(None)\n");
        assert_eq!(rw("users[k] += 2"), "_hg_aug('users', k, '+', 2)\n_hg_end(None)\n");
        assert_eq!(rw("del users[t[1]]"), "_hg_del('users', _hg_get('t', 1))\n_hg_end(None)\n");
        assert_eq!(rw("'a' in users"), "_hg_end((_hg_has('users', 'a')))");
        assert_eq!(rw("x = 'a' not in users"), "x = (not _hg_has('users', 'a'))\n_hg_end(None)\n");
        assert_eq!(rw("len(users)"), "_hg_end(_hg_len('users'))");
        assert_eq!(rw("users.get(1)"), "_hg_end(_hg_coll('users').get(1))");
        assert_eq!(rw("users[users['a']['b']]"), "_hg_end(_hg_get('users', _hg_get('users', 'a')['b']))");
    }

    #[test]
    fn bound_names_are_not_collections() {
        assert_eq!(rw("users = [1]\nusers[0]"), "users = [1]\n_hg_end(users[0])");
        assert_eq!(rw("def f(t):\n    return t[0]\nf([3])"), "def f(t):\n    return t[0]\n_hg_end(f([3]))");
    }

    #[test]
    fn reads_by_the_request_key_are_prefetched() {
        let colls: BTreeSet<String> = ["users"].iter().map(|s| s.to_string()).collect();
        let p = |src: &str| rewrite(src, &colls, true).unwrap().prefetch.into_iter().collect::<Vec<_>>();
        assert_eq!(p("users[key]['n'] += 1"), [("users".to_string(), Prefetch::Key)]);
        assert_eq!(p("users[args] += 1"), [("users".to_string(), Prefetch::Args)]);
        assert!(p("users[key + 'x']").is_empty());
        assert_eq!(p("users.get(key, 0) + 1"), [("users".to_string(), Prefetch::Key)]);
        assert!(p("key = 'b'\nusers[key]").is_empty(), "a rebound key is not the request's");
    }

    #[test]
    fn refusals() {
        assert!(rw("a, users[1] = 1, 2").starts_with("ERR"));
        assert!(rw("x = users[1] = 2").starts_with("ERR"));
        assert!(rw("del users[1], users[2]").starts_with("ERR"));
        assert!(rw("for users[1] in []: pass").starts_with("ERR"));
        assert!(rw("1 in users in users").starts_with("ERR"));
        assert!(rw("users[").starts_with("ERR"));
    }

    #[test]
    fn origin_maps_back() {
        let colls: BTreeSet<String> = ["users"].iter().map(|s| s.to_string()).collect();
        let src = "x = 1\ny = users[x] + z";
        let r = rewrite(src, &colls, true).unwrap();
        assert_eq!(r.origin.len(), r.text.len());
        let z = r.text.find('z').unwrap();
        assert_eq!(r.origin[z] as usize, src.find('z').unwrap());
    }
}
