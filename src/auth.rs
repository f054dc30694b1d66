//! Tokens and per-collection permissions. A token grants, per collection-name pattern, a set of
//! permissions: `read`, `write`, `eval`, `admin` (admin implies the other three and allows
//! creating and dropping). Patterns: `*` (every collection), `name` (exact), `prefix*`.
//!
//! With no token configured the server runs in trusted mode: every connection may do everything,
//! and the server refuses to listen on anything but loopback.
//!
//! Invariant: tokens are compared in constant time.

use std::collections::BTreeMap;

use heapgrid_actors::GridError;
use serde::{Deserialize, Serialize};

/// One permission.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    Read,
    Write,
    Eval,
    Admin,
}

impl Permission {
    fn bit(self) -> u8 {
        match self {
            Permission::Read => 1,
            Permission::Write => 2,
            Permission::Eval => 4,
            Permission::Admin => 8 | 4 | 2 | 1,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Write => "write",
            Permission::Eval => "eval",
            Permission::Admin => "admin",
        }
    }
}

/// A token and what it may do, as written in the server's config file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenConfig {
    pub token: String,
    /// Collection pattern -> permissions.
    pub permissions: BTreeMap<String, Vec<Permission>>,
}

/// What one connection may do.
#[derive(Clone, Debug)]
pub struct Principal {
    /// (pattern, permission bits); empty patterns list with `all` = trusted.
    rules: Vec<(String, u8)>,
    all: bool,
}

fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

impl Principal {
    /// Everything allowed (trusted mode).
    pub fn trusted() -> Self {
        Principal { rules: Vec::new(), all: true }
    }

    pub fn allows(&self, collection: &str, p: Permission) -> bool {
        if self.all {
            return true;
        }
        let bits =
            self.rules.iter().filter(|(pat, _)| matches(pat, collection)).fold(0, |acc, (_, b)| acc | b);
        bits & p.bit() == p.bit()
    }

    /// `Ok` if allowed, else `PermissionDenied`.
    pub fn require(&self, collection: &str, p: Permission) -> Result<(), GridError> {
        if self.allows(collection, p) {
            Ok(())
        } else {
            Err(GridError::PermissionDenied { collection: collection.into(), permission: p.name().into() })
        }
    }
}

/// The configured tokens.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    tokens: Vec<(String, Principal)>,
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    pub fn new(tokens: &[TokenConfig]) -> Self {
        let tokens = tokens
            .iter()
            .map(|t| {
                let rules = t
                    .permissions
                    .iter()
                    .map(|(pat, ps)| (pat.clone(), ps.iter().fold(0u8, |acc, p| acc | p.bit())))
                    .collect();
                (t.token.clone(), Principal { rules, all: false })
            })
            .collect();
        Auth { tokens }
    }

    /// True when no token is configured.
    pub fn is_trusted(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The principal for a connection's token.
    pub fn login(&self, token: Option<&str>) -> Result<Principal, GridError> {
        if self.is_trusted() {
            return Ok(Principal::trusted());
        }
        let Some(token) = token else {
            return Err(GridError::Unauthenticated("this server requires a token".into()));
        };
        // Compare against every token so timing does not reveal which one nearly matched.
        let mut found = None;
        for (t, p) in &self.tokens {
            if ct_eq(t.as_bytes(), token.as_bytes()) {
                found = Some(p.clone());
            }
        }
        found.ok_or_else(|| GridError::Unauthenticated("unknown token".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_and_admin() {
        let cfg = TokenConfig {
            token: "t1".into(),
            permissions: BTreeMap::from([
                ("users".into(), vec![Permission::Read, Permission::Write]),
                ("log*".into(), vec![Permission::Read]),
                ("ops".into(), vec![Permission::Admin]),
            ]),
        };
        let auth = Auth::new(&[cfg]);
        assert!(!auth.is_trusted());
        let p = auth.login(Some("t1")).unwrap();
        assert!(p.allows("users", Permission::Write));
        assert!(!p.allows("users", Permission::Admin));
        assert!(p.allows("logs", Permission::Read) && !p.allows("logs", Permission::Write));
        assert!(p.allows("ops", Permission::Eval), "admin implies eval");
        assert!(!p.allows("other", Permission::Read));
        assert!(matches!(p.require("other", Permission::Read), Err(GridError::PermissionDenied { .. })));
        assert!(auth.login(Some("t2")).is_err());
        assert!(auth.login(None).is_err());
        assert!(Auth::default().login(None).unwrap().allows("x", Permission::Admin));
    }
}
