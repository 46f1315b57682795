//! Blocks for the unit tests of the stores and the fan-out.

use bytes::Bytes;

use super::EventBlock;

/// A block from `first_seq` with one event per size, each event that many bytes.
pub(crate) fn block(first_seq: u64, sizes: &[usize]) -> EventBlock {
    let mut bytes = Vec::new();
    let mut ends = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        bytes.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, size));
        ends.push(bytes.len() as u32);
    }
    EventBlock::new(first_seq, Bytes::from(bytes), ends).unwrap()
}

/// The first and last sequence numbers of each block.
pub(crate) fn seqs(blocks: &[EventBlock]) -> Vec<(u64, u64)> {
    blocks
        .iter()
        .map(|b| (b.first_seq(), b.last_seq()))
        .collect()
}
