//! The family matcher: an all-matches DFA of family substrings, searched
//! in one pass for the first listed family a name contains.

use regex_automata::Anchored;
use regex_automata::dfa::Automaton;
use regex_automata::dfa::dense::DFA;
use regex_automata::util::primitives::StateID;

use super::StaticDfa;
use crate::tables::Family;

/// An all-matches DFA of family substrings and the families it names.
pub(super) struct FamilyMatcher {
    dfa: StaticDfa,
    start: StateID,
    families: &'static [Family],
}

impl FamilyMatcher {
    #[inline]
    pub(super) fn load(bytes: &'static [u8], families: &'static [Family]) -> Option<FamilyMatcher> {
        let (dfa, _) = DFA::from_bytes(bytes).ok()?;
        let start = dfa.universal_start_state(Anchored::No)?;
        Some(FamilyMatcher {
            dfa,
            start,
            families,
        })
    }

    /// The parameters of the first listed family occurring in `segment`.
    /// One pass; every match state names the families ending there.
    #[inline]
    pub(super) fn find(&self, segment: &[u8]) -> Option<u64> {
        let dfa = &self.dfa;
        let mut best = usize::MAX;
        let note = |state: StateID, best: &mut usize| {
            for k in 0..dfa.match_len(state) {
                *best = (*best).min(dfa.match_pattern(state, k).as_usize());
            }
        };
        let mut state = self.start;
        for &b in segment {
            state = dfa.next_state(state, b);
            if dfa.is_special_state(state) {
                if dfa.is_match_state(state) {
                    note(state, &mut best);
                    if best == 0 {
                        break;
                    }
                } else if dfa.is_dead_state(state) || dfa.is_quit_state(state) {
                    break;
                }
            }
        }
        if best != 0 {
            state = dfa.next_eoi_state(state);
            if dfa.is_match_state(state) {
                note(state, &mut best);
            }
        }
        self.families.get(best).map(|f| f.params)
    }
}
