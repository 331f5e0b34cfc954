//! Every Redis key name herd uses is built here, and nowhere else.
//!
//! | what | key | type |
//! |---|---|---|
//! | a session | `{prefix}:s:{<id>}` | hash: one field per session key, plus meta fields starting with `$` |
//! | sessions of one owner | `{prefix}:o:{<hex(owner)>}` | sorted set: session id → until when it is listed (unix ms; the session's TTL never runs past it) |
//! | a global variable | `{prefix}:g:{<group>}:<name>` | string (JSON, or an integer for counters); a hash for [`Group::hash`](crate::globals::Group::hash) (one JSON value per field) |
//! | a broadcast channel | `{prefix}:chan:<name>` | pub/sub channel (not a key) |
//! | a lease | `{prefix}:l:{<name>}` | string: the fencing token of the holder, with the lease's TTL |
//! | a lease's token counter | `{prefix}:l:{<name>}:fence` | string: the last token handed out (no TTL) |
//! | when `Lease::every` last ran its job | `{prefix}:l:{<name>}:last` | string: µs of Redis' clock |
//! | a fenced variable's mark | `{prefix}:f:{<group>}:<name>` | string: the highest fencing token that wrote the variable |
//! | a rate limit of one key | `{prefix}:rl:<limiter>:{<hex(key)>}` (`{h<hex(sha256(key))>}` for keys over 32 bytes) | string: GCRA's theoretical arrival time (µs of Redis' clock), expiring when it no longer matters |
//!
//! `{prefix}` is [`Config::prefix`](crate::Config::prefix) (`herd` by default); globals and channels
//! may use a prefix of their own ([`Globals::with_prefix`](crate::Globals::with_prefix)).
//!
//! The part in braces is the Redis Cluster *hash tag*: every key of one session, or of one group of
//! globals, hashes to the same slot, so the scripts and MULTI/EXEC blocks that touch them stay legal
//! on a cluster. Nothing that comes from a client reaches a key unchecked: session ids are validated
//! ([`SessionId::parse`]) after the cookie signature has been verified, owners are hex-encoded, and
//! group and variable names are restricted to a safe alphabet ([`validate_name`]).

use std::fmt;

use crate::error::{Error, Result};

/// A session id: 32 lowercase hex digits of a random (v4) UUID, 122 random bits from the OS generator.
/// Kept inline (no allocation): one is made or parsed on every request that uses its session.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SessionId([u8; 32]);

impl SessionId {
    /// A fresh id from the operating system's random generator.
    pub(crate) fn generate() -> SessionId {
        let mut id = [0u8; 32];
        uuid::Uuid::new_v4().simple().encode_lower(&mut id);
        SessionId(id)
    }

    /// Accepts exactly the format [`generate`](Self::generate) makes; anything else is refused before any
    /// key is built from it.
    pub(crate) fn parse(s: &str) -> Option<SessionId> {
        let bytes: [u8; 32] = s.as_bytes().try_into().ok()?;
        bytes
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            .then_some(SessionId(bytes))
    }

    pub(crate) fn as_str(&self) -> &str {
        // Only ASCII hex digits ever get in (`generate`, `parse`), so this never falls back.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl fmt::Debug for SessionId {
    // Ids are credentials (with the signing key); keep them out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({}…)", &self.as_str()[..4])
    }
}

/// Builds key names under one prefix.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    /// The hash holding one session.
    pub(crate) fn session(&self, id: &SessionId) -> String {
        // Built by hand: `format!` costs several times as much, on every request that uses Redis.
        let mut key = String::with_capacity(self.prefix.len() + 5 + id.as_str().len());
        key.push_str(&self.prefix);
        key.push_str(":s:{");
        key.push_str(id.as_str());
        key.push('}');
        key
    }

    /// The sorted set indexing the sessions of one owner.
    pub(crate) fn owner_index(&self, owner: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + 5 + owner.len() * 2);
        key.push_str(&self.prefix);
        key.push_str(":o:{");
        for b in owner.as_bytes() {
            key.push_str(&format!("{b:02x}"));
        }
        key.push('}');
        key
    }

    /// A global variable in a group; the group is the hash tag.
    pub(crate) fn global(&self, group: &str, name: &str) -> String {
        format!("{}:g:{{{group}}}:{name}", self.prefix)
    }

    /// The pub/sub channel of a broadcast [`Channel`](crate::globals::Channel). Channels are not
    /// keys: no hash tag (a cluster delivers `PUBLISH` to every node).
    pub(crate) fn channel(&self, name: &str) -> String {
        format!("{}:chan:{name}", self.prefix)
    }

    /// The key holding lease `name` (its holder's fencing token, with the lease's TTL).
    pub(crate) fn lease(&self, name: &str) -> String {
        format!("{}:l:{{{name}}}", self.prefix)
    }

    /// The counter of fencing tokens of lease `name`: same hash tag as [`lease`](Self::lease), so
    /// one script reads and writes both on a cluster.
    pub(crate) fn lease_fence(&self, name: &str) -> String {
        format!("{}:l:{{{name}}}:fence", self.prefix)
    }

    /// When [`Lease::every`](crate::Lease::every) last ran its job under lease `name` (same hash
    /// tag as the lease).
    pub(crate) fn lease_last_run(&self, name: &str) -> String {
        format!("{}:l:{{{name}}}:last", self.prefix)
    }

    /// The highest fencing token that wrote variable `name` of `group` (same hash tag as the
    /// variable; the `f:` namespace keeps it apart from every variable name).
    pub(crate) fn fence_mark(&self, group: &str, name: &str) -> String {
        format!("{}:f:{{{group}}}:{name}", self.prefix)
    }

    /// The state of rate limiter `limiter` for one client `key` (any bytes, hex-encoded: the key an
    /// app derives from a request never reaches Redis raw). The key is the hash tag, so clients
    /// spread over a cluster's slots.
    pub(crate) fn rate_limit(&self, limiter: &str, key: &[u8]) -> String {
        // A key longer than a SHA-256 digest (a whole header, say) is replaced by its digest, so
        // that a client cannot make herd build huge key names; digests start with `h`, which no
        // hex encoding does, so they never collide with a short key.
        let digest;
        let (mark, key) = if key.len() > 32 {
            use sha2::Digest as _;
            digest = sha2::Sha256::digest(key);
            ("h", digest.as_slice())
        } else {
            ("", key)
        };
        let mut out = String::with_capacity(self.prefix.len() + limiter.len() + 8 + key.len() * 2);
        out.push_str(&self.prefix);
        out.push_str(":rl:");
        out.push_str(limiter);
        out.push_str(":{");
        out.push_str(mark);
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for b in key {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        out.push('}');
        out
    }

    /// The prefix every name built here starts with.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// Checks a key prefix: 1–64 characters of `[A-Za-z0-9_.:-]`.
pub(crate) fn validate_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() || prefix.len() > 64 || !prefix.bytes().all(safe_byte) {
        return Err(Error::Config(format!(
            "key prefix `{prefix}` must be 1 to 64 characters of letters, digits and `_.:-`"
        )));
    }
    Ok(())
}

