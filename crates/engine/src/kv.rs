//! Paged latent KV cache with prefix caching.
//!
//! One pool tensor per layer holds `num_pages × page_size` latent rows; a sequence owns a block
//! table (page ids). Full pages are registered under a hash chain of their tokens so a later
//! request with the same prefix reuses them (refcounted); unreferenced cached pages are evicted
//! least-recently-used when the free list runs dry.

use std::borrow::BorrowMut;
use std::collections::{HashMap, VecDeque};

use candle_core::{DType, Device, Tensor};
use moeserve_core::{error::Context, Error, KvLayout, Result};
use moeserve_model::device_ops::PagedRows;
use moeserve_model::LatentKv;

pub type PageId = u32;

/// Hash of a full page's tokens chained to the hash of the page before it.
pub fn page_hash(prev: u64, tokens: &[u32]) -> u64 {
    // FNV-1a over (prev, tokens): deterministic across runs and platforms
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ prev.rotate_left(17);
    for &t in tokens {
        for b in t.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub total_pages: usize,
    pub free_pages: usize,
    /// Unreferenced pages kept for prefix reuse (evictable).
    pub cached_pages: usize,
    pub used_pages: usize,
}

pub struct PagePool {
    layout: KvLayout,
    page_size: usize,
    /// per layer: [num_pages * page_size, row_dim]
    layers: Vec<Tensor>,
    refcount: Vec<u32>,
    free: Vec<PageId>,
    /// hash -> page, and the reverse for eviction
    by_hash: HashMap<u64, PageId>,
    hash_of: Vec<Option<u64>>,
    /// unreferenced pages that still hold a cached prefix, least recently used first
    lru: VecDeque<PageId>,
}

impl PagePool {
    pub fn new(layout: KvLayout, page_size: usize, num_pages: usize, dtype: DType, device: &Device) -> Result<Self> {
        if page_size == 0 || num_pages == 0 {
            return Err(Error::Cache(format!("page_size {page_size} and num_pages {num_pages} must be > 0")));
        }
        let rows = page_size * num_pages;
        let layers = (0..layout.num_layers)
            .map(|_| Tensor::zeros((rows, layout.row_dim()), dtype, device).ctx(|| "kv pool".into()))
            .collect::<Result<Vec<_>>>()?;
        Ok(PagePool {
            layout,
            page_size,
            layers,
            refcount: vec![0; num_pages],
            free: (0..num_pages as PageId).rev().collect(),
            by_hash: HashMap::new(),
            hash_of: vec![None; num_pages],
            lru: VecDeque::new(),
        })
    }

    /// Pages that fit in `bytes` for this layout and dtype.
    pub fn pages_for_budget(layout: KvLayout, page_size: usize, dtype: DType, bytes: usize) -> usize {
        bytes / (layout.bytes_per_token(dtype.size_in_bytes()) * page_size).max(1)
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn stats(&self) -> PoolStats {
        let total = self.refcount.len();
        PoolStats {
            total_pages: total,
            free_pages: self.free.len(),
            cached_pages: self.lru.len(),
            used_pages: total - self.free.len() - self.lru.len(),
        }
    }

    /// Pages obtainable right now (free + evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// A fresh, exclusively owned page (evicting a cached prefix page if needed).
    pub fn allocate(&mut self) -> Option<PageId> {
        let page = match self.free.pop() {
            Some(p) => p,
            None => {
                let p = self.lru.pop_front()?;
                if let Some(h) = self.hash_of[p as usize].take() {
                    self.by_hash.remove(&h);
                }
                p
            }
        };
        self.refcount[page as usize] = 1;
        Some(page)
    }

    /// Take a reference on the cached page holding `hash`, if any.
    pub fn lookup(&mut self, hash: u64) -> Option<PageId> {
        let page = *self.by_hash.get(&hash)?;
        if self.refcount[page as usize] == 0 {
            self.lru.retain(|&p| p != page);
        }
        self.refcount[page as usize] += 1;
        Some(page)
    }

    /// Register a full page's content hash for prefix reuse (first writer wins).
    pub fn register(&mut self, page: PageId, hash: u64) {
        if self.hash_of[page as usize].is_none() && !self.by_hash.contains_key(&hash) {
            self.by_hash.insert(hash, page);
            self.hash_of[page as usize] = Some(hash);
        }
    }

    pub fn release(&mut self, page: PageId) {
        let rc = &mut self.refcount[page as usize];
        debug_assert!(*rc > 0, "double free of page {page}");
        *rc = rc.saturating_sub(1);
        if *rc == 0 {
            if self.hash_of[page as usize].is_some() {
                self.lru.push_back(page);
            } else {
                self.free.push(page);
            }
        }
    }

    /// Pool rows of `positions` for a block table.
    fn rows(&self, pages: &[PageId], positions: std::ops::Range<usize>) -> Vec<u32> {
        positions.map(|p| pages[p / self.page_size] * self.page_size as u32 + (p % self.page_size) as u32).collect()
    }
}

/// A sequence's pages and committed length.
#[derive(Debug, Default, Clone)]
pub struct BlockTable {
    pub pages: Vec<PageId>,
    /// Tokens committed in the main model's layers.
    pub len: usize,
    /// Tokens committed in the MTP layer (it trails the main model by one position).
    pub mtp_len: usize,
    /// Pages at the front that are registered in the prefix cache.
    pub hashed_pages: usize,
    pub last_hash: u64,
}

impl BlockTable {
    pub fn capacity(&self, page_size: usize) -> usize {
        self.pages.len() * page_size
    }

    pub fn release(&mut self, pool: &mut PagePool) {
        for p in self.pages.drain(..) {
            pool.release(p);
        }
        *self = BlockTable::default();
    }

    /// Free the pages beyond those covering `rows` tokens (rolled-back speculative rows); pages
    /// registered in the prefix cache hold committed tokens only and are never beyond.
    pub fn truncate(&mut self, pool: &mut PagePool, rows: usize) {
        let keep = rows.div_ceil(pool.page_size()).max(self.hashed_pages);
        while self.pages.len() > keep {
            if let Some(p) = self.pages.pop() {
                pool.release(p);
            }
        }
    }

    /// Add pages until `rows` tokens fit; false (with what could be added) when the pool runs dry.
    pub fn reserve(&mut self, pool: &mut PagePool, rows: usize) -> bool {
        while self.capacity(pool.page_size()) < rows {
            match pool.allocate() {
                Some(p) => self.pages.push(p),
                None => return false,
            }
        }
        true
    }
}

/// `LatentKv` over one sequence's block table (pages must already cover what is written).
/// `Main` sees the pool's first `num_hidden_layers` layers; `Mtp` sees the MTP layer as its
/// layer 0, with its own committed length.
/// The table is borrowed from the sequence, or owned by a fork for another parallel rank.
pub struct PagedSeq<'a, T: BorrowMut<BlockTable> = &'a mut BlockTable> {
    pub pool: &'a PagePool,
    pub table: T,
    pub part: CachePart,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachePart {
    Main,
    /// The MTP layer, stored at this pool layer index.
    Mtp(usize),
}

impl<T: BorrowMut<BlockTable>> PagedSeq<'_, T> {
    fn pool_layer(&self, layer: usize) -> Result<&Tensor> {
        let l = match self.part {
            CachePart::Main => layer,
            CachePart::Mtp(at) if layer == 0 => at,
            CachePart::Mtp(_) => return Err(Error::Cache(format!("MTP cache has one layer, asked for {layer}"))),
        };
        self.pool.layers.get(l).ok_or_else(|| Error::Cache(format!("layer {l} out of range")))
    }
}

impl<T: BorrowMut<BlockTable> + Send> LatentKv for PagedSeq<'_, T> {
    fn seq_len(&self) -> usize {
        let table = self.table.borrow();
        match self.part {
            CachePart::Main => table.len,
            CachePart::Mtp(_) => table.mtp_len,
        }
    }

    fn write(&mut self, layer: usize, start: usize, rows: &Tensor) -> Result<()> {
        let n = rows.dims()[0];
        let ps = self.pool.page_size;
        let table = self.table.borrow();
        if start + n > table.capacity(ps) {
            return Err(Error::Cache(format!("write to {} beyond {} allocated slots", start + n, table.capacity(ps))));
        }
        let buf = self.pool_layer(layer)?;
        let rows = rows.to_dtype(buf.dtype()).ctx(|| "kv rows".into())?;
        // contiguous runs inside one page
        let mut p = start;
        while p < start + n {
            let run = (ps - p % ps).min(start + n - p);
            let dst = table.pages[p / ps] as usize * ps + p % ps;
            buf.slice_set(&rows.narrow(0, p - start, run).ctx(|| "kv run".into())?, 0, dst).ctx(|| "kv page write".into())?;
            p += run;
        }
        Ok(())
    }

    fn read(&self, layer: usize, len: usize) -> Result<Tensor> {
        let table = self.table.borrow();
        if len > table.capacity(self.pool.page_size) {
            return Err(Error::Cache(format!("read of {len} rows beyond the block table")));
        }
        let buf = self.pool_layer(layer)?;
        let idx = self.pool.rows(&table.pages, 0..len);
        let idx = Tensor::from_vec(idx, len, buf.device()).ctx(|| "kv gather".into())?;
        buf.index_select(&idx, 0).ctx(|| "kv gather".into())
    }

    fn paged(&self, layer: usize) -> Option<PagedRows<'_>> {
        Some(PagedRows { pool: self.pool_layer(layer).ok()?, pages: &self.table.borrow().pages, page_size: self.pool.page_size })
    }

    fn set_seq_len(&mut self, len: usize) -> Result<()> {
        let page_size = self.pool.page_size;
        let table = self.table.borrow_mut();
        if len > table.capacity(page_size) {
            return Err(Error::Cache(format!("length {len} beyond the block table")));
        }
        match self.part {
            CachePart::Main => table.len = len,
            CachePart::Mtp(_) => table.mtp_len = len,
        }
        Ok(())
    }

    /// Parallel ranks share the pool (their latent rows are identical) with their own table copy.
    fn fork<'o>(&self) -> Box<dyn LatentKv + Send + 'o>
    where
        Self: 'o,
    {
        Box::new(PagedSeq { pool: self.pool, table: self.table.borrow().clone(), part: self.part })
    }
}

