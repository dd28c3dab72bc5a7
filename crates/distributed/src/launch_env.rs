//! An NCCL rank's identity: its rank, the world size, the GPU it owns and the NCCL unique id
//! (rank 0 of NCCL's bootstrap). Either handed over whole in environment variables
//! (`LOCKSTEP_RANK`, `LOCKSTEP_WORLD_SIZE`, `LOCKSTEP_LOCAL_RANK`, `LOCKSTEP_NCCL_ID`: a
//! launcher that made the id itself), or — what torchrun, `srun` and `lockstep launch` give —
//! found through the rendezvous (`rendezvous`): rank 0 makes the id and publishes it in the
//! store under [`NCCL_ID_KEY`], the others fetch it ([`RankEnv::through_store`]). Parsing is
//! feature-free, so a binary without NCCL can still say what is wrong.

use std::collections::HashMap;

use crate::rendezvous::{Rendezvous, RendezvousError};
use crate::store::{StoreError, StoreServer};

// the names are the rendezvous's (one spelling of each variable)
pub const RANK: &str = crate::rendezvous::LOCKSTEP_RANK;
pub const WORLD_SIZE: &str = crate::rendezvous::LOCKSTEP_WORLD_SIZE;
pub const LOCAL_RANK: &str = crate::rendezvous::LOCKSTEP_LOCAL_RANK;
pub const NCCL_ID: &str = crate::rendezvous::LOCKSTEP_NCCL_ID;

/// Bytes of an NCCL unique id (`ncclUniqueId`).
pub const NCCL_ID_BYTES: usize = 128;
/// The store key rank 0 publishes the NCCL unique id under.
pub const NCCL_ID_KEY: &str = "lockstep/nccl_id";

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
    #[error(transparent)]
    Rendezvous(#[from] RendezvousError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// NCCL is needed but this build has none, or NCCL failed to make the id.
    #[error("{0}")]
    Nccl(String),
}

fn bad(var: &'static str, msg: impl Into<String>) -> LaunchEnvError {
    LaunchEnvError::Bad { var, msg: msg.into() }
}

impl RankEnv {
    /// This process's NCCL rank: handed over (`LOCKSTEP_RANK` with `LOCKSTEP_NCCL_ID`), or
    /// through the rendezvous of its launcher's variables (which blocks until rank 0 published
    /// the id; rank 0's store then serves until the process exits). `Ok(None)` when no
    /// launcher started this process.
    pub fn from_env() -> Result<Option<Self>, LaunchEnvError> {
        let vars = crate::rendezvous::env_vars();
        if vars.contains_key(RANK) && vars.contains_key(NCCL_ID) {
            return Self::from_vars(&vars);
        }
        let Some(rv) = Rendezvous::from_vars(&vars)? else { return Ok(None) };
        let (env, server) = Self::through_store(&rv)?;
        // the others may still be fetching the id: rank 0's store lives as long as the process
        std::mem::forget(server);
        Ok(Some(env))
    }

    /// Meet at the store of `rv`: rank 0 makes the NCCL unique id and publishes it, the others
    /// fetch it. Rank 0 gets the store's server, to keep until every rank has the id.
    pub fn through_store(rv: &Rendezvous) -> Result<(Self, Option<StoreServer>), LaunchEnvError> {
        // every rank of a build without NCCL says so at once (rather than wait for rank 0's id)
        if !cfg!(feature = "nccl") {
            new_nccl_id()?;
        }
        let (server, mut client) = rv.connect()?;
        let nccl_id = if rv.rank == 0 {
            let id = new_nccl_id()?;
            client.set(NCCL_ID_KEY, &id)?;
            id
        } else {
            let v = client.get(NCCL_ID_KEY)?;
            <[u8; NCCL_ID_BYTES]>::try_from(v.as_slice())
                .map_err(|_| LaunchEnvError::Nccl(format!("rank {}: `{NCCL_ID_KEY}` at {}: {} bytes, not an NCCL id of {NCCL_ID_BYTES}", rv.rank, rv.addr(), v.len())))?
        };
        Ok((RankEnv { rank: rv.rank, world_size: rv.world_size, local_rank: rv.local_rank, nccl_id }, server))
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

/// A fresh NCCL unique id (rank 0 of a rendezvous makes it; the only place one is made).
#[cfg(feature = "nccl")]
fn new_nccl_id() -> Result<[u8; NCCL_ID_BYTES], LaunchEnvError> {
    let id = cudarc::nccl::result::get_uniqueid().map_err(|e| LaunchEnvError::Nccl(format!("rank 0: NCCL ncclGetUniqueId failed: {e:?} (run with NCCL_DEBUG=WARN for details)")))?;
    Ok(id.internal.map(|c| c as u8))
}

#[cfg(not(feature = "nccl"))]
fn new_nccl_id() -> Result<[u8; NCCL_ID_BYTES], LaunchEnvError> {
    Err(LaunchEnvError::Nccl("GPU ranks need NCCL, and this binary was built without it (`--features cuda,nccl`); CPU ranks: pass `--device cpu`".into()))
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
