//! The write planner: what one request's buffered changes mean for Redis, decided without I/O.
//!
//! [`plan`] takes the buffered changes ([`Buffered`]), what the request knows of the stored
//! session ([`Known`]) and the layer's limits, and returns a [`WritePlan`] value. The store's
//! executor ([`super::store::execute`]) runs it and reports what Redis now holds; the handle
//! ([`super::Session`]) replaces its view with that report. The planner reads no clock but the
//! `now` it is given and sends nothing, so every case is unit-tested below without Redis.

use super::fields::Fields;
use super::timing::index_target;

/// One buffered change of a session field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    Set(Vec<u8>),
    Remove,
}

/// How a save treats the session's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SaveMode {
    /// A fresh id: the key must not exist yet.
    New,
    /// The key must still exist (never resurrect).
    Existing,
    /// The key must exist and moves to a fresh id, leaving a tombstone under the old one (`RENAME`
    /// on one server; on a cluster, where the new key is in another slot, three steps: see
    /// `store::cycle_across_slots`).
    Cycle,
}

/// The changes of one request, in the shape the save script takes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Delta {
    pub(crate) clear: bool,
    pub(crate) set: Vec<(String, Vec<u8>)>,
    pub(crate) remove: Vec<String>,
    pub(crate) owner: Option<String>,
    pub(crate) idle_override_ms: Option<u64>,
    pub(crate) incr: Option<(String, i64)>,
}

impl Delta {
    /// Whether the delta would put anything into a session that does not exist yet (a removal or a
    /// clear of nothing keeps nothing).
    pub(crate) fn has_content(&self) -> bool {
        !self.set.is_empty()
            || self.incr.is_some()
            || self.owner.is_some()
            || self.idle_override_ms.is_some()
    }
}

/// What the request has buffered.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Buffered<'a> {
    pub(crate) changes: &'a Fields<Change>,
    pub(crate) clear: bool,
    pub(crate) owner: Option<&'a str>,
    pub(crate) idle_override_ms: Option<u64>,
    pub(crate) cycle: bool,
    /// An increment to run now (`Session::incr`), with the rest.
    pub(crate) incr: Option<(&'a str, i64)>,
}

/// What the request knows of the stored session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Known<'a> {
    /// No session: no (valid) cookie, or read and absent, or destroyed in this request.
    Absent,
    /// The cookie names a session this request has not read: it may have ended.
    Unread,
    /// Read (or written) in this request: it existed then, with this owner and own idle timeout,
    /// and with the buffered changes applied it holds `size` bytes of user fields.
    Read {
        owner: Option<&'a str>,
        idle_ms: Option<u64>,
        size: usize,
    },
}

/// The layer's settings the planner needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// The layer's idle timeout, ms.
    pub(crate) idle_ms: u64,
    pub(crate) max_session_bytes: usize,
}

/// An owner index entry a save must create or move: the index lists the session until `until`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IndexPlan {
    pub(crate) owner: String,
    pub(crate) until: u64,
}

/// What a save does when Redis answers that the session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IfGone {
    /// The request read the session: its changes were made against data that is gone; refuse
    /// ([`crate::Error::SessionGone`]).
    Fail,
    /// A blind write: its changes start a fresh session with a fresh id (never under the old id).
    StartFresh,
}

/// One save of the session: the save script's arguments, and what to do when it answers "gone".
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SavePlan {
    pub(crate) mode: SaveMode,
    pub(crate) delta: Delta,
    /// Check the session's total size in Redis (0: the request checked it).
    pub(crate) max_bytes: usize,
    /// List the session (its new id when cycling) in its owner's index, when the owner is known.
    pub(crate) index: Option<IndexPlan>,
    pub(crate) if_gone: IfGone,
}

/// What the buffered changes mean for Redis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum WritePlan {
    /// Nothing buffered: no write (a due TTL refresh is not part of the request's path).
    Nothing,
    /// Only removals or a clear of a session that does not exist: nothing to store; forget them.
    Discard,
    /// The session would be over the size limit: refused without a round trip.
    TooLarge { size: usize },
    /// One save.
    Save(SavePlan),
}

