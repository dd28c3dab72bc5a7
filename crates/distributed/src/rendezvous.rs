//! How a process learns that it is one rank of a group, and where the group meets: from the
//! environment its launcher set — torchrun, SLURM's `srun`, Kubernetes (which sets torchrun's
//! variables), or `lockstep launch` (which sets torchrun's too). The group then meets at the
//! TCP store (`store`) that rank 0 hosts on `MASTER_ADDR:MASTER_PORT`.
//!
//! Precedence, first match wins:
//!
//! 1. lockstep's own: `LOCKSTEP_RANK`, `LOCKSTEP_WORLD_SIZE`, `LOCKSTEP_LOCAL_RANK` (default
//!    the rank), with `MASTER_ADDR` / `MASTER_PORT`. (`LOCKSTEP_RANK` with `LOCKSTEP_NCCL_ID` is
//!    the older hand-off of an NCCL id without a store: `launch_env`, checked before this.)
//! 2. torchrun's: `RANK`, `WORLD_SIZE`, `LOCAL_RANK` (default the rank), `MASTER_ADDR`
//!    (required), `MASTER_PORT`.
//! 3. SLURM's: `SLURM_PROCID`, `SLURM_NTASKS` (else `SLURM_NPROCS`), `SLURM_LOCALID` (default
//!    0); `MASTER_ADDR` if set, else the first host of `SLURM_JOB_NODELIST` (else
//!    `SLURM_NODELIST`), in SLURM's compressed form (`node[01-04,07],gpu5`); `MASTER_PORT`.
//!
//! The store's port: `LOCKSTEP_STORE_PORT` if set, else `MASTER_PORT` — plus one when torchrun
//! says its agent serves its own store there (`TORCHELASTIC_USE_AGENT_STORE=True`, torch ≥ 2.4)
//! — else [`DEFAULT_PORT`] (29500, torch's; set one when several jobs share the first node).
//! Under torchrun use its static rendezvous (`--node-rank`, `--master-addr`): rank 0 must run
//! on the `MASTER_ADDR` host, which hosts the store. `LOCKSTEP_RENDEZVOUS_TIMEOUT_S` (default 300 s, or the commands'
//! `--rendezvous-timeout-s`) bounds how long a rank waits for the store and the others, and how
//! long a CPU collective waits for a peer. Every bad value is an error naming its variable.

use std::collections::HashMap;
use std::time::Duration;

use crate::store::{display_addr, StoreClient, StoreError, StoreServer};

pub const MASTER_ADDR: &str = "MASTER_ADDR";
pub const MASTER_PORT: &str = "MASTER_PORT";
pub const RANK: &str = "RANK";
pub const WORLD_SIZE: &str = "WORLD_SIZE";
pub const LOCAL_RANK: &str = "LOCAL_RANK";
pub const LOCKSTEP_RANK: &str = "LOCKSTEP_RANK";
pub const LOCKSTEP_WORLD_SIZE: &str = "LOCKSTEP_WORLD_SIZE";
pub const LOCKSTEP_LOCAL_RANK: &str = "LOCKSTEP_LOCAL_RANK";
/// An NCCL id handed over whole (`launch_env`).
pub const LOCKSTEP_NCCL_ID: &str = "LOCKSTEP_NCCL_ID";
pub const SLURM_PROCID: &str = "SLURM_PROCID";
pub const SLURM_NTASKS: &str = "SLURM_NTASKS";
pub const SLURM_NPROCS: &str = "SLURM_NPROCS";
pub const SLURM_LOCALID: &str = "SLURM_LOCALID";
pub const SLURM_JOB_NODELIST: &str = "SLURM_JOB_NODELIST";
pub const SLURM_NODELIST: &str = "SLURM_NODELIST";
pub const TIMEOUT_VAR: &str = "LOCKSTEP_RENDEZVOUS_TIMEOUT_S";
/// The store's port, over `MASTER_PORT`.
pub const STORE_PORT: &str = "LOCKSTEP_STORE_PORT";
/// Set by torchrun when its agent's own store serves `MASTER_PORT`.
pub const AGENT_STORE: &str = "TORCHELASTIC_USE_AGENT_STORE";

