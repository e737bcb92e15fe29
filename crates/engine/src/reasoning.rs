//! DeepSeek-R1 reasoning split: text between `<think>` and `</think>` is reasoning, the rest is
//! content. Works on streamed text deltas (tags may arrive split across deltas) and whether the
//! prompt template or the model emitted `<think>`: with `starts_in_reasoning` (the prompt ended
//! in `<think>`) everything up to `</think>` is reasoning.

use crate::stop::held_suffix;

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing seen yet: the output may open with `<think>`.
    Start,
    Reasoning,
    Content,
}

#[derive(Debug, Clone)]
pub struct ReasoningParser {
    state: State,
    pending: String,
    /// Content right after `</think>` has its leading newlines dropped.
    trim_next: bool,
}

/// One delta split into its reasoning and content parts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

impl ReasoningParser {
    pub fn new(starts_in_reasoning: bool) -> Self {
        let state = if starts_in_reasoning { State::Reasoning } else { State::Start };
        ReasoningParser { state, pending: String::new(), trim_next: false }
    }

    pub fn in_reasoning(&self) -> bool {
        self.state == State::Reasoning
    }

    pub fn push(&mut self, delta: &str) -> Split {
        self.pending.push_str(delta);
        let mut out = Split::default();
        loop {
            match self.state {
                State::Start => {
                    let t = self.pending.trim_start();
                    if t.starts_with(OPEN) {
                        let at = self.pending.len() - t.len() + OPEN.len();
                        self.pending.drain(..at);
                        self.state = State::Reasoning;
                    } else if OPEN.starts_with(t) {
                        return out; // could still become `<think>`
                    } else {
                        self.state = State::Content;
                    }
                }
                State::Reasoning => match self.pending.find(CLOSE) {
                    Some(i) => {
                        out.reasoning.push_str(&self.pending[..i]);
                        self.pending.drain(..i + CLOSE.len());
                        self.state = State::Content;
                        self.trim_next = true;
                    }
                    None => {
                        let keep = held_suffix(&self.pending, &[CLOSE]);
                        let emit = self.pending.len() - keep;
                        out.reasoning.push_str(&self.pending[..emit]);
                        self.pending.drain(..emit);
                        return out;
                    }
                },
                State::Content => {
                    if self.trim_next {
                        let t = self.pending.trim_start_matches('\n').to_string();
                        if t.is_empty() {
                            self.pending.clear();
                            return out;
                        }
                        self.pending = t;
                        self.trim_next = false;
                    }
                    out.content.push_str(&self.pending);
                    self.pending.clear();
                    return out;
                }
            }
        }
    }

    /// Release held-back text at the end of generation.
    pub fn finish(&mut self) -> Split {
        let rest = std::mem::take(&mut self.pending);
        match self.state {
            State::Reasoning => Split { reasoning: rest, content: String::new() },
            _ => Split { reasoning: String::new(), content: rest },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(start: bool, deltas: &[&str]) -> (String, String) {
        let mut p = ReasoningParser::new(start);
        let (mut r, mut c) = (String::new(), String::new());
        for d in deltas {
            let s = p.push(d);
            r += &s.reasoning;
            c += &s.content;
        }
        let s = p.finish();
        (r + &s.reasoning, c + &s.content)
    }

    #[test]
    fn model_emitted_think_block() {
        let got = run(false, &["<think>", "\nThe user", " greets.\n", "</", "think>", "\n\n", "Hello!"]);
        assert_eq!(got, ("\nThe user greets.\n".into(), "Hello!".into()));
    }

    #[test]
    fn template_opened_think_block() {
        assert_eq!(run(true, &["plan", "</think>Answer"]), ("plan".into(), "Answer".into()));
    }

    #[test]
    fn no_reasoning_at_all() {
        assert_eq!(run(false, &["Just", " content <b>"]), ("".into(), "Just content <b>".into()));
        assert_eq!(run(false, &["<th", "e end"]), ("".into(), "<the end".into()));
    }

    #[test]
    fn truncated_reasoning_is_all_reasoning() {
        assert_eq!(run(false, &["<think>still thinking </th"]), ("still thinking </th".into(), "".into()));
    }
}
