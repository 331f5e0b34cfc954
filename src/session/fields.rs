//! [`Fields`], the small map a session keeps its keys in while a request runs.

/// A map from session keys to values, kept as a vector of pairs.
///
/// A session holds a handful of keys, and a request touches one or two: a linear scan over a few
/// short strings costs less than hashing them (`HashMap` uses SipHash), and the pairs can be taken
/// as Redis returns them (`HGETALL`) without building a table. Measured in the benchmark's
/// read-modify-write route: the hash maps cost about 4 000 instructions per request.
#[derive(Clone, Debug)]
pub(crate) struct Fields<V> {
    pairs: Vec<(String, V)>,
}

impl<V> Default for Fields<V> {
    fn default() -> Self {
        Fields { pairs: Vec::new() }
    }
}

impl<V> Fields<V> {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Fields {
            pairs: Vec::with_capacity(n),
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<&V> {
        self.pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub(crate) fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Sets `key` to `value`, replacing what it held.
    pub(crate) fn insert(&mut self, key: String, value: V) {
        match self.pairs.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => *v = value,
            None => self.pairs.push((key, value)),
        }
    }

    /// Adds a pair known not to be there yet (as read from Redis: hash fields are unique).
    pub(crate) fn push_unique(&mut self, key: String, value: V) {
        self.pairs.push((key, value));
    }

    pub(crate) fn remove(&mut self, key: &str) -> Option<V> {
        let i = self.pairs.iter().position(|(k, _)| k == key)?;
        Some(self.pairs.swap_remove(i).1)
    }

    pub(crate) fn clear(&mut self) {
        self.pairs.clear();
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.pairs.iter().map(|(k, v)| (k, v))
    }
}

impl<'a, V> IntoIterator for &'a Fields<V> {
    type Item = (&'a String, &'a V);
    type IntoIter =
        std::iter::Map<std::slice::Iter<'a, (String, V)>, fn(&(String, V)) -> (&String, &V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.pairs.iter().map(|(k, v)| (k, v))
    }
}

#[cfg(test)]
mod tests {
    use super::Fields;

    #[test]
    fn behaves_like_a_map() {
        let mut f = Fields::default();
        assert!(f.is_empty());
        f.insert("a".to_owned(), 1);
        f.insert("b".to_owned(), 2);
        f.insert("a".to_owned(), 3);
        assert_eq!(f.get("a"), Some(&3));
        assert_eq!(f.iter().count(), 2);
        assert!(f.contains_key("b"));
        assert_eq!(f.remove("b"), Some(2));
        assert_eq!(f.remove("b"), None);
        assert_eq!(f.get("b"), None);
        f.clear();
        assert!(f.is_empty());
    }
}
