//! Wire field types shared by the JSON readers: vLLM's nested `[tokens][layers][top_k]`
//! lists (flattened while parsing, so a large payload is never a tree of JSON values) and a
//! `routed_experts` value that is either such a list or a base64 string.

use serde::de::{Deserialize, Deserializer, Error as _, SeqAccess, Visitor};

/// A regular nested list `[[[int; k]; layers]; rows]`, flattened while parsing.
pub(crate) struct Flat3 {
    pub(crate) shape: [usize; 3],
    pub(crate) data: Vec<i64>,
}

impl<'de> Deserialize<'de> for Flat3 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Flat3;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a nested list [tokens][layers][top_k] of integers")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> std::result::Result<Flat3, A::Error> {
                flat3_seq(seq)
            }
        }
        d.deserialize_seq(V)
    }
}

struct Level<'a> {
    f: &'a mut Flat3,
    depth: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for Level<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Level<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "a list at depth {}", self.depth)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        let mut n = 0usize;
        if self.depth == 1 {
            while seq.next_element_seed(Level { f: &mut *self.f, depth: 2 })?.is_some() {
                n += 1;
            }
        } else {
            while let Some(x) = seq.next_element::<i64>()? {
                self.f.data.push(x);
                n += 1;
            }
        }
        let want = &mut self.f.shape[self.depth];
        if *want == usize::MAX {
            *want = n;
        } else if *want != n {
            let what = if self.depth == 1 { "layers" } else { "experts" };
            return Err(A::Error::custom(format!("ragged list: {n} {what} where earlier rows have {}", *want)));
        }
        Ok(())
    }
}

fn flat3_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> std::result::Result<Flat3, A::Error> {
    let mut f = Flat3 { shape: [0, usize::MAX, usize::MAX], data: Vec::new() };
    while seq.next_element_seed(Level { f: &mut f, depth: 1 })?.is_some() {
        f.shape[0] += 1;
    }
    for d in &mut f.shape[1..] {
        if *d == usize::MAX {
            *d = 0; // no list at this depth was seen
        }
    }
    Ok(f)
}

/// A `routed_experts` value: vLLM's base64 `.npy` / SGLang's base64 int32 string, nested lists
/// (vLLM 0.21), or an object (prime-rl's `{data, shape, start, dtype}`).
pub(crate) enum Routes {
    Text(String),
    Nested(Flat3),
    Object(serde_json::Map<String, serde_json::Value>),
}

impl<'de> Deserialize<'de> for Routes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Routes;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a base64 string, a nested list [tokens][layers][top_k] or an object")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Routes, E> {
                Ok(Routes::Text(s.to_string()))
            }
            fn visit_string<E: serde::de::Error>(self, s: String) -> Result<Routes, E> {
                Ok(Routes::Text(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Routes, A::Error> {
                flat3_seq(seq).map(Routes::Nested)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Routes, A::Error> {
                serde_json::Map::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Routes::Object)
            }
        }
        d.deserialize_any(V)
    }
}
