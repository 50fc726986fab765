//! Shared subscriptions (MQTT 5 §4.8.2): `$share/<group>/<filter>`. The sessions subscribed
//! with one group name and filter form a group that sits in the trie as a single subscriber; each
//! message it matches goes to one member, round robin, preferring members that are connected.
//! MQTT 3.1.1 sessions may join too (as Mosquitto and EMQX allow).

use std::sync::{Arc, Mutex};

use super::session::{Session, SubOptions};

const PREFIX: &str = "$share/";

/// Splits `$share/<group>/<filter>` into group name and filter; `None` for any other filter.
/// `Some(Err(..))` for a malformed shared filter (empty group or filter, wildcard in the group).
pub fn split(filter: &str) -> Option<Result<(&str, &str), &'static str>> {
    let rest = filter.strip_prefix(PREFIX)?;
    let Some((group, inner)) = rest.split_once('/') else {
        return Some(Err("a shared subscription needs $share/<group>/<filter>"));
    };
    if group.is_empty() || group.contains(['+', '#']) {
        return Some(Err("a share name is non-empty and has no wildcard"));
    }
    if inner.is_empty() {
        return Some(Err(
            "a shared subscription needs a filter after the share name",
        ));
    }
    Some(Ok((group, inner)))
}

/// The filter a subscription matches topics with: the inner filter of a shared one.
pub fn inner(filter: &str) -> &str {
    match split(filter) {
        Some(Ok((_, inner))) => inner,
        _ => filter,
    }
}

/// `$share/<group>/<filter>`.
pub fn join(group: &str, filter: &str) -> String {
    format!("{PREFIX}{group}/{filter}")
}

#[derive(Debug, Default)]
struct Members {
    list: Vec<(Arc<Session>, SubOptions)>,
    /// Where the next round-robin pick starts.
    next: usize,
}

/// One share group on one filter.
#[derive(Debug)]
pub struct SharedGroup {
    /// Its key in the trie (from the same counter as session ids, so never one of them).
    pub id: u64,
    members: Mutex<Members>,
}

impl SharedGroup {
    pub fn new(id: u64) -> Self {
        SharedGroup {
            id,
            members: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Members> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds or updates a member; returns whether it was one already.
    pub fn join(&self, session: &Arc<Session>, options: SubOptions) -> bool {
        let mut members = self.lock();
        match members.list.iter_mut().find(|(s, _)| s.id == session.id) {
            Some(member) => {
                member.1 = options;
                true
            }
            None => {
                members.list.push((session.clone(), options));
                false
            }
        }
    }

    /// Removes a member; returns whether the group is now empty.
    pub fn leave(&self, session_id: u64) -> bool {
        let mut members = self.lock();
        members.list.retain(|(s, _)| s.id != session_id);
        members.list.is_empty()
    }

    /// The member to receive the next message: the next connected one in round-robin order, or
    /// (none connected) the next one, whose queue keeps it until it comes back.
    pub fn pick(&self) -> Option<(Arc<Session>, SubOptions)> {
        let mut members = self.lock();
        let n = members.list.len();
        if n == 0 {
            return None;
        }
        let start = members.next % n;
        let chosen = (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| members.list[i].0.is_attached())
            .unwrap_or(start);
        members.next = chosen + 1;
        let (session, options) = &members.list[chosen];
        Some((session.clone(), *options))
    }

    pub fn len(&self) -> usize {
        self.lock().list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_filters_split_into_group_and_filter() {
        assert_eq!(split("$share/g/a/#"), Some(Ok(("g", "a/#"))));
        assert_eq!(split("a/b"), None);
        assert!(matches!(split("$share/g"), Some(Err(_))));
        assert!(matches!(split("$share//a"), Some(Err(_))));
        assert!(matches!(split("$share/g+/a"), Some(Err(_))));
        assert!(matches!(split("$share/g/"), Some(Err(_))));
        assert_eq!(inner("$share/g/a/+"), "a/+");
        assert_eq!(inner("a/+"), "a/+");
        assert_eq!(join("g", "a/+"), "$share/g/a/+");
    }
}