/// Checks a group or variable name: 1–128 characters of `[A-Za-z0-9_.:-]` (no braces, spaces, `*`).
pub(crate) fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 128 || !name.bytes().all(safe_byte) {
        return Err(Error::invalid_name(
            name,
            "names are 1 to 128 characters of letters, digits and `_.:-`",
        ));
    }
    Ok(())
}

fn safe_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':')
}

/// Checks a session key (a field name in the session hash): 1–256 bytes, not starting with the
/// reserved `$`.
pub(crate) fn validate_session_field(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 256 {
        return Err(Error::invalid_name(
            name,
            "session keys are 1 to 256 bytes long",
        ));
    }
    if name.starts_with('$') {
        return Err(Error::invalid_name(
            name,
            "session keys starting with `$` are reserved for herd",
        ));
    }
    Ok(())
}

/// Checks an owner (user id): 1–256 bytes.
pub(crate) fn validate_owner(owner: &str) -> Result<()> {
    if owner.is_empty() || owner.len() > 256 {
        return Err(Error::invalid_name(owner, "owners are 1 to 256 bytes long"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_and_are_distinct() {
        let a = SessionId::generate();
        let b = SessionId::generate();
        assert_ne!(a, b);
        assert_eq!(SessionId::parse(a.as_str()), Some(a));
    }

    #[test]
    fn hostile_ids_are_refused() {
        for bad in [
            "",
            "*",
            "{abc}",
            "0123456789abcdef0123456789abcde",   // 31
            "0123456789abcdef0123456789abcdef0", // 33
            "0123456789ABCDEF0123456789ABCDEF",  // upper case
            "0123456789abcdef0123456789abcd\r\n",
            "0123456789abcdef 123456789abcdef",
            "0123456789abcdef0123456789abcdeé",
        ] {
            assert!(SessionId::parse(bad).is_none(), "{bad:?} accepted");
        }
        assert!(SessionId::parse(&"a".repeat(5000)).is_none());
    }

    #[test]
    fn keys_share_a_hash_tag() {
        let keys = Keys::new("app");
        let id = SessionId::parse("0123456789abcdef0123456789abcdef").expect("valid");
        assert_eq!(
            keys.session(&id),
            "app:s:{0123456789abcdef0123456789abcdef}"
        );
        assert_eq!(keys.owner_index("a}{"), "app:o:{617d7b}");
        assert_eq!(keys.global("bank", "acct-1"), "app:g:{bank}:acct-1");
        assert_eq!(keys.channel("cache"), "app:chan:cache");
        assert_eq!(keys.prefix(), "app");
        assert_eq!(keys.lease("cron"), "app:l:{cron}");
        assert_eq!(keys.lease_fence("cron"), "app:l:{cron}:fence");
        assert_eq!(keys.lease_last_run("cron"), "app:l:{cron}:last");
        assert_eq!(keys.fence_mark("stats", "ticks"), "app:f:{stats}:ticks");
        assert_eq!(
            keys.rate_limit("login", b"1.2.3.4"),
            "app:rl:login:{312e322e332e34}"
        );
        assert_eq!(keys.rate_limit("login", b""), "app:rl:login:{}");
        let long = keys.rate_limit("login", &[b'x'; 33]);
        assert!(long.starts_with("app:rl:login:{h") && long.len() == "app:rl:login:{h}".len() + 64);
        assert_ne!(long, keys.rate_limit("login", &[b'x'; 34]));
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("acct-1").is_ok());
        for bad in ["", "a b", "a{b", "a}b", "a*", "x\n"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_session_field("$c").is_err());
        assert!(validate_session_field("counter").is_ok());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Only exactly 32 lowercase hex digits are ids; nothing else ever becomes a key.
        #[test]
        fn only_the_generated_format_parses(s in "\\PC{0,80}") {
            let expected = s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            proptest::prop_assert_eq!(SessionId::parse(&s).is_some(), expected);
        }
    }
}
