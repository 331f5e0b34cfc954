//! [`Hash`]: a typed Redis hash, the fields of one global variable.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{decode, not_an_integer, Group};
use crate::error::{Error, Result};

/// The fields of one variable, kept as one Redis hash (`HGET`, `HSET`, `HINCRBY`, `HDEL`,
/// `HGETALL`): related values that are read and written one field at a time, without rewriting
/// the others. Values are JSON, as for every variable; integers are decimal text, so
/// [`incr`](Self::incr) and [`get::<i64>`](Self::get) see the same field. Each call is one round
/// trip, atomic by itself. Made by [`Group::hash`].
///
/// ```no_run
/// # async fn run(group: herd::globals::Group) -> herd::Result<()> {
/// let flags = group.hash("feature-flags")?;
/// flags.set("dark-mode", &true).await?;
/// let on: Option<bool> = flags.get("dark-mode").await?;
/// let hits = flags.incr("hits", 1).await?;
/// # let _ = (on, hits);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Hash {
    group: Group,
    name: String,
    key: String,
}

impl Group {
    /// The variable `name` of this group as a typed hash (see [`Hash`](struct@Hash)).
    ///
    /// # Errors
    /// [`Error::InvalidName`] unless the name is 1–128 characters of
    /// letters, digits and `_.:-`.
    pub fn hash(&self, name: &str) -> Result<Hash> {
        Ok(Hash {
            key: self.key(name)?,
            name: name.to_owned(),
            group: self.clone(),
        })
    }
}

impl Hash {
    /// Reads one field; `None` when absent.
    ///
    /// # Errors
    /// [`Error::InvalidName`] for a field that is empty or over 256
    /// bytes; [`Error::Unavailable`];
    /// [`Error::Decode`]; [`Error::Redis`] when the
    /// variable is not a hash.
    pub async fn get<T: DeserializeOwned>(&self, field: &str) -> Result<Option<T>> {
        validate_field(field)?;
        let raw: Option<String> = self
            .group
            .client()
            .query_read_only(redis::cmd("HGET").arg(&self.key).arg(field))
            .await?;
        raw.map(|raw| decode(field, &raw)).transpose()
    }

    /// Sets one field (the other fields are untouched).
    ///
    /// # Errors
    /// As [`get`](Self::get), plus [`Error::Encode`],
    /// [`Error::TooLarge`] and
    /// [`Error::OutcomeUnknown`].
    pub async fn set<T: Serialize + ?Sized>(&self, field: &str, value: &T) -> Result<()> {
        validate_field(field)?;
        let json = self.group.encode(field, value)?;
        self.group
            .client()
            .query::<()>(redis::cmd("HSET").arg(&self.key).arg(field).arg(json))
            .await
    }

    /// Adds `by` to an integer field (a missing field counts as 0) and returns the new value.
    ///
    /// # Errors
    /// As [`set`](Self::set); [`Error::NotAnInteger`] when the field
    /// holds something else.
    pub async fn incr(&self, field: &str, by: i64) -> Result<i64> {
        validate_field(field)?;
        self.group
            .client()
            .query(redis::cmd("HINCRBY").arg(&self.key).arg(field).arg(by))
            .await
            .map_err(|e| not_an_integer(e, field))
    }

    /// Deletes one field; whether it existed.
    ///
    /// # Errors
    /// As [`set`](Self::set).
    pub async fn delete(&self, field: &str) -> Result<bool> {
        validate_field(field)?;
        let n: i64 = self
            .group
            .client()
            .query(redis::cmd("HDEL").arg(&self.key).arg(field))
            .await?;
        Ok(n > 0)
    }

    /// Every field at one instant (`HGETALL`), decoded as `T` (use `serde_json::Value` for
    /// fields of different types).
    ///
    /// # Errors
    /// As [`get`](Self::get).
    pub async fn get_all<T: DeserializeOwned>(&self) -> Result<BTreeMap<String, T>> {
        let raw: BTreeMap<String, String> = self
            .group
            .client()
            .query_read_only(redis::cmd("HGETALL").arg(&self.key))
            .await?;
        raw.into_iter()
            .map(|(field, raw)| decode(&field, &raw).map(|v| (field, v)))
            .collect()
    }

    /// The variable's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A field name: 1–256 bytes (fields are not key names: any bytes are safe).
fn validate_field(field: &str) -> Result<()> {
    if field.is_empty() || field.len() > 256 {
        return Err(Error::invalid_name(
            field,
            "hash fields are 1 to 256 bytes long",
        ));
    }
    Ok(())
}
