//! A map for the broker's many small maps (a session's subscriptions, a trie node's children
//! and subscribers): most hold one entry or none, and a `HashMap` allocates room for four
//! (~160 bytes for one subscription) and is 48 bytes wide even when empty. Up to [`FEW`]
//! entries live in a vector of exactly their number, searched in order; beyond, a boxed
//! `HashMap`, so a filter with thousands of subscribers is still found in constant time.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

/// Entries kept in the vector before the map becomes a `HashMap`.
const FEW: usize = 8;

// The map is boxed on purpose: it keeps every `SmallMap` (and trie node) as narrow as the
// vector (32 B instead of 56), and only maps of more than eight entries pay the box.
#[allow(clippy::box_collection)]
#[derive(Debug)]
pub enum SmallMap<K, V> {
    Few(Vec<(K, V)>),
    Many(Box<HashMap<K, V>>),
}

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        SmallMap::Few(Vec::new())
    }
}

impl<K, V> SmallMap<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        match self {
            SmallMap::Few(v) => v.len(),
            SmallMap::Many(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        let (few, many) = match self {
            SmallMap::Few(v) => (Some(v.iter().map(|(k, v)| (k, v))), None),
            SmallMap::Many(m) => (None, Some(m.iter())),
        };
        few.into_iter().flatten().chain(many.into_iter().flatten())
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    pub fn into_keys(self) -> impl Iterator<Item = K> {
        let (few, many) = match self {
            SmallMap::Few(v) => (Some(v.into_iter().map(|(k, _)| k)), None),
            SmallMap::Many(m) => (None, Some(m.into_keys())),
        };
        few.into_iter().flatten().chain(many.into_iter().flatten())
    }
}

impl<K: Hash + Eq, V> SmallMap<K, V> {
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self {
            SmallMap::Few(v) => v.iter().find(|(k, _)| k.borrow() == key).map(|(_, v)| v),
            SmallMap::Many(m) => m.get(key),
        }
    }

    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self {
            SmallMap::Few(v) => v
                .iter_mut()
                .find(|(k, _)| k.borrow() == key)
                .map(|(_, v)| v),
            SmallMap::Many(m) => m.get_mut(key),
        }
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    /// Adds or replaces `key`'s value; returns the value it replaced.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        if let Some(old) = self.get_mut(&key) {
            return Some(std::mem::replace(old, value));
        }
        self.push(key, value);
        None
    }

    /// The value of `key`, inserted as `V::default()` if it has none.
    pub fn entry_or_default(&mut self, key: K) -> &mut V
    where
        V: Default,
    {
        // Looked up twice on a hit: `get_mut`'s borrow cannot outlive the miss (NLL).
        if self.contains_key(&key) {
            return self.get_mut(&key).expect("present: just found");
        }
        self.push(key, V::default())
    }

    /// Adds an entry known to be absent.
    fn push(&mut self, key: K, value: V) -> &mut V {
        if let SmallMap::Few(v) = self {
            if v.len() >= FEW {
                let map: HashMap<K, V> = std::mem::take(v).into_iter().collect();
                *self = SmallMap::Many(Box::new(map));
            }
        }
        match self {
            SmallMap::Few(v) => {
                // Exactly one more: the usual doubling would give one entry room for four.
                v.reserve_exact(1);
                v.push((key, value));
                &mut v.last_mut().expect("just pushed").1
            }
            SmallMap::Many(m) => match m.entry(key) {
                std::collections::hash_map::Entry::Vacant(e) => e.insert(value),
                std::collections::hash_map::Entry::Occupied(e) => {
                    let slot = e.into_mut();
                    *slot = value;
                    slot
                }
            },
        }
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self {
            SmallMap::Few(v) => {
                let at = v.iter().position(|(k, _)| k.borrow() == key)?;
                let (_, value) = v.swap_remove(at);
                if v.is_empty() {
                    *v = Vec::new();
                } else {
                    v.shrink_to_fit();
                }
                Some(value)
            }
            SmallMap::Many(m) => m.remove(key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_a_map_below_and_above_the_switch() {
        let mut map: SmallMap<Box<str>, u32> = SmallMap::new();
        let mut model = HashMap::new();
        for round in 0..3u32 {
            for i in 0..20u32 {
                let key: Box<str> = format!("k{}", (i * 7 + round) % 13).into();
                assert_eq!(
                    map.insert(key.clone(), i),
                    model.insert(key.clone(), i),
                    "{key}"
                );
                assert_eq!(map.len(), model.len());
                if i % 3 == 0 {
                    assert_eq!(map.remove(&*key), model.remove(&key));
                }
                assert_eq!(map.get("k5"), model.get("k5"));
            }
        }
        let mut keys: Vec<&Box<str>> = map.keys().collect();
        keys.sort();
        let mut expected: Vec<&Box<str>> = model.keys().collect();
        expected.sort();
        assert_eq!(keys, expected);
        assert!(matches!(map, SmallMap::Many(_)), "13 keys: a HashMap");
    }

    #[test]
    fn one_entry_takes_room_for_one() {
        let mut map: SmallMap<u64, [u8; 24]> = SmallMap::new();
        assert_eq!(*map.entry_or_default(7), [0; 24]);
        match &map {
            SmallMap::Few(v) => assert_eq!(v.capacity(), 1),
            SmallMap::Many(_) => panic!("one entry is few"),
        }
        map.insert(7, [1; 24]);
        assert_eq!(map.len(), 1);
        assert_eq!(map.remove(&7), Some([1; 24]));
        assert!(map.is_empty());
        match &map {
            SmallMap::Few(v) => assert_eq!(v.capacity(), 0, "nothing kept once empty"),
            SmallMap::Many(_) => panic!("empty is few"),
        }
    }
}
