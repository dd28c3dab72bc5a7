//! Completion text under stop strings, the same for a whole response and for a stream: the
//! text ends before the first stop string; while a stream is open it also holds back a trailing
//! U+FFFD (a multi-byte character not complete yet) and any tail that could begin a stop
//! string, so the concatenated stream deltas equal the non-streamed text.

/// Byte offset of the earliest stop string in `text`.
pub fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}

/// The part of `text` that may be shown: cut at a stop string; unless `finished`, without the
/// tail that more tokens could still change.
pub fn visible<'a>(text: &'a str, stops: &[String], finished: bool) -> &'a str {
    if let Some(at) = find_stop(text, stops) {
        return &text[..at];
    }
    if finished {
        return text;
    }
    let base = text.trim_end_matches('\u{FFFD}').len();
    // hold back the longest tail that is a proper prefix of a stop string
    let mut hold = 0;
    for s in stops {
        if let Some(i) = (1..s.len()).rev().filter(|&i| s.is_char_boundary(i)).find(|&i| text[..base].ends_with(&s[..i])) {
            hold = hold.max(i);
        }
    }
    let end = base - hold;
    &text[..end]
}

/// Tracks what a stream has sent of one choice's text.
#[derive(Debug, Default)]
pub struct StreamText {
    sent: String,
}

impl StreamText {
    /// The new text to send, given the whole decoded completion so far.
    pub fn delta(&mut self, text: &str, stops: &[String], finished: bool) -> String {
        let v = visible(text, stops, finished);
        match v.strip_prefix(self.sent.as_str()) {
            Some(rest) if !rest.is_empty() => {
                self.sent.push_str(rest);
                rest.to_string()
            }
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn stop_strings_and_holdback() {
        let s = stops(&["END", "\n\n"]);
        assert_eq!(find_stop("abEND cd\n\n", &s), Some(2));
        assert_eq!(visible("abcEN", &s, false), "abc");
        assert_eq!(visible("abcEN", &s, true), "abcEN");
        assert_eq!(visible("abc\n", &s, false), "abc");
        assert_eq!(visible("abc\u{FFFD}", &s, false), "abc");
        assert_eq!(visible("abcENDx", &s, false), "abc");
        assert_eq!(visible("x", &[], false), "x");
    }

    #[test]
    fn stream_deltas_concatenate_to_the_whole() {
        let s = stops(&["stop"]);
        let full = "hello st wor\u{FFFD}ld sto";
        let mut st = StreamText::default();
        let mut out = String::new();
        for n in 1..=full.len() {
            if full.is_char_boundary(n) {
                out.push_str(&st.delta(&full[..n], &s, false));
            }
        }
        out.push_str(&st.delta(full, &s, true));
        assert_eq!(out, visible(full, &s, true));
        let mut st = StreamText::default();
        let mut out = String::new();
        let full = "abc stop def";
        for n in 1..=full.len() {
            out.push_str(&st.delta(&full[..n], &s, n == full.len()));
        }
        assert_eq!(out, "abc ");
    }
}
