//! What a reward function sees of one completion (`crate::reward` and `crate::http_reward`).

/// What a reward function sees of one completion.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    pub prompt: &'a str,
    /// decoded, cut at the first stop string
    pub completion: &'a str,
    pub answer: &'a str,
    pub metadata: &'a serde_json::Value,
    /// completion tokens (up to the stop string)
    pub tokens: usize,
}