/// Every variable read here (and by `launch_env`), for tests and launchers that clear them.
pub const VARS: &[&str] = &[
    MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCKSTEP_RANK, LOCKSTEP_WORLD_SIZE, LOCKSTEP_LOCAL_RANK, LOCKSTEP_NCCL_ID,
    SLURM_PROCID, SLURM_NTASKS, SLURM_NPROCS, SLURM_LOCALID, SLURM_JOB_NODELIST, SLURM_NODELIST, TIMEOUT_VAR, STORE_PORT, AGENT_STORE,
];

/// The store's port when `MASTER_PORT` is not set.
pub const DEFAULT_PORT: u16 = 29500;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Hosts a nodelist may expand to (`expand_nodelist`).
const MAX_HOSTS: usize = 1 << 16;

/// Which launcher's variables described this rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Lockstep,
    Torchrun,
    Slurm,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Lockstep => "LOCKSTEP_RANK / LOCKSTEP_WORLD_SIZE",
            Source::Torchrun => "RANK / WORLD_SIZE (torchrun)",
            Source::Slurm => "SLURM_PROCID / SLURM_NTASKS (srun)",
        }
    }
}

/// This process's place in its group and where the group meets.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendezvous {
    pub rank: usize,
    pub world_size: usize,
    /// the rank on this node: the CUDA ordinal a GPU rank drives
    pub local_rank: usize,
    /// the store's host (rank 0's) and port
    pub host: String,
    pub port: u16,
    pub timeout: Duration,
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RendezvousError {
    #[error("{var}: {msg}")]
    Bad { var: &'static str, msg: String },
}

fn bad(var: &'static str, msg: impl Into<String>) -> RendezvousError {
    RendezvousError::Bad { var, msg: msg.into() }
}

/// The environment, limited to the variables read here.
pub fn env_vars() -> HashMap<String, String> {
    VARS.iter().filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v))).collect()
}

/// Whether these variables start this process as one rank of a group of more than one (for the
/// commands that refuse to run as a rank): `LOCKSTEP_RANK`, or torchrun's / SLURM's rank with a
/// world size other than 1.
pub fn started_as_rank(vars: &HashMap<String, String>) -> bool {
    let many = |k: &str| vars.get(k).is_some_and(|v| v.trim() != "1");
    vars.contains_key(LOCKSTEP_RANK) || (vars.contains_key(RANK) && many(WORLD_SIZE)) || (vars.contains_key(SLURM_PROCID) && (many(SLURM_NTASKS) || (!vars.contains_key(SLURM_NTASKS) && many(SLURM_NPROCS))))
}

/// A rendezvous timeout in seconds (positive, at most a week), from `what` (a variable or flag).
pub fn parse_timeout(what: &'static str, s: &str) -> Result<Duration, RendezvousError> {
    let v: f64 = s.trim().parse().map_err(|_| bad(what, format!("{s:?} is not a number of seconds")))?;
    if !(v > 0.0 && v <= 7.0 * 24.0 * 3600.0) {
        return Err(bad(what, format!("{s}: expected seconds above 0, at most a week")));
    }
    Ok(Duration::from_secs_f64(v))
}

