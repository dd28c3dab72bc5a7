//! lockstep-text: text in and out of a model, one interface for the RL loop and the server.
//! [`Tokenizer`] is a checkpoint's `tokenizer.json` (HF `tokenizers`) or the embedded default's
//! byte-level tokenizer (vocabulary 256: token = byte), with the chat template (minijinja), the
//! BOS / EOS strings and the end-of-sequence token ids.

pub mod error;
pub mod tokenizer;

pub use error::{Result, TextError};
pub use tokenizer::{byte_decode, byte_encode, TemplateMessage, Tokenizer, BYTE_CHAT_TEMPLATE};
