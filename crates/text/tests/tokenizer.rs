//! The shipped tiny BPE tokenizer (`testdata/tasks/tiny-bpe`, made by
//! `scripts/data/make_tiny_bpe.py`) through `lockstep-text`: merges applied, special tokens,
//! EOS ids, the ChatML template with the generation prompt; the byte tokenizer of the default.

use std::path::PathBuf;

use lockstep_text::{byte_decode, byte_encode, TemplateMessage, TextError, Tokenizer};

fn tiny_bpe() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tasks/tiny-bpe")
}

#[test]
fn tiny_bpe_encodes_with_merges_and_round_trips() {
    let tok = Tokenizer::from_dir(&tiny_bpe(), 512).unwrap();
    assert!(!tok.is_bytes());
    assert_eq!(tok.vocab_size(), 339);
    let text = "Ann has 3 pens and gets 4 more. How many pens? ";
    let ids = tok.encode(text, false).unwrap();
    // merges make it shorter than its bytes, and every id is a BPE token (no special one)
    assert!(ids.len() < text.len() / 2, "{} tokens for {} bytes", ids.len(), text.len());
    assert!(ids.iter().all(|&i| i < 336), "{ids:?}");
    assert_eq!(tok.decode(&ids), text);
    // the special tokens are one id each
    let im_end = tok.encode("<|im_end|>", false).unwrap();
    assert_eq!(im_end.len(), 1);
    assert_eq!(tok.eos_token_ids, im_end, "eos_token of tokenizer_config.json");
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
}

#[test]
fn chat_template_renders_chatml_with_the_generation_prompt() {
    let tok = Tokenizer::from_dir(&tiny_bpe(), 512).unwrap();
    let p = tok.chat_prompt(Some("Be brief."), "2+2?").unwrap();
    assert_eq!(p, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n");
    let m = vec![TemplateMessage { role: "user".into(), content: "hi".into(), name: None }];
    let no_gen = tok.apply_chat_template(&m, false, &serde_json::Map::new()).unwrap();
    assert_eq!(no_gen, "<|im_start|>user\nhi<|im_end|>\n");
    // special tokens in the rendered text become their ids
    let ids = tok.encode(&p, false).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == tok.eos_token_ids[0]).count(), 2);
}

#[test]
fn byte_tokenizer_is_the_identity_on_bytes() {
    let tok = Tokenizer::bytes();
    assert!(tok.is_bytes() && tok.eos_token_ids.is_empty() && tok.vocab_size() == 256);
    assert_eq!(tok.encode("3+4=", true).unwrap(), vec![51, 43, 52, 61]);
    assert_eq!(byte_encode("é"), vec![0xC3, 0xA9]);
    assert_eq!(byte_decode(&byte_encode("a+b=\n")), "a+b=\n");
    assert_eq!(tok.decode(&[104, 105]), "hi");
    assert_eq!(byte_decode(&[300]), "\u{FFFD}", "an id beyond the bytes is no byte");
    assert_eq!(tok.chat_prompt(None, "hi").unwrap(), "user: hi\nassistant: ");
}

#[test]
fn bad_tokenizer_files_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
    let e = Tokenizer::from_dir(dir.path(), 512).err().unwrap();
    assert!(matches!(e, TextError::Tokenizer { ref file, .. } if file.ends_with("tokenizer.json")), "{e}");
    // no tokenizer.json and a vocabulary too small for bytes
    let empty = tempfile::tempdir().unwrap();
    let e = Tokenizer::from_dir(empty.path(), 100).err().unwrap();
    assert!(e.to_string().contains("vocab_size 100"), "{e}");
    // a template that does not parse
    std::fs::copy(tiny_bpe().join("tokenizer.json"), empty.path().join("tokenizer.json")).unwrap();
    std::fs::write(empty.path().join("tokenizer_config.json"), r#"{"chat_template": "{% for %}"}"#).unwrap();
    let e = Tokenizer::from_dir(empty.path(), 512).err().unwrap();
    assert!(matches!(e, TextError::Template(_)), "{e}");
}