impl Rendezvous {
    /// From this process's environment; `Ok(None)` when no launcher's variables are set.
    pub fn from_env() -> Result<Option<Self>, RendezvousError> {
        Self::from_vars(&env_vars())
    }

    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Option<Self>, RendezvousError> {
        let get = |k: &str| vars.get(k).map(String::as_str);
        let num = |var: &'static str| -> Result<Option<usize>, RendezvousError> {
            get(var).map(|v| v.trim().parse::<usize>().map_err(|_| bad(var, format!("{v:?} is not a non-negative integer")))).transpose()
        };
        let need = |var: &'static str, why: &str| -> Result<usize, RendezvousError> { num(var)?.ok_or_else(|| bad(var, format!("missing ({why})"))) };
        let (source, rank, world, local, world_var) = if get(LOCKSTEP_RANK).is_some() {
            let rank = need(LOCKSTEP_RANK, "")?;
            let world = need(LOCKSTEP_WORLD_SIZE, "LOCKSTEP_RANK is set")?;
            (Source::Lockstep, rank, world, num(LOCKSTEP_LOCAL_RANK)?.unwrap_or(rank), LOCKSTEP_WORLD_SIZE)
        } else if get(RANK).is_some() || get(WORLD_SIZE).is_some() {
            let rank = need(RANK, "WORLD_SIZE is set")?;
            let world = need(WORLD_SIZE, "RANK is set")?;
            (Source::Torchrun, rank, world, num(LOCAL_RANK)?.unwrap_or(rank), WORLD_SIZE)
        } else if get(SLURM_PROCID).is_some() {
            let rank = need(SLURM_PROCID, "")?;
            let (world, world_var) = match num(SLURM_NTASKS)? {
                Some(w) => (w, SLURM_NTASKS),
                None => (need(SLURM_NPROCS, "SLURM_PROCID is set, SLURM_NTASKS is not")?, SLURM_NPROCS),
            };
            (Source::Slurm, rank, world, num(SLURM_LOCALID)?.unwrap_or(0), world_var)
        } else {
            return Ok(None);
        };
        if world == 0 {
            return Err(bad(world_var, "0: a group has at least one rank"));
        }
        if rank >= world {
            let rank_var = match source {
                Source::Lockstep => LOCKSTEP_RANK,
                Source::Torchrun => RANK,
                Source::Slurm => SLURM_PROCID,
            };
            return Err(bad(rank_var, format!("rank {rank} is not below the world size {world} ({world_var})")));
        }
        let host = match (get(MASTER_ADDR), source) {
            (Some(h), _) => {
                let h = h.trim();
                if h.is_empty() || h.chars().any(char::is_whitespace) {
                    return Err(bad(MASTER_ADDR, format!("{h:?} is not a host name or address")));
                }
                h.trim_start_matches('[').trim_end_matches(']').to_string()
            }
            (None, Source::Slurm) => match (get(SLURM_JOB_NODELIST), get(SLURM_NODELIST)) {
                (Some(l), _) => first_host(l).map_err(|m| bad(SLURM_JOB_NODELIST, m))?,
                (None, Some(l)) => first_host(l).map_err(|m| bad(SLURM_NODELIST, m))?,
                (None, None) => return Err(bad(MASTER_ADDR, "missing, and so are SLURM_JOB_NODELIST and SLURM_NODELIST (rank 0's host is not known)")),
            },
            (None, Source::Lockstep) => return Err(bad(MASTER_ADDR, "missing (rank 0's host; LOCKSTEP_RANK is set without LOCKSTEP_NCCL_ID)")),
            (None, s) => return Err(bad(MASTER_ADDR, format!("missing (rank 0's host; {} is set)", s.name()))),
        };
        let port_of = |var: &'static str, p: &str| match p.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(bad(var, format!("{p:?} is not a port (1..65535)"))),
        };
        let port = match (get(STORE_PORT), get(MASTER_PORT)) {
            (Some(p), _) => port_of(STORE_PORT, p)?,
            (None, None) => DEFAULT_PORT,
            // torchrun's agent already serves its own store there: take the next port
            (None, Some(p)) if matches!(get(AGENT_STORE), Some("True" | "true" | "1")) => {
                port_of(MASTER_PORT, p)?.checked_add(1).ok_or_else(|| bad(MASTER_PORT, format!("{p}: no port after it for lockstep's store ({AGENT_STORE} is set)")))?
            }
            (None, Some(p)) => port_of(MASTER_PORT, p)?,
        };
        let timeout = get(TIMEOUT_VAR).map(|t| parse_timeout(TIMEOUT_VAR, t)).transpose()?.unwrap_or(DEFAULT_TIMEOUT);
        Ok(Some(Rendezvous { rank, world_size: world, local_rank: local, host, port, timeout, source }))
    }

    /// The store's address, `host:port`.
    pub fn addr(&self) -> String {
        display_addr(&self.host, self.port)
    }

    /// Meet at the store: rank 0 hosts it (kept alive by the returned server) and every rank,
    /// rank 0 too, connects to it.
    pub fn connect(&self) -> Result<(Option<StoreServer>, StoreClient), StoreError> {
        if self.rank == 0 {
            let server = StoreServer::listen(&self.host, self.port)?;
            let at = server.reachable_addr();
            let client = StoreClient::connect(&at.ip().to_string(), at.port(), 0, self.timeout)?;
            Ok((Some(server), client))
        } else {
            Ok((None, StoreClient::connect(&self.host, self.port, self.rank, self.timeout)?))
        }
    }
}

