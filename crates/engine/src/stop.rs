//! Stop strings matched on the detokenized text: text that could still become a stop string is
//! held back, a match truncates before the stop string, which is never emitted.

#[derive(Debug, Default, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// Bytes at the end of `s` to hold back: the longest suffix that is a proper prefix of one of
/// `tags` (it may still grow into a tag). Used for stop strings, `</think>` and tool-call tokens.
pub fn held_suffix<T: AsRef<str>>(s: &str, tags: &[T]) -> usize {
    tags.iter()
        .map(AsRef::as_ref)
        .flat_map(|tag| {
            (1..tag.len()).filter(move |&n| n <= s.len() && s.is_char_boundary(s.len() - n) && tag.starts_with(&s[s.len() - n..]))
        })
        .max()
        .unwrap_or(0)
}

#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Safe to emit; no stop string seen.
    Continue(String),
    /// A stop string matched: emit `text` and finish.
    Stopped { text: String, stop: String },
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), pending: String::new() }
    }

    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Continue(delta.to_string());
        }
        self.pending.push_str(delta);
        if let Some((i, stop)) =
            self.stops.iter().filter_map(|s| self.pending.find(s.as_str()).map(|i| (i, s))).min_by_key(|m| m.0)
        {
            let out = StopOutcome::Stopped { text: self.pending[..i].to_string(), stop: stop.clone() };
            self.pending.clear();
            return out;
        }
        // hold back the longest suffix that is a prefix of some stop string
        let emit = self.pending.len() - held_suffix(&self.pending, &self.stops);
        let out = self.pending[..emit].to_string();
        self.pending.drain(..emit);
        StopOutcome::Continue(out)
    }

    /// Text still held back when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for d in deltas {
            match m.push(d) {
                StopOutcome::Continue(t) => out.push_str(&t),
                StopOutcome::Stopped { text, .. } => {
                    out.push_str(&text);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_string_across_deltas_is_not_emitted() {
        assert_eq!(run(&["END"], &["hello E", "N", "D tail"]), ("hello ".into(), true));
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
    }

    #[test]
    fn partial_prefix_that_does_not_complete_is_released() {
        assert_eq!(run(&["END"], &["E", "N", "x"]), ("ENx".into(), false));
    }

    #[test]
    fn multibyte_stop_strings() {
        assert_eq!(run(&["。"], &["深度", "求索。后面"]), ("深度求索".into(), true));
        assert_eq!(run(&["🚀!"], &["go 🚀", "?"]), ("go 🚀?".into(), false));
        assert_eq!(run(&["🚀!"], &["go 🚀", "!"]), ("go ".into(), true));
    }

    #[test]
    fn earliest_match_wins() {
        assert_eq!(run(&["b", "abc"], &["xxabc"]), ("xx".into(), true));
    }
}
