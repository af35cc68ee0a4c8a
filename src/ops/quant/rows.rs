//! A band of rows of a quantized weight as a weight of its own, copied on its device: what a
//! product over a slice of `out` (one vocabulary chunk of an LM head) runs on, so the whole
//! weight is never decoded and no kernel needs a row offset.

use super::{NF4_BLOCK, NF4_NESTED_BLOCK, Nf4Layout, QTensor, QuantFormat, pad4};
use crate::tensor::RawBuffer;
use crate::{Error, Result};
use std::sync::Arc;

impl QTensor {
    /// The row count every band's first row must be a multiple of: 4 keeps each copied
    /// region on the 4-byte boundaries WebGPU copies need; double-quantised NF4 also starts a
    /// band on a nested block (256 absmax blocks of 64 weights).
    pub(crate) fn row_band_alignment(&self) -> usize {
        match self.format {
            QuantFormat::Nf4DoubleQuant => {
                let per_row = (self.cols / NF4_BLOCK).max(1);
                let rows = NF4_NESTED_BLOCK / gcd(NF4_NESTED_BLOCK, per_row);
                rows.div_ceil(4) * 4
            }
            _ => 4,
        }
    }

    /// Rows `r0..r1` as a `[r1 − r0, in]` weight on the same device. `r0` must be a multiple
    /// of [`QTensor::row_band_alignment`].
    pub(crate) fn row_band(&self, r0: usize, r1: usize) -> Result<QTensor> {
        if r0 > r1 || r1 > self.rows || !r0.is_multiple_of(self.row_band_alignment()) {
            return Err(Error::InvalidArgument(format!(
                "rows {r0}..{r1} of a {} weight with {} rows (a band starts on a multiple of {})",
                self.format,
                self.rows,
                self.row_band_alignment()
            )));
        }
        let rows = r1 - r0;
        // (source offset, bytes) of each part, and the band's layout.
        let mut parts: Vec<(usize, usize)> = Vec::new();
        let layout = match self.format {
            QuantFormat::Q8_0 | QuantFormat::Q4_0 | QuantFormat::Q4_1 => {
                let row_bytes = self.cols / 32 * self.format.ggml_block_bytes().unwrap_or(0);
                parts.push((r0 * row_bytes, rows * row_bytes));
                Nf4Layout::ggml()
            }
            QuantFormat::Nf4 | QuantFormat::Nf4DoubleQuant => {
                let l = self.layout;
                let (b0, blocks) = (r0 * self.cols / NF4_BLOCK, rows * self.cols / NF4_BLOCK);
                let packed = rows * self.cols / 2;
                parts.push((r0 * self.cols / 2, packed));
                if self.format == QuantFormat::Nf4 {
                    parts.push((l.absmax_offset + 4 * b0, 4 * blocks));
                    Nf4Layout { absmax_offset: packed, nested_offset: 0, code_offset: 0, offset: 0.0 }
                } else {
                    let nested_offset = pad4(packed + blocks);
                    let nested = blocks.div_ceil(NF4_NESTED_BLOCK);
                    parts.push((l.absmax_offset + b0, blocks));
                    parts.push((l.nested_offset + 4 * (b0 / NF4_NESTED_BLOCK), 4 * nested));
                    parts.push((l.code_offset, 4 * 256));
                    Nf4Layout {
                        absmax_offset: packed,
                        nested_offset,
                        code_offset: nested_offset + 4 * nested,
                        offset: l.offset,
                    }
                }
            }
        };
        // Each part starts on a 4-byte boundary of the band.
        let mut at = 0;
        let placed: Vec<(usize, usize, usize)> = parts
            .into_iter()
            .map(|(src, len)| {
                let dst = pad4(at);
                at = dst + len;
                (src, dst, len)
            })
            .collect();
        let total = at;
        let data = match self.raw() {
            RawBuffer::Cpu(bytes) => {
                let mut out = crate::tensor::try_zeros::<u8>(total)?;
                for &(src, dst, len) in &placed {
                    out[dst..dst + len].copy_from_slice(&bytes[src..src + len]);
                }
                RawBuffer::Cpu(out)
            }
            #[cfg(feature = "cuda")]
            RawBuffer::Cuda { dev, buf, .. } => {
                let mut out = dev.alloc(total)?;
                for &(src, dst, len) in placed.iter().filter(|p| p.2 > 0) {
                    dev.copy_region(buf, src, &mut out, dst, len)?;
                }
                RawBuffer::Cuda { dev: dev.clone(), buf: out, len: total }
            }
            #[cfg(feature = "wgpu")]
            RawBuffer::Wgpu { dev, buf, .. } => {
                let out = dev.alloc(total)?;
                // Whole words: a part's last word may carry bytes past it, which the next
                // part (4-byte aligned) overwrites or which lie past the band's end. Every
                // source offset is a multiple of 4 by the band alignment; the source buffer
                // holds whole pool buckets, so a rounded-up read stays inside it.
                for &(src, dst, len) in placed.iter().filter(|p| p.2 > 0) {
                    dev.copy_region(buf, src, &out, dst, pad4(len))?;
                }
                RawBuffer::Wgpu { dev: dev.clone(), buf: out, len: total }
            }
        };
        Ok(QTensor { rows, data: Arc::new(data), layout, ..self.clone() })
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use crate::ops::quant::{QTensor, QuantFormat};
    use crate::{DType, Device, Tensor};

    #[test]
    fn a_band_decodes_to_the_same_rows_in_every_format() {
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0, QuantFormat::Nf4, QuantFormat::Nf4DoubleQuant] {
            let (rows, cols) = (301, 192);
            let w = Tensor::randn(&[rows, cols], 0.0, 1.0, 5, DType::F32, &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, format).unwrap();
            let whole = q.dequantize(DType::F32).unwrap().to_vec_f32().unwrap();
            let step = q.row_band_alignment() * 2;
            let mut r0 = 0;
            while r0 < rows {
                let r1 = (r0 + step).min(rows);
                let band = q.row_band(r0, r1).unwrap().dequantize(DType::F32).unwrap().to_vec_f32().unwrap();
                assert_eq!(band, whole[r0 * cols..r1 * cols], "{format} rows {r0}..{r1}");
                r0 = r1;
            }
            assert!(q.row_band(1, 5).is_err() || q.row_band_alignment() == 1);
        }
    }
}