/// Plans the write of `buffered` into the session described by `known`, at `now` (unix ms).
pub(crate) fn plan(
    buffered: &Buffered<'_>,
    known: Known<'_>,
    limits: Limits,
    now: u64,
) -> WritePlan {
    let mut delta = Delta {
        clear: buffered.clear,
        owner: buffered.owner.map(str::to_owned),
        idle_override_ms: buffered.idle_override_ms,
        incr: buffered.incr.map(|(k, by)| (k.to_owned(), by)),
        ..Delta::default()
    };
    for (field, change) in buffered.changes {
        match change {
            Change::Set(v) => delta.set.push((field.clone(), v.clone())),
            Change::Remove => delta.remove.push(field.clone()),
        }
    }
    let nothing_buffered =
        !delta.clear && delta.set.is_empty() && delta.remove.is_empty() && !delta.has_content();
    if nothing_buffered && !buffered.cycle {
        return WritePlan::Nothing;
    }
    if known == Known::Absent && !delta.has_content() {
        return WritePlan::Discard;
    }
    // The request knows the size where it read the session (or there is none): checked here.
    let size = match known {
        Known::Read { size, .. } => Some(size),
        Known::Absent => Some(delta.set.iter().map(|(k, v)| k.len() + v.len()).sum()),
        Known::Unread => None,
    };
    if let Some(size) = size.filter(|s| *s > limits.max_session_bytes) {
        return WritePlan::TooLarge { size };
    }
    let mode = match (known, buffered.cycle) {
        (Known::Absent, _) => SaveMode::New,
        (_, true) => SaveMode::Cycle,
        (_, false) => SaveMode::Existing,
    };
    // Where the request has not read the session, Redis checks the size: only when fields are set
    // (removals and meta fields shrink or keep it; an increment adds one integer at most).
    let max_bytes = match known {
        Known::Unread if !delta.set.is_empty() => limits.max_session_bytes,
        _ => 0,
    };
    let (read_owner, read_idle) = match known {
        Known::Read { owner, idle_ms, .. } => (owner, idle_ms),
        _ => (None, None),
    };
    // A new id is listed under the owner the request knows of; an existing id only when the request
    // sets an owner (the index entry of an unchanged owner is pushed forward off the request's path).
    let index_owner = match mode {
        SaveMode::New | SaveMode::Cycle => buffered.owner.or(read_owner),
        SaveMode::Existing => buffered.owner,
    };
    let idle_ms = buffered
        .idle_override_ms
        .or(read_idle)
        .unwrap_or(limits.idle_ms);
    let index = index_owner.map(|owner| IndexPlan {
        owner: owner.to_owned(),
        until: index_target(now, idle_ms),
    });
    let if_gone = match known {
        Known::Read { .. } => IfGone::Fail,
        Known::Absent | Known::Unread => IfGone::StartFresh,
    };
    WritePlan::Save(SavePlan {
        mode,
        delta,
        max_bytes,
        index,
        if_gone,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        idle_ms: 1000,
        max_session_bytes: 100,
    };
    const NOW: u64 = 1_000_000;

    /// Every combination of a small set of buffered changes, against every kind of knowledge.
    /// One buffer: changes, clear, owner, idle override, cycle, increment.
    type Buffer = (
        Fields<Change>,
        bool,
        Option<&'static str>,
        Option<u64>,
        bool,
        Option<(&'static str, i64)>,
    );

    fn all_buffers() -> Vec<Buffer> {
        let mut out = Vec::new();
        let change_sets: Vec<Vec<(&str, Change)>> = vec![
            vec![],
            vec![("a", Change::Set(b"1".to_vec()))],
            vec![("a", Change::Remove)],
            vec![("a", Change::Set(b"1".to_vec())), ("b", Change::Remove)],
            vec![("big", Change::Set(vec![b'x'; 200]))],
        ];
        for changes in &change_sets {
            for clear in [false, true] {
                for owner in [None, Some("u1")] {
                    for idle in [None, Some(5000)] {
                        for cycle in [false, true] {
                            for incr in [None, Some(("n", 2))] {
                                let mut fields = Fields::default();
                                for (k, c) in changes {
                                    fields.insert((*k).to_owned(), c.clone());
                                }
                                out.push((fields, clear, owner, idle, cycle, incr));
                            }
                        }
                    }
                }
            }
        }
        out
    }

    fn knowns() -> Vec<Known<'static>> {
        vec![
            Known::Absent,
            Known::Unread,
            Known::Read {
                owner: None,
                idle_ms: None,
                size: 10,
            },
            Known::Read {
                owner: Some("u0"),
                idle_ms: Some(3000),
                size: 10,
            },
            Known::Read {
                owner: None,
                idle_ms: None,
                size: 500,
            },
        ]
    }

    /// The rules, checked on every combination: the plan is a function of what is buffered and
    /// known, and each field of it follows from one rule.
    #[test]
    fn every_combination_follows_the_rules() {
        let mut saves = 0;
        for (changes, clear, owner, idle, cycle, incr) in all_buffers() {
            for known in knowns() {
                let buffered = Buffered {
                    changes: &changes,
                    clear,
                    owner,
                    idle_override_ms: idle,
                    cycle,
                    incr,
                };
                let plan = plan(&buffered, known, LIMITS, NOW);
                let sets = changes.iter().any(|(_, c)| matches!(c, Change::Set(_)));
                let content = sets || owner.is_some() || idle.is_some() || incr.is_some();
                let anything = content || clear || !changes.is_empty();
                let what = format!("{changes:?} clear={clear} owner={owner:?} idle={idle:?} cycle={cycle} incr={incr:?} {known:?}: {plan:?}");
                if !anything && !cycle {
                    assert_eq!(plan, WritePlan::Nothing, "{what}");
                    continue;
                }
                if known == Known::Absent && !content {
                    assert_eq!(plan, WritePlan::Discard, "{what}");
                    continue;
                }
                let size = match known {
                    Known::Read { size, .. } => Some(size),
                    Known::Absent => Some(
                        changes
                            .iter()
                            .map(|(k, c)| match c {
                                Change::Set(v) => k.len() + v.len(),
                                Change::Remove => 0,
                            })
                            .sum(),
                    ),
                    Known::Unread => None,
                };
                if let Some(size) = size.filter(|s| *s > LIMITS.max_session_bytes) {
                    assert_eq!(plan, WritePlan::TooLarge { size }, "{what}");
                    continue;
                }
                let WritePlan::Save(save) = plan else {
                    panic!("expected a save: {what}");
                };
                saves += 1;
                // Mode: a session that does not exist is created; cycling needs one to exist.
                let mode = match (known, cycle) {
                    (Known::Absent, _) => SaveMode::New,
                    (_, true) => SaveMode::Cycle,
                    _ => SaveMode::Existing,
                };
                assert_eq!(save.mode, mode, "{what}");
                // The delta is exactly what was buffered.
                assert_eq!(save.delta.clear, clear, "{what}");
                assert_eq!(save.delta.owner.as_deref(), owner, "{what}");
                assert_eq!(save.delta.idle_override_ms, idle, "{what}");
                assert_eq!(
                    save.delta.incr,
                    incr.map(|(k, b)| (k.to_owned(), b)),
                    "{what}"
                );
                assert_eq!(
                    save.delta.set.len() + save.delta.remove.len(),
                    changes.iter().count(),
                    "{what}"
                );
                // Redis checks the size only where the request could not.
                let redis_checks = known == Known::Unread && sets;
                assert_eq!(save.max_bytes > 0, redis_checks, "{what}");
                // Never retry a write that was made against data the request read.
                let fail = matches!(known, Known::Read { .. });
                assert_eq!(save.if_gone == IfGone::Fail, fail, "{what}");
                // The index: the owner the request knows of for a new id; a set owner otherwise.
                let read_owner = match known {
                    Known::Read { owner, .. } => owner,
                    _ => None,
                };
                let expected_owner = match mode {
                    SaveMode::New | SaveMode::Cycle => owner.or(read_owner),
                    SaveMode::Existing => owner,
                };
                assert_eq!(
                    save.index.as_ref().map(|i| i.owner.as_str()),
                    expected_owner,
                    "{what}"
                );
                if let Some(index) = &save.index {
                    let read_idle = match known {
                        Known::Read { idle_ms, .. } => idle_ms,
                        _ => None,
                    };
                    let idle = idle.or(read_idle).unwrap_or(LIMITS.idle_ms);
                    assert_eq!(index.until, index_target(NOW, idle), "{what}");
                    assert!(index.until > NOW + idle, "{what}");
                }
            }
        }
        assert!(saves > 500, "{saves} saves planned");
    }

    #[test]
    fn a_bare_cycle_is_a_save_and_a_bare_removal_of_nothing_is_discarded() {
        let empty = Fields::default();
        let cycle = Buffered {
            changes: &empty,
            clear: false,
            owner: None,
            idle_override_ms: None,
            cycle: true,
            incr: None,
        };
        let read = Known::Read {
            owner: Some("u"),
            idle_ms: None,
            size: 0,
        };
        match plan(&cycle, read, LIMITS, NOW) {
            WritePlan::Save(save) => {
                assert_eq!(save.mode, SaveMode::Cycle);
                assert_eq!(save.index.map(|i| i.owner), Some("u".to_owned()));
            }
            other => panic!("{other:?}"),
        }
        let clear = Buffered {
            clear: true,
            cycle: false,
            ..cycle
        };
        assert_eq!(plan(&clear, Known::Absent, LIMITS, NOW), WritePlan::Discard);
    }
}
