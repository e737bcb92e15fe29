//! DeepSeek-V3/R1 tool calls: the system preamble that describes the tools (the stock R1
//! template does not render `tools`; this follows vLLM's DeepSeek-R1 tool template) and the
//! parser of the model's tool-call tokens:
//!
//! `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>…<｜tool▁calls▁end｜>`

use serde_json::Value;

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

/// Streaming guard: passes content through until the tool-calls block starts, then buffers.
#[derive(Debug, Default, Clone)]
pub struct ToolCallDetector {
    pending: String,
    in_calls: bool,
    buffer: String,
}

impl ToolCallDetector {
    /// Content that is safe to emit now.
    pub fn push(&mut self, delta: &str) -> String {
        if self.in_calls {
            self.buffer.push_str(delta);
            return String::new();
        }
        self.pending.push_str(delta);
        if let Some(i) = self.pending.find(CALLS_BEGIN) {
            let out = self.pending[..i].to_string();
            self.buffer = self.pending[i..].to_string();
            self.pending.clear();
            self.in_calls = true;
            return out;
        }
        let hold = (1..CALLS_BEGIN.len())
            .rev()
            .find(|&n| {
                n <= self.pending.len()
                    && self.pending.is_char_boundary(self.pending.len() - n)
                    && CALLS_BEGIN.starts_with(&self.pending[self.pending.len() - n..])
            })
            .unwrap_or(0);
        let out = self.pending[..self.pending.len() - hold].to_string();
        self.pending.drain(..self.pending.len() - hold);
        out
    }

    /// At the end: remaining content and the parsed calls (malformed calls come back as content).
    pub fn finish(&mut self) -> (String, Vec<ToolCall>) {
        let rest = std::mem::take(&mut self.pending);
        if !self.in_calls {
            return (rest, Vec::new());
        }
        let (content, calls) = parse_tool_calls(&std::mem::take(&mut self.buffer));
        (rest + &content, calls)
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
        let mut d = ToolCallDetector::default();
        let mut streamed = String::new();
        // feed in awkward pieces, splitting the special tokens
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(3) {
            streamed += &d.push(&piece.iter().collect::<String>());
        }
        let (rest, calls) = d.finish();
        assert_eq!(streamed + &rest, "Sure.");
        assert_eq!(calls[0].name, "f");
    }

    #[test]
    fn preamble_lists_every_tool() {
        let tools = vec![serde_json::json!({"type": "function", "function": {"name": "get_weather", "parameters": {}}})];
        let p = tools_preamble(&tools, Some("You must call `get_weather`."));
        assert!(p.contains("\"name\":\"get_weather\"") && p.contains(CALLS_BEGIN) && p.ends_with("You must call `get_weather`."));
    }
}
