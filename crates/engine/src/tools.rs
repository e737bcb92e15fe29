//! DeepSeek-V3/R1 tool calls: the system preamble that describes the tools (the stock R1
//! template does not render `tools`; this follows vLLM's DeepSeek-R1 tool template) and the
//! parser of the model's tool-call tokens:
//!
//! `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>…<｜tool▁calls▁end｜>`

use serde_json::Value;

use crate::stop::held_suffix;

pub const CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
pub const CALLS_END: &str = "<｜tool▁calls▁end｜>";
pub const CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
pub const CALL_END: &str = "<｜tool▁call▁end｜>";
pub const SEP: &str = "<｜tool▁sep｜>";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub kind: String,
    pub name: String,
    /// The arguments as the model wrote them (a JSON object's text when well-formed).
    pub arguments: String,
}

/// System text describing `tools` (OpenAI function specs) and the call format.
pub fn tools_preamble(tools: &[Value], instruction: Option<&str>) -> String {
    let mut s = format!(
        "You are a helpful assistant with tool calling capabilities. When a tool call is needed, you MUST use the following format to issue the call:\n{CALLS_BEGIN}{CALL_BEGIN}function{SEP}FUNCTION_NAME\n```json\n{{\"param1\": \"value1\", \"param2\": \"value2\"}}\n```{CALL_END}{CALLS_END}\n\nMake sure the JSON is valid.\n\n## Tools\n\n### Function\n\nYou have the following functions available:\n"
    );
    for t in tools {
        let f = t.get("function").unwrap_or(t);
        s.push_str(&format!("\n```json\n{}\n```\n", serde_json::to_string(f).unwrap_or_default()));
    }
    if let Some(i) = instruction {
        s.push('\n');
        s.push_str(i);
    }
    s
}

/// Split generated text into content and tool calls. Text that does not follow the format
/// stays content (never an error).
pub fn parse_tool_calls(text: &str) -> (String, Vec<ToolCall>) {
    let Some(start) = text.find(CALLS_BEGIN) else { return (text.to_string(), Vec::new()) };
    let (content, rest) = (&text[..start], &text[start + CALLS_BEGIN.len()..]);
    let body = rest.split(CALLS_END).next().unwrap_or(rest);
    let mut calls = Vec::new();
    for part in body.split(CALL_BEGIN).skip(1) {
        let part = part.split(CALL_END).next().unwrap_or(part);
        let Some((kind, after)) = part.split_once(SEP) else { return (text.to_string(), Vec::new()) };
        let (name, args) = match after.split_once('\n') {
            Some((n, a)) => (n.trim(), a),
            None => (after.trim(), ""),
        };
        let args = args.trim();
        let args = args.strip_prefix("```json").or_else(|| args.strip_prefix("```")).unwrap_or(args);
        let args = args.strip_suffix("```").unwrap_or(args).trim();
        if name.is_empty() {
            return (text.to_string(), Vec::new());
        }
        calls.push(ToolCall { kind: kind.trim().to_string(), name: name.to_string(), arguments: args.to_string() });
    }
    if calls.is_empty() {
        return (text.to_string(), Vec::new());
    }
    (content.to_string(), calls)
}

/// A streamed piece of a tool call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolDelta {
    /// Call `index` started; its name is known.
    Start { index: usize, name: String },
    /// More argument text of call `index`.
    Args { index: usize, text: String },
}

/// What a pushed delta released: plain content and tool-call pieces.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pushed {
    pub content: String,
    pub tools: Vec<ToolDelta>,
}

/// Streaming tool-call parser: passes content through until the tool-calls block starts, then
/// releases each call's name and its argument text as they become certain (never a closing
/// fence, a special token or trailing whitespace that may still turn out to end the arguments).
#[derive(Debug, Default, Clone)]
pub struct ToolCallDetector {
    pending: String,
    in_calls: bool,
    buffer: String,
    /// per started call: argument bytes already released
    emitted: Vec<usize>,
}

/// (name, argument text certain so far) of every call whose name is complete.
fn partial_calls(buffer: &str) -> Vec<(String, String)> {
    let body = buffer.strip_prefix(CALLS_BEGIN).unwrap_or(buffer);
    let body = body.split(CALLS_END).next().unwrap_or(body);
    let mut out = Vec::new();
    for part in body.split(CALL_BEGIN).skip(1) {
        let Some((_, after)) = part.split_once(SEP) else { break };
        let Some((name, rest)) = after.split_once('\n') else { break };
        let closed = part.contains(CALL_END);
        let rest = rest.split(CALL_END).next().unwrap_or(rest);
        let rest = rest.trim_start();
        let args = if "```json".starts_with(rest) && !closed {
            "" // the opening fence is still arriving
        } else {
            let r = rest.strip_prefix("```json").or_else(|| rest.strip_prefix("```")).unwrap_or(rest).trim_start();
            match r.find("```") {
                Some(i) => r[..i].trim_end(),
                None if closed => r.trim_end(),
                // a fence or the end token may still be arriving: hold back what could start one
                None => r[..r.len() - held_suffix(r, &["```", CALL_END])].trim_end(),
            }
        };
        out.push((name.trim().to_string(), args.to_string()));
    }
    out
}

