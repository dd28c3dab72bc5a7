//! The block manager of the paged KV cache: which pool blocks are free, who holds each block
//! (reference counts: the G samples of a prompt share its full blocks), and the prefix cache —
//! full blocks keyed by a hash of their tokens and everything before them, kept after their
//! sequences finish until the space is needed (least recently released first), each with the
//! route rows of its tokens so that a cache hit still returns every token's real route.
//!
//! A block enters the prefix cache only once all its tokens' keys are in it; a hit is checked
//! token by token against the stored block (and its parent's hash), so a hash collision can
//! never hand a sequence another prefix's keys.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// The route rows of one cached block's tokens, `[token][layer][w]` (ids, router probabilities).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlockRoutes {
    pub ids: Vec<u32>,
    pub probs: Vec<f32>,
}

#[derive(Debug, Clone)]
struct Cached {
    hash: u64,
    parent: u64,
    tokens: Vec<u32>,
    routes: Option<BlockRoutes>,
}

#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    refs: Vec<u32>,
    /// blocks with no holder and no cached content
    free: Vec<u32>,
    /// cached blocks with no holder, by release tick (oldest first: evicted first)
    evictable: BTreeMap<u64, u32>,
    released_at: Vec<u64>,
    tick: u64,
    by_hash: HashMap<u64, u32>,
    content: Vec<Option<Cached>>,
}

/// The hash of a full block: its parent's hash (0 for the first block) and its tokens.
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            refs: vec![0; num_blocks],
            // popped from the back: block 0 first
            free: (0..num_blocks as u32).rev().collect(),
            evictable: BTreeMap::new(),
            released_at: vec![0; num_blocks],
            tick: 0,
            by_hash: HashMap::new(),
            content: vec![None; num_blocks],
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks a new allocation can take now (free, or cached with no holder).
    pub fn num_available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks held by at least one sequence.
    pub fn num_held(&self) -> usize {
        self.refs.iter().filter(|&&r| r > 0).count()
    }

    /// Blocks in the prefix cache (held or not).
    pub fn num_cached(&self) -> usize {
        self.by_hash.len()
    }

    /// A block for one holder: a free one, else the least recently released cached one (its
    /// cache entry dropped). `None` when every block is held.
    pub fn allocate(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                if let Some(c) = self.content[b as usize].take() {
                    self.by_hash.remove(&c.hash);
                }
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// One holder lets go of `b`; with none left it becomes free, or evictable if cached.
    pub fn release(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        debug_assert!(*r > 0, "block {b} released more often than held");
        *r = r.saturating_sub(1);
        if *r == 0 {
            if self.content[b as usize].is_some() {
                self.tick += 1;
                self.released_at[b as usize] = self.tick;
                self.evictable.insert(self.tick, b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// The cached block holding `tokens` after the prefix hashed `parent` (a new holder of it),
    /// with its route rows. The stored tokens and parent are compared, not only the hash.
    pub fn lookup(&mut self, parent: u64, tokens: &[u32]) -> Option<(u32, Option<BlockRoutes>)> {
        let hash = block_hash(parent, tokens);
        let &b = self.by_hash.get(&hash)?;
        let c = self.content[b as usize].as_ref()?;
        if c.parent != parent || c.tokens != tokens {
            return None;
        }
        let routes = c.routes.clone();
        if self.refs[b as usize] == 0 {
            self.evictable.remove(&self.released_at[b as usize]);
        }
        self.refs[b as usize] += 1;
        Some((b, routes))
    }

    /// Put held block `b`, now full with `tokens` after the prefix hashed `parent`, into the
    /// prefix cache (a no-op if that content is cached already in another block). Returns the
    /// block's hash.
    pub fn register(&mut self, b: u32, parent: u64, tokens: &[u32], routes: Option<BlockRoutes>) -> u64 {
        let hash = block_hash(parent, tokens);
        if self.content[b as usize].is_none() && !self.by_hash.contains_key(&hash) {
            self.by_hash.insert(hash, b);
            self.content[b as usize] = Some(Cached { hash, parent, tokens: tokens.to_vec(), routes });
        }
        hash
    }

    /// Forget the prefix cache (new weights: every cached key is stale). Held blocks stay held.
    pub fn clear_cache(&mut self) {
        self.by_hash.clear();
        for c in &mut self.content {
            *c = None;
        }
        let evicted: Vec<u32> = std::mem::take(&mut self.evictable).into_values().collect();
        self.free.extend(evicted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_release_and_evict_oldest_first() {
        let mut m = BlockManager::new(3, 4);
        let (a, b, c) = (m.allocate().unwrap(), m.allocate().unwrap(), m.allocate().unwrap());
        assert_eq!((a, b, c), (0, 1, 2));
        assert_eq!(m.allocate(), None);
        let ha = m.register(a, 0, &[1, 2, 3, 4], None);
        m.register(b, ha, &[5, 6, 7, 8], None);
        m.release(b);
        m.release(a);
        m.release(c);
        assert_eq!(m.num_available(), 3);
        // the uncached block first, then the oldest released cached one (b)
        assert_eq!(m.allocate(), Some(c));
        assert_eq!(m.allocate(), Some(b));
        assert!(m.lookup(ha, &[5, 6, 7, 8]).is_none(), "evicted content is gone");
        assert_eq!(m.lookup(0, &[1, 2, 3, 4]).map(|x| x.0), Some(a));
        assert_eq!(m.allocate(), None);
    }

    #[test]
    fn lookup_checks_tokens_and_parent_and_shares() {
        let mut m = BlockManager::new(2, 2);
        let a = m.allocate().unwrap();
        let r = BlockRoutes { ids: vec![1, 2], probs: vec![0.5, 0.25] };
        let h = m.register(a, 7, &[9, 9], Some(r.clone()));
        assert_eq!(h, block_hash(7, &[9, 9]));
        assert!(m.lookup(8, &[9, 9]).is_none());
        assert!(m.lookup(7, &[9, 8]).is_none());
        let (b, routes) = m.lookup(7, &[9, 9]).unwrap();
        assert_eq!((b, routes), (a, Some(r)));
        // two holders: one release keeps it held
        m.release(a);
        assert_eq!(m.num_held(), 1);
        m.release(a);
        assert_eq!(m.num_held(), 0);
        assert_eq!(m.num_available(), 2);
        m.clear_cache();
        assert_eq!(m.num_cached(), 0);
        assert_eq!(m.num_available(), 2);
    }
}