impl PagePool {
    pub fn layout(&self) -> KvLayout {
        self.layout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(pages: usize) -> PagePool {
        let layout = KvLayout { num_layers: 3, latent_dim: 3, rope_dim: 1 };
        PagePool::new(layout, 2, pages, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn writes_and_reads_across_pages_and_the_mtp_layer() {
        let mut p = pool(4);
        let mut t = BlockTable::default();
        // non-contiguous pages on purpose
        let a = p.allocate().unwrap();
        let _gap = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        t.pages = vec![a, b];
        let rows = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap().reshape((3, 4)).unwrap();
        let mut main = PagedSeq { pool: &p, table: &mut t, part: CachePart::Main };
        main.write(1, 0, &rows).unwrap();
        main.set_seq_len(3).unwrap();
        let back: Vec<Vec<f32>> = main.read(1, 3).unwrap().to_vec2().unwrap();
        assert_eq!(back, rows.to_vec2::<f32>().unwrap());
        assert!(main.write(1, 3, &rows.narrow(0, 0, 2).unwrap()).is_err(), "beyond the block table");
        let mut mtp = PagedSeq { pool: &p, table: &mut t, part: CachePart::Mtp(2) };
        assert_eq!(mtp.seq_len(), 0);
        mtp.write(0, 0, &rows.narrow(0, 0, 2).unwrap()).unwrap();
        mtp.set_seq_len(2).unwrap();
        assert!(mtp.read(1, 1).is_err());
        assert_eq!((t.len, t.mtp_len), (3, 2));
    }

    #[test]
    fn prefix_pages_are_shared_cached_and_evicted_lru() {
        let mut p = pool(2);
        let a = p.allocate().unwrap();
        p.register(a, 11);
        assert_eq!(p.lookup(11), Some(a));
        p.release(a);
        assert_eq!(p.stats().used_pages, 1, "still referenced once");
        p.release(a);
        assert_eq!(p.stats(), PoolStats { total_pages: 2, free_pages: 1, cached_pages: 1, used_pages: 0 });
        // the free page goes first, then the cached one is evicted and forgotten
        let b = p.allocate().unwrap();
        let c = p.allocate().unwrap();
        assert_eq!(c, a);
        assert_ne!(b, a);
        assert_eq!(p.lookup(11), None);
        assert!(p.allocate().is_none());
    }
}
