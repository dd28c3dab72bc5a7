//! What `lockstep launch` hands each rank process: its rank, the world size, the GPU it owns
//! and the NCCL unique id (rank 0 of NCCL's bootstrap), as environment variables. Parsing them
//! is feature-free, so a binary without NCCL can still say what is wrong.

use std::collections::HashMap;

pub const RANK: &str = "LOCKSTEP_RANK";
pub const WORLD_SIZE: &str = "LOCKSTEP_WORLD_SIZE";
pub const LOCAL_RANK: &str = "LOCKSTEP_LOCAL_RANK";
pub const NCCL_ID: &str = "LOCKSTEP_NCCL_ID";

/// Bytes of an NCCL unique id (`ncclUniqueId`).
pub const NCCL_ID_BYTES: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub world_size: usize,
    /// the CUDA ordinal this rank drives
    pub local_rank: usize,
    pub nccl_id: [u8; NCCL_ID_BYTES],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LaunchEnvError {
    #[error("{var}: {msg} (set by `lockstep launch`)")]
    Bad { var: &'static str, msg: String },
}

fn bad(var: &'static str, msg: impl Into<String>) -> LaunchEnvError {
    LaunchEnvError::Bad { var, msg: msg.into() }
}

impl RankEnv {
    /// `Ok(None)` when this process was not started by `lockstep launch` (no `LOCKSTEP_RANK`).
    pub fn from_env() -> Result<Option<Self>, LaunchEnvError> {
        let vars: HashMap<String, String> = [RANK, WORLD_SIZE, LOCAL_RANK, NCCL_ID]
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect();
        Self::from_vars(&vars)
    }

    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Option<Self>, LaunchEnvError> {
        let Some(rank) = vars.get(RANK) else { return Ok(None) };
        let num = |var: &'static str, v: Option<&String>| -> Result<usize, LaunchEnvError> {
            let v = v.ok_or_else(|| bad(var, "missing"))?;
            v.parse().map_err(|_| bad(var, format!("{v:?} is not a number")))
        };
        let rank = num(RANK, Some(rank))?;
        let world_size = num(WORLD_SIZE, vars.get(WORLD_SIZE))?;
        let local_rank = match vars.get(LOCAL_RANK) {
            Some(v) => num(LOCAL_RANK, Some(v))?,
            None => rank,
        };
        if world_size == 0 || rank >= world_size {
            return Err(bad(RANK, format!("rank {rank} is not below the world size {world_size}")));
        }
        let hex = vars.get(NCCL_ID).ok_or_else(|| bad(NCCL_ID, "missing"))?;
        let nccl_id = decode_id(hex).map_err(|m| bad(NCCL_ID, m))?;
        Ok(Some(RankEnv { rank, world_size, local_rank, nccl_id }))
    }

    /// The variables for one rank's process.
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            (RANK, self.rank.to_string()),
            (WORLD_SIZE, self.world_size.to_string()),
            (LOCAL_RANK, self.local_rank.to_string()),
            (NCCL_ID, encode_id(&self.nccl_id)),
        ]
    }
}

pub fn encode_id(id: &[u8; NCCL_ID_BYTES]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn decode_id(hex: &str) -> Result<[u8; NCCL_ID_BYTES], String> {
    if hex.len() != 2 * NCCL_ID_BYTES || !hex.is_ascii() {
        return Err(format!("expected {} hex digits, got {} characters", 2 * NCCL_ID_BYTES, hex.len()));
    }
    let mut id = [0u8; NCCL_ID_BYTES];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| format!("not hex at character {}", 2 * i))?;
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn round_trip_and_errors_name_the_variable() {
        let mut id = [0u8; NCCL_ID_BYTES];
        id.iter_mut().enumerate().for_each(|(i, b)| *b = (i * 37 % 256) as u8);
        let env = RankEnv { rank: 1, world_size: 2, local_rank: 1, nccl_id: id };
        let m: HashMap<String, String> = env.vars().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        assert_eq!(RankEnv::from_vars(&m).unwrap(), Some(env));
        assert_eq!(RankEnv::from_vars(&HashMap::new()).unwrap(), None);
        let hex = encode_id(&id);
        let e = RankEnv::from_vars(&vars(&[(RANK, "2"), (WORLD_SIZE, "2"), (NCCL_ID, &hex)])).unwrap_err();
        assert!(e.to_string().starts_with("LOCKSTEP_RANK: rank 2"), "{e}");
        let e = RankEnv::from_vars(&vars(&[(RANK, "0"), (WORLD_SIZE, "x"), (NCCL_ID, &hex)])).unwrap_err();
        assert!(e.to_string().starts_with("LOCKSTEP_WORLD_SIZE"), "{e}");
        let e = RankEnv::from_vars(&vars(&[(RANK, "0"), (WORLD_SIZE, "2"), (NCCL_ID, "abc")])).unwrap_err();
        assert!(e.to_string().starts_with("LOCKSTEP_NCCL_ID: expected 256 hex digits"), "{e}");
        let e = RankEnv::from_vars(&vars(&[(RANK, "0"), (WORLD_SIZE, "2"), (NCCL_ID, &"zz".repeat(128))])).unwrap_err();
        assert!(e.to_string().contains("not hex"), "{e}");
        let e = RankEnv::from_vars(&vars(&[(RANK, "0"), (WORLD_SIZE, "2")])).unwrap_err();
        assert_eq!(e.to_string(), "LOCKSTEP_NCCL_ID: missing (set by `lockstep launch`)");
    }
}