/// One host pattern of a nodelist: literal text and bracket groups (each a list of ranges).
fn split_top(list: &str) -> Result<Vec<&str>, String> {
    let (mut depth, mut start, mut items) = (0usize, 0usize, Vec::new());
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth > 0 => return Err(format!("`{list}`: nested `[`")),
            '[' => depth = 1,
            ']' if depth == 0 => return Err(format!("`{list}`: `]` without `[`")),
            ']' => depth = 0,
            ',' if depth == 0 => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth > 0 {
        return Err(format!("`{list}`: unclosed `[`"));
    }
    items.push(&list[start..]);
    if items.iter().any(|s| s.trim().is_empty()) {
        return Err(format!("`{list}`: an empty host name"));
    }
    Ok(items)
}

/// A host pattern's pieces: literals, and bracket groups as their ranges (checked; `(text of
/// the start, start, end)`, the start's width is the zero padding).
fn pieces<'a>(item: &'a str, list: &str) -> Result<Vec<Piece<'a>>, String> {
    let mut out = Vec::new();
    let mut rest = item.trim();
    while !rest.is_empty() {
        let Some(open) = rest.find('[') else {
            out.push(Piece::Text(rest));
            break;
        };
        if open > 0 {
            out.push(Piece::Text(&rest[..open]));
        }
        let close = rest.find(']').ok_or_else(|| format!("`{list}`: unclosed `[`"))?;
        let mut ranges = Vec::new();
        for range in rest[open + 1..close].split(',') {
            let range = range.trim();
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            let digits = |s: &str| !s.is_empty() && s.len() <= 18 && s.bytes().all(|c| c.is_ascii_digit());
            if !digits(a) || !digits(b) {
                return Err(format!("`{list}`: `{range}` is not a number or a range of numbers"));
            }
            let (lo, hi): (u64, u64) = (a.parse().unwrap_or(0), b.parse().unwrap_or(0));
            if lo > hi {
                return Err(format!("`{list}`: range `{range}` runs backwards"));
            }
            ranges.push((a.len(), lo, hi));
        }
        out.push(Piece::Group(ranges));
        rest = &rest[close + 1..];
    }
    Ok(out)
}

enum Piece<'a> {
    Text(&'a str),
    /// (width, first, last) ranges
    Group(Vec<(usize, u64, u64)>),
}

/// Every host of a SLURM nodelist (`node[01-04,07],gpu5` → node01 … node04, node07, gpu5),
/// at most 65536.
pub fn expand_nodelist(list: &str) -> Result<Vec<String>, String> {
    let too_many = || format!("`{list}`: more than {MAX_HOSTS} hosts");
    let mut hosts = Vec::new();
    for item in split_top(list.trim())? {
        let mut names = vec![String::new()];
        for piece in pieces(item, list)? {
            names = match piece {
                Piece::Text(t) => names.into_iter().map(|n| n + t).collect(),
                Piece::Group(ranges) => {
                    let count = ranges.iter().map(|&(_, lo, hi)| hi - lo + 1).fold(0u64, u64::saturating_add);
                    if (names.len() as u64).saturating_mul(count) > MAX_HOSTS as u64 {
                        return Err(too_many());
                    }
                    let values: Vec<String> = ranges.iter().flat_map(|&(w, lo, hi)| (lo..=hi).map(move |v| format!("{v:0w$}"))).collect();
                    names.iter().flat_map(|n| values.iter().map(move |v| format!("{n}{v}"))).collect()
                }
            };
        }
        hosts.extend(names);
        if hosts.len() > MAX_HOSTS {
            return Err(too_many());
        }
    }
    Ok(hosts)
}

