//! GGUF files byte by byte, for the tests of the reader: a writer of small (and hostile)
//! files, and a walker that lists where the structural fields of a file sit, so a test can
//! break each one. Values the tests compare against come from gguf-py's fixtures, not from
//! here.

/// The ggml type numbers the tests use.
pub const F32: u32 = 0;
pub const F16: u32 = 1;
pub const Q4_0: u32 = 2;
pub const Q8_0: u32 = 8;
pub const Q4_K: u32 = 12;
pub const I32: u32 = 26;
pub const I8: u32 = 24;

/// GGUF value type numbers.
pub const T_U8: u32 = 0;
pub const T_U32: u32 = 4;
pub const T_BOOL: u32 = 7;
pub const T_STRING: u32 = 8;
pub const T_ARRAY: u32 = 9;
pub const T_U64: u32 = 10;

/// A length-prefixed GGUF string.
pub fn string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

/// A key-value pair: the key, the value type and the value's bytes as given.
pub fn kv(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
    let mut out = string(key.as_bytes());
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(value);
    out
}

pub fn kv_u32(key: &str, v: u32) -> Vec<u8> {
    kv(key, T_U32, &v.to_le_bytes())
}

pub fn kv_str(key: &str, s: &str) -> Vec<u8> {
    kv(key, T_STRING, &string(s.as_bytes()))
}

/// An array value: element type, length, then the elements' bytes as given.
pub fn array(element: u32, len: u64, elements: &[u8]) -> Vec<u8> {
    let mut out = element.to_le_bytes().to_vec();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(elements);
    out
}

/// One tensor: its info and data. `offset` overrides the offset the layout gives.
#[derive(Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: u32,
    pub data: Vec<u8>,
    pub offset: Option<u64>,
}

pub fn tensor(name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> TensorSpec {
    TensorSpec { name: name.to_string(), dims: dims.to_vec(), ty, data, offset: None }
}

/// A GGUF file: the header, the key-value pairs as given, the tensor infos, and the data
/// laid out as ggml does (each tensor padded to `alignment`). The counts can be overridden.
#[derive(Clone)]
pub struct GgufBuilder {
    pub version: u32,
    pub kvs: Vec<Vec<u8>>,
    pub tensors: Vec<TensorSpec>,
    pub alignment: u64,
    pub n_tensors: Option<u64>,
    pub n_kv: Option<u64>,
}

impl GgufBuilder {
    pub fn new() -> Self {
        GgufBuilder { version: 3, kvs: Vec::new(), tensors: Vec::new(), alignment: 32, n_tensors: None, n_kv: None }
    }

    pub fn kv(mut self, kv: Vec<u8>) -> Self {
        self.kvs.push(kv);
        self
    }

    pub fn tensor(mut self, t: TensorSpec) -> Self {
        self.tensors.push(t);
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let pad = |n: u64| n.div_ceil(self.alignment) * self.alignment;
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.n_tensors.unwrap_or(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.n_kv.unwrap_or(self.kvs.len() as u64).to_le_bytes());
        for kv in &self.kvs {
            out.extend_from_slice(kv);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            out.extend_from_slice(&string(t.name.as_bytes()));
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.to_le_bytes());
            out.extend_from_slice(&t.offset.unwrap_or(offset).to_le_bytes());
            offsets.push(offset);
            offset += pad(t.data.len() as u64);
        }
        let data_start = pad(out.len() as u64) as usize;
        out.resize(data_start, 0);
        for (t, at) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + at as usize, 0);
            out.extend_from_slice(&t.data);
        }
        out.resize(pad(out.len() as u64) as usize, 0);
        out
    }
}

/// What a structural field holds, for choosing values that break it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    Magic,
    Version,
    TensorCount,
    KvCount,
    /// A key's, a string value's or a tensor name's length.
    StringLength,
    ValueType,
    ArrayElementType,
    ArrayLength,
    DimCount,
    Dim,
    GgmlType,
    TensorOffset,
}

/// A structural field of a file: its kind, where it starts and its width in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub kind: FieldKind,
    pub at: usize,
    pub width: usize,
}

struct Walk<'a> {
    bytes: &'a [u8],
    pos: usize,
    fields: Vec<Field>,
}

impl Walk<'_> {
    fn field(&mut self, kind: FieldKind, width: usize) -> u64 {
        let mut v = [0u8; 8];
        v[..width].copy_from_slice(&self.bytes[self.pos..self.pos + width]);
        self.fields.push(Field { kind, at: self.pos, width });
        self.pos += width;
        u64::from_le_bytes(v)
    }

    fn string(&mut self) {
        let len = self.field(FieldKind::StringLength, 8);
        self.pos += len as usize;
    }

    fn value(&mut self, ty: u64) {
        match ty {
            0 | 1 | 7 => self.pos += 1,
            2 | 3 => self.pos += 2,
            4..=6 => self.pos += 4,
            10..=12 => self.pos += 8,
            8 => self.string(),
            9 => {
                let element = self.field(FieldKind::ArrayElementType, 4);
                let len = self.field(FieldKind::ArrayLength, 8);
                for _ in 0..len {
                    self.value(element);
                }
            }
            _ => panic!("the walker was given a file with value type {ty}"),
        }
    }
}

/// Every structural field of a valid GGUF file, in file order.
pub fn fields(bytes: &[u8]) -> Vec<Field> {
    let mut w = Walk { bytes, pos: 0, fields: Vec::new() };
    w.field(FieldKind::Magic, 4);
    w.field(FieldKind::Version, 4);
    let n_tensors = w.field(FieldKind::TensorCount, 8);
    let n_kv = w.field(FieldKind::KvCount, 8);
    for _ in 0..n_kv {
        w.string();
        let ty = w.field(FieldKind::ValueType, 4);
        w.value(ty);
    }
    for _ in 0..n_tensors {
        w.string();
        let n_dims = w.field(FieldKind::DimCount, 4);
        for _ in 0..n_dims {
            w.field(FieldKind::Dim, 8);
        }
        w.field(FieldKind::GgmlType, 4);
        w.field(FieldKind::TensorOffset, 8);
    }
    w.fields
}

/// Values for `field` each of which makes the file invalid, whatever else it holds.
pub fn breaking_values(field: Field, file_len: u64) -> Vec<u64> {
    use FieldKind::*;
    match field.kind {
        Magic => vec![u32::from_le_bytes(*b"GGML") as u64, u32::from_le_bytes(*b"ggjt") as u64, 0],
        Version => vec![0, 1, 4, u32::MAX as u64, 3u32.swap_bytes() as u64],
        TensorCount | KvCount | StringLength | ArrayLength => vec![u64::MAX, 1 << 63, file_len + 1, 1 << 40],
        ValueType | ArrayElementType => vec![13, 255, u32::MAX as u64],
        DimCount => vec![0, 5, u32::MAX as u64],
        Dim => vec![0, u64::MAX, 1 << 62],
        GgmlType => vec![4, 5, 31, 99, u32::MAX as u64],
        TensorOffset => vec![1, 33, u64::MAX, (file_len + 64) / 32 * 32, u64::MAX / 32 * 32],
    }
}

/// `bytes` with `field` set to `value` (cut to the field's width).
pub fn with_field(bytes: &[u8], field: Field, value: u64) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out[field.at..field.at + field.width].copy_from_slice(&value.to_le_bytes()[..field.width]);
    out
}
