//! The tokenizer and chat template are `lockstep-text`'s, shared with the RL loop (one
//! tokenizer module, not two); this module re-exports them and maps their errors.

pub use lockstep_text::{byte_decode, byte_encode, TemplateMessage, Tokenizer, BYTE_CHAT_TEMPLATE};

use crate::error::ServerError;

impl From<lockstep_text::TextError> for ServerError {
    fn from(e: lockstep_text::TextError) -> Self {
        match e {
            lockstep_text::TextError::Tokenizer { file, msg } => ServerError::Tokenizer { file, msg },
            lockstep_text::TextError::Template(m) => ServerError::Template(m),
            lockstep_text::TextError::Io { what, source } => ServerError::Io { what, source },
        }
    }
}
