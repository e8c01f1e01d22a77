//! The size DFA's compact form: regex-automata's dense DFA re-laid into
//! one small flat table, and its anchored leftmost-first search.

use regex_automata::dfa::Automaton;
use regex_automata::util::primitives::StateID;

use super::StaticDfa;
use crate::tables::{SIZE_DFA_MAX_STATES, SIZE_DFA_TABLE_CAPACITY};

/// A small anchored DFA re-laid from regex-automata's dense DFA when it is
/// loaded: byte classes, then one flat table of `u16` state ids
/// premultiplied by the stride, with the special states (dead, matching)
/// first. The inner loop is two table reads and one comparison per byte,
/// with no bounds check (indexes are masked to the table's power-of-two
/// size, which every id fits: the generator checks the size DFA against
/// [`SIZE_DFA_TABLE_CAPACITY`] and [`SIZE_DFA_MAX_STATES`]).
pub(super) struct CompactDfa {
    /// Byte class of each byte.
    classes: [u8; 256],
    /// Next state id by `state id + class`.
    next: [u16; SIZE_DFA_TABLE_CAPACITY],
    /// The class of the end of input.
    eoi: usize,
    /// For each state number (id >> `stride2`): `None` or the pattern it
    /// matches.
    matches: [Option<u8>; SIZE_DFA_MAX_STATES],
    /// Ids below this are special: dead, quit or matching.
    special: u16,
    /// log2 of the stride.
    stride2: usize,
    /// The start state's id.
    start: u16,
}

/// Index mask of [`CompactDfa::next`].
const TABLE_MASK: usize = SIZE_DFA_TABLE_CAPACITY - 1;

impl CompactDfa {
    /// Re-lays the states of `dfa` reachable from `start`; `None` when they
    /// do not fit (the generator checks that they do).
    pub(super) fn new(dfa: &StaticDfa, start: StateID) -> Option<CompactDfa> {
        let classes = dfa.byte_classes();
        let stride2 = classes.alphabet_len().next_power_of_two().trailing_zeros() as usize;
        // Every state reachable from the start, dead first.
        let mut found = [StateID::ZERO; SIZE_DFA_MAX_STATES];
        let mut len = 0;
        let mut push = |found: &mut [StateID; SIZE_DFA_MAX_STATES], id: StateID| {
            if !found[..len].contains(&id) {
                *found.get_mut(len)? = id;
                len += 1;
            }
            Some(len)
        };
        push(&mut found, StateID::ZERO)?;
        let mut reached = push(&mut found, start)?;
        let mut i = 0;
        while i < reached {
            let id = found[i];
            i += 1;
            if !(dfa.is_dead_state(id) || dfa.is_quit_state(id)) {
                for unit in classes.representatives(..) {
                    let next = match unit.as_u8() {
                        Some(b) => dfa.next_state(id, b),
                        None => dfa.next_eoi_state(id),
                    };
                    reached = push(&mut found, next)?;
                }
            }
        }
        let found = &found[..reached];
        // Special states get the lowest numbers.
        let special =
            |id: StateID| dfa.is_dead_state(id) || dfa.is_quit_state(id) || dfa.is_match_state(id);
        let mut order = [StateID::ZERO; SIZE_DFA_MAX_STATES];
        let mut k = 0;
        for pass in [true, false] {
            for &id in found.iter().filter(|&&id| special(id) == pass) {
                order[k] = id;
                k += 1;
            }
        }
        let order = &order[..reached];
        if (reached << stride2) > SIZE_DFA_TABLE_CAPACITY {
            return None;
        }
        let id_of = |id: StateID| {
            let number = order.iter().position(|&s| s == id)?;
            u16::try_from(number << stride2).ok()
        };
        let mut compact = CompactDfa {
            classes: [0; 256],
            next: [0; SIZE_DFA_TABLE_CAPACITY],
            eoi: classes.eoi().as_usize(),
            matches: [None; SIZE_DFA_MAX_STATES],
            special: 0,
            stride2,
            start: id_of(start)?,
        };
        for b in 0..=255u8 {
            compact.classes[usize::from(b)] = classes.get(b);
        }
        for (number, &id) in order.iter().enumerate() {
            if special(id) {
                compact.special = id_of(id)? + 1;
                if dfa.is_match_state(id) {
                    let pattern = u8::try_from(dfa.match_pattern(id, 0).as_usize()).ok()?;
                    compact.matches[number] = Some(pattern);
                }
            }
            if dfa.is_dead_state(id) || dfa.is_quit_state(id) {
                // A row of zeros: the dead state, id 0.
                continue;
            }
            let row = number << stride2;
            for unit in classes.representatives(..) {
                let (class, next) = match unit.as_u8() {
                    Some(b) => (usize::from(classes.get(b)), dfa.next_state(id, b)),
                    None => (compact.eoi, dfa.next_eoi_state(id)),
                };
                compact.next[row + class] = id_of(next)?;
            }
        }
        Some(compact)
    }

    /// The state after `state` reads `byte`.
    #[inline]
    fn next(&self, state: u16, byte: u8) -> u16 {
        let class = usize::from(self.classes[usize::from(byte)]);
        self.next[(usize::from(state) + class) & TABLE_MASK]
    }

    /// The state after `state` reads the end of input.
    #[inline]
    fn next_eoi(&self, state: u16) -> u16 {
        self.next[(usize::from(state) + self.eoi) & TABLE_MASK]
    }

    /// For a special state: `None` (dead) or the pattern it matches.
    #[inline]
    fn matched(&self, state: u16) -> Option<u8> {
        self.matches[(usize::from(state) >> self.stride2) % SIZE_DFA_MAX_STATES]
    }

    /// The leftmost-first match of the size DFA anchored at `start`: (end,
    /// pattern id), or `None`.
    #[inline]
    pub(super) fn match_at(&self, hay: &[u8], start: usize) -> Option<(usize, usize)> {
        let mut state = self.start;
        let mut last = None;
        for (i, &b) in hay.iter().enumerate().skip(start) {
            state = self.next(state, b);
            if state < self.special {
                match self.matched(state) {
                    // Matches are reported one byte late: this one ends at `i`.
                    Some(pattern) => last = Some((i, usize::from(pattern))),
                    None => return last,
                }
            }
        }
        state = self.next_eoi(state);
        if state < self.special
            && let Some(pattern) = self.matched(state)
        {
            last = Some((hay.len(), usize::from(pattern)));
        }
        last
    }
}