impl ToolCallDetector {
    /// Content safe to emit now, and tool-call pieces.
    pub fn push(&mut self, delta: &str) -> Pushed {
        if self.in_calls {
            self.buffer.push_str(delta);
            return Pushed { content: String::new(), tools: self.tool_deltas() };
        }
        self.pending.push_str(delta);
        if let Some(i) = self.pending.find(CALLS_BEGIN) {
            let content = self.pending[..i].to_string();
            self.buffer = self.pending[i..].to_string();
            self.pending.clear();
            self.in_calls = true;
            return Pushed { content, tools: self.tool_deltas() };
        }
        let hold = held_suffix(&self.pending, &[CALLS_BEGIN]);
        let content = self.pending[..self.pending.len() - hold].to_string();
        self.pending.drain(..self.pending.len() - hold);
        Pushed { content, tools: Vec::new() }
    }

    fn tool_deltas(&mut self) -> Vec<ToolDelta> {
        let mut out = Vec::new();
        for (index, (name, args)) in partial_calls(&self.buffer).into_iter().enumerate() {
            if index == self.emitted.len() {
                out.push(ToolDelta::Start { index, name });
                self.emitted.push(0);
            }
            let done = self.emitted[index];
            if args.len() > done && args.is_char_boundary(done) {
                out.push(ToolDelta::Args { index, text: args[done..].to_string() });
                self.emitted[index] = args.len();
            }
        }
        out
    }

    /// At the end: remaining content, the parsed calls (malformed calls come back as content),
    /// and the pieces of them not yet streamed.
    pub fn finish(&mut self) -> (String, Vec<ToolCall>, Vec<ToolDelta>) {
        let rest = std::mem::take(&mut self.pending);
        if !self.in_calls {
            return (rest, Vec::new(), Vec::new());
        }
        let (content, calls) = parse_tool_calls(&std::mem::take(&mut self.buffer));
        let mut tail = Vec::new();
        for (index, c) in calls.iter().enumerate() {
            match self.emitted.get(index) {
                None => {
                    tail.push(ToolDelta::Start { index, name: c.name.clone() });
                    tail.push(ToolDelta::Args { index, text: c.arguments.clone() });
                }
                Some(&done) if c.arguments.len() > done && c.arguments.is_char_boundary(done) => {
                    tail.push(ToolDelta::Args { index, text: c.arguments[done..].to_string() });
                }
                Some(_) => {}
            }
        }
        (rest + &content, calls, tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: &str) -> String {
        format!("{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}")
    }

    #[test]
    fn parses_one_and_several_calls() {
        let text = format!("Let me check.{CALLS_BEGIN}{}{CALLS_END}", call("get_weather", r#"{"city": "Hangzhou"}"#));
        let (content, calls) = parse_tool_calls(&text);
        assert_eq!(content, "Let me check.");
        assert_eq!(
            calls,
            vec![ToolCall { kind: "function".into(), name: "get_weather".into(), arguments: r#"{"city": "Hangzhou"}"#.into() }]
        );
        let two = format!("{CALLS_BEGIN}{}\n{}{CALLS_END}", call("a", "{}"), call("b", r#"{"x": 1}"#));
        let (content, calls) = parse_tool_calls(&two);
        assert_eq!(
            (content.as_str(), calls.len(), calls[1].name.as_str(), calls[1].arguments.as_str()),
            ("", 2, "b", r#"{"x": 1}"#)
        );
    }

    #[test]
    fn malformed_output_stays_content() {
        for bad in [format!("x{CALLS_BEGIN}garbage"), format!("{CALLS_BEGIN}{CALL_BEGIN}no separator{CALL_END}")] {
            let (content, calls) = parse_tool_calls(&bad);
            assert!(calls.is_empty());
            assert_eq!(content, bad);
        }
    }

    #[test]
    fn detector_streams_content_and_buffers_calls() {
        let text = format!("Sure.{CALLS_BEGIN}{}{CALLS_END}", call("f", r#"{"k": "v"}"#));
        for size in [1, 3, 7, 1000] {
            let mut d = ToolCallDetector::default();
            let (mut streamed, mut deltas) = (String::new(), Vec::new());
            // feed in awkward pieces, splitting the special tokens
            let chars: Vec<char> = text.chars().collect();
            for piece in chars.chunks(size) {
                let p = d.push(&piece.iter().collect::<String>());
                streamed += &p.content;
                deltas.extend(p.tools);
            }
            let (rest, calls, tail) = d.finish();
            deltas.extend(tail);
            assert_eq!(streamed + &rest, "Sure.");
            assert_eq!(calls[0].name, "f");
            // the streamed pieces add up to the final call, and never show a fence
            assert_eq!(deltas[0], ToolDelta::Start { index: 0, name: "f".into() });
            let args: String = deltas
                .iter()
                .filter_map(|d| if let ToolDelta::Args { text, .. } = d { Some(text.as_str()) } else { None })
                .collect();
            assert_eq!(args, r#"{"k": "v"}"#, "piece size {size}: {deltas:?}");
            if size == 1 {
                assert!(deltas.len() > 3, "arguments arrive in several deltas: {deltas:?}");
            }
        }
    }

    #[test]
    fn preamble_lists_every_tool() {
        let tools = vec![serde_json::json!({"type": "function", "function": {"name": "get_weather", "parameters": {}}})];
        let p = tools_preamble(&tools, Some("You must call `get_weather`."));
        assert!(p.contains("\"name\":\"get_weather\"") && p.contains(CALLS_BEGIN) && p.ends_with("You must call `get_weather`."));
    }
}