/// The first host of a SLURM nodelist (the whole list is checked, not expanded).
pub fn first_host(list: &str) -> Result<String, String> {
    let mut first = None;
    for item in split_top(list.trim())? {
        let host: String = pieces(item, list)?
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.to_string(),
                Piece::Group(r) => format!("{:0w$}", r[0].1, w = r[0].0),
            })
            .collect();
        first.get_or_insert(host);
    }
    first.ok_or_else(|| format!("`{list}`: no host"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn err(pairs: &[(&str, &str)]) -> String {
        Rendezvous::from_vars(&vars(pairs)).unwrap_err().to_string()
    }

    #[test]
    fn torchrun_variables() {
        let rv = Rendezvous::from_vars(&vars(&[(MASTER_ADDR, "10.0.0.1"), (MASTER_PORT, "29600"), (RANK, "5"), (WORLD_SIZE, "16"), (LOCAL_RANK, "5")])).unwrap().unwrap();
        assert_eq!(rv, Rendezvous { rank: 5, world_size: 16, local_rank: 5, host: "10.0.0.1".into(), port: 29600, timeout: DEFAULT_TIMEOUT, source: Source::Torchrun });
        assert_eq!(rv.addr(), "10.0.0.1:29600");
        // defaults: the port, the local rank; IPv6 in brackets
        // torchrun's agent serves its store on MASTER_PORT: the next port; LOCKSTEP_STORE_PORT wins
        let t = [(MASTER_ADDR, "h"), (MASTER_PORT, "29500"), (RANK, "0"), (WORLD_SIZE, "2"), (AGENT_STORE, "True")];
        assert_eq!(Rendezvous::from_vars(&vars(&t)).unwrap().unwrap().port, 29501);
        assert_eq!(Rendezvous::from_vars(&vars(&[&t[..], &[(STORE_PORT, "4000")]].concat())).unwrap().unwrap().port, 4000);
        assert!(err(&[&t[..], &[(STORE_PORT, "x")]].concat()).starts_with("LOCKSTEP_STORE_PORT: "));
        let rv = Rendezvous::from_vars(&vars(&[(MASTER_ADDR, "[fe80::1]"), (RANK, "1"), (WORLD_SIZE, "2"), (TIMEOUT_VAR, "2.5")])).unwrap().unwrap();
        assert_eq!((rv.port, rv.local_rank, rv.timeout, rv.addr()), (DEFAULT_PORT, 1, Duration::from_millis(2500), "[fe80::1]:29500".to_string()));
        assert_eq!(Rendezvous::from_vars(&vars(&[(MASTER_ADDR, "x"), (LOCAL_RANK, "0")])).unwrap(), None);
    }

    #[test]
    fn slurm_variables_and_nodelists() {
        let s = |extra: &[(&str, &str)]| {
            let mut v = vars(&[(SLURM_PROCID, "9"), (SLURM_NTASKS, "16"), (SLURM_LOCALID, "1"), (SLURM_JOB_NODELIST, "gpu-node[07-08,11],login2")]);
            v.extend(vars(extra));
            Rendezvous::from_vars(&v)
        };
        let rv = s(&[]).unwrap().unwrap();
        assert_eq!((rv.rank, rv.world_size, rv.local_rank, rv.host.as_str(), rv.port, rv.source), (9, 16, 1, "gpu-node07", DEFAULT_PORT, Source::Slurm));
        // MASTER_ADDR / MASTER_PORT win over the nodelist
        let rv = s(&[(MASTER_ADDR, "head"), (MASTER_PORT, "1234")]).unwrap().unwrap();
        assert_eq!((rv.host.as_str(), rv.port), ("head", 1234));
        let rv = Rendezvous::from_vars(&vars(&[(SLURM_PROCID, "0"), (SLURM_NPROCS, "2"), (SLURM_NODELIST, "a1")])).unwrap().unwrap();
        assert_eq!((rv.world_size, rv.local_rank, rv.host.as_str()), (2, 0, "a1"));

        assert_eq!(expand_nodelist("node[01-04,07],gpu5").unwrap(), ["node01", "node02", "node03", "node04", "node07", "gpu5"]);
        assert_eq!(expand_nodelist("r[1-2]-n[08-10]").unwrap(), ["r1-n08", "r1-n09", "r1-n10", "r2-n08", "r2-n09", "r2-n10"]);
        assert_eq!(expand_nodelist("single").unwrap(), ["single"]);
        assert_eq!(first_host("node[01-04,07],gpu5").unwrap(), "node01");
        assert_eq!(first_host("gpu5,node[01-04]").unwrap(), "gpu5");
        assert_eq!(first_host("n[0000000001-9999999999]").unwrap(), "n0000000001");
        assert!(expand_nodelist("n[1-9999999]").unwrap_err().contains("more than 65536 hosts"));
        for (list, msg) in [("node[01-", "unclosed `[`"), ("node]", "`]` without `[`"), ("a,,b", "empty host"), ("n[4-2]", "runs backwards"), ("n[x]", "not a number"), ("n[1[2]]", "nested")] {
            let e = s(&[(SLURM_JOB_NODELIST, list)]).unwrap_err().to_string();
            assert!(e.starts_with("SLURM_JOB_NODELIST: `") && e.contains(msg), "{list}: {e}");
            assert!(first_host(list).unwrap_err().contains(msg), "{list}");
        }
    }

    #[test]
    fn precedence_lockstep_then_torchrun_then_slurm() {
        let all = [
            (LOCKSTEP_RANK, "1"), (LOCKSTEP_WORLD_SIZE, "4"), (RANK, "2"), (WORLD_SIZE, "8"), (SLURM_PROCID, "3"), (SLURM_NTASKS, "16"),
            (SLURM_JOB_NODELIST, "n1"), (MASTER_ADDR, "m"),
        ];
        let rv = Rendezvous::from_vars(&vars(&all)).unwrap().unwrap();
        assert_eq!((rv.source, rv.rank, rv.world_size, rv.local_rank), (Source::Lockstep, 1, 4, 1));
        let rv = Rendezvous::from_vars(&vars(&all[2..])).unwrap().unwrap();
        assert_eq!((rv.source, rv.rank, rv.world_size), (Source::Torchrun, 2, 8));
        let rv = Rendezvous::from_vars(&vars(&all[4..])).unwrap().unwrap();
        assert_eq!((rv.source, rv.rank, rv.world_size, rv.host.as_str()), (Source::Slurm, 3, 16, "m"));
        assert!(started_as_rank(&vars(&all[4..])) && started_as_rank(&vars(&[(LOCKSTEP_RANK, "0")])));
        assert!(!started_as_rank(&vars(&[(SLURM_PROCID, "0"), (SLURM_NTASKS, "1")])) && !started_as_rank(&vars(&[(RANK, "0"), (WORLD_SIZE, "1")])));
    }

    #[test]
    fn bad_values_name_their_variable() {
        let m = (MASTER_ADDR, "h");
        assert_eq!(err(&[m, (RANK, "x"), (WORLD_SIZE, "2")]), "RANK: \"x\" is not a non-negative integer");
        assert_eq!(err(&[m, (RANK, "-1"), (WORLD_SIZE, "2")]), "RANK: \"-1\" is not a non-negative integer");
        assert_eq!(err(&[m, (RANK, "0")]), "WORLD_SIZE: missing (RANK is set)");
        assert_eq!(err(&[m, (WORLD_SIZE, "2")]), "RANK: missing (WORLD_SIZE is set)");
        assert_eq!(err(&[m, (RANK, "2"), (WORLD_SIZE, "2")]), "RANK: rank 2 is not below the world size 2 (WORLD_SIZE)");
        assert_eq!(err(&[m, (RANK, "0"), (WORLD_SIZE, "0")]), "WORLD_SIZE: 0: a group has at least one rank");
        assert_eq!(err(&[m, (RANK, "0"), (WORLD_SIZE, "2"), (LOCAL_RANK, "a")]), "LOCAL_RANK: \"a\" is not a non-negative integer");
        assert!(err(&[(RANK, "0"), (WORLD_SIZE, "2")]).starts_with("MASTER_ADDR: missing"));
        assert!(err(&[(MASTER_ADDR, "a b"), (RANK, "0"), (WORLD_SIZE, "2")]).starts_with("MASTER_ADDR: \"a b\""));
        for p in ["0", "65536", "http"] {
            assert!(err(&[m, (MASTER_PORT, p), (RANK, "0"), (WORLD_SIZE, "2")]).starts_with("MASTER_PORT: "), "{p}");
        }
        for t in ["0", "-3", "soon", "NaN", "1e9"] {
            assert!(err(&[m, (TIMEOUT_VAR, t), (RANK, "0"), (WORLD_SIZE, "2")]).starts_with("LOCKSTEP_RENDEZVOUS_TIMEOUT_S: "), "{t}");
        }
        assert_eq!(err(&[m, (LOCKSTEP_RANK, "0")]), "LOCKSTEP_WORLD_SIZE: missing (LOCKSTEP_RANK is set)");
        assert_eq!(err(&[(SLURM_PROCID, "1"), (SLURM_NTASKS, "1"), (SLURM_NODELIST, "n")]), "SLURM_PROCID: rank 1 is not below the world size 1 (SLURM_NTASKS)");
        assert!(err(&[(SLURM_PROCID, "0")]).starts_with("SLURM_NPROCS: missing"));
        assert!(err(&[(SLURM_PROCID, "0"), (SLURM_NTASKS, "2")]).starts_with("MASTER_ADDR: missing, and so are SLURM_JOB_NODELIST"));
        assert!(err(&[(SLURM_PROCID, "0"), (SLURM_NTASKS, "2"), (SLURM_LOCALID, "z"), (SLURM_NODELIST, "n")]).starts_with("SLURM_LOCALID: "));
    }
}
