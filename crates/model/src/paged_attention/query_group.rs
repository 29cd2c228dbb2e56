//! The unit a kernel works on, apart from the kernels so that each kernel file and the
//! dispatch in `mod.rs` can name it without importing one another.

/// The query heads of one token that share a KV head (grouped-query attention): they see the
/// same keys, so a kernel reads each key and value once for all of them.
pub struct QueryGroup<'a> {
    /// `num_rows * head_dim` values, one query head after the other.
    pub queries: &'a [f32],
    pub head_dim: usize,
    /// Keys visible to the token: positions `start..context` (`start` is 0 but for a layer
    /// with a sliding window).
    pub start: usize,
    pub context: usize,
    /// (first key, offset in the pool) of consecutive blocks, covering at least the keys
    /// `start..context`; a kernel reads only the ones that hold some of them.
    pub runs: &'a [(usize, usize)],
    pub block_size: usize,
    pub scale: f32,
}

impl QueryGroup<'_> {
    pub fn num_rows(&self) -> usize {
        self.queries.len() / self.head_dim
    }

    /// The part of the block starting at key `first_key` that the token sees, as offsets
    /// into the block (empty when none of it).
    pub fn visible(&self, first_key: usize) -> std::ops::Range<usize> {
        let end = self.context.saturating_sub(first_key).min(self.block_size);
        self.start.saturating_sub(first_key).min(end)..end
    }
}
