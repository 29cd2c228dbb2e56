//! The unit a kernel works on, apart from the kernels so that each kernel file and the
//! dispatch in `mod.rs` can name it without importing one another.

/// The query heads of one token that share a KV head (grouped-query attention): they see the
/// same keys, so a kernel reads each key and value once for all of them.
pub struct QueryGroup<'a> {
    /// `num_rows * head_dim` values, one query head after the other.
    pub queries: &'a [f32],
    pub head_dim: usize,
    /// Keys visible to the token: positions `0..context`.
    pub context: usize,
    /// (first key, offset in the pool) of each block, covering at least `context` keys.
    pub runs: &'a [(usize, usize)],
    pub block_size: usize,
    pub scale: f32,
}

impl QueryGroup<'_> {
    pub fn num_rows(&self) -> usize {
        self.queries.len() / self.head_dim
    }
}
