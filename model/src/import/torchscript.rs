//! Every tensor of a TorchScript archive: parameters and buffers.
//!
//! OpenAI ships CLIP as TorchScript (`RN50.pt`, `ViT-B-16.pt`). tch lists a
//! loaded module's parameters but not its buffers, and a ResNet's BatchNorm
//! running statistics are buffers, so the archive is read here instead. It is
//! a zip: `<name>/data.pkl` is the module tree pickled (protocol 2) by
//! TorchScript's pickler (`torch/csrc/jit/serialization/pickler.cpp`), each
//! module an object whose state maps attribute names to values, each tensor a
//! `torch._utils._rebuild_tensor_v2` call on a storage `<name>/data/<key>`.
//! The unpickler below only builds values: it imports and runs nothing, and
//! rejects opcodes it does not know.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

use tch::{Kind, Tensor};

/// How deep module trees may nest (CLIP's are under ten levels).
const MAX_DEPTH: usize = 64;

/// Every tensor attribute of the archive's module tree, named by its path
/// (`visual.bn1.running_mean`), as in the module's `state_dict()`.
pub(crate) fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| format!("not a zip: {e}"))?;
    // The archive's entries all sit in one top folder, named after the file when saved.
    let pickle_name = zip
        .file_names()
        .find(|name| name.split('/').count() == 2 && name.ends_with("/data.pkl"))
        .map(str::to_owned)
        .ok_or("no <name>/data.pkl: not a TorchScript archive")?;
    let prefix = pickle_name.trim_end_matches("data.pkl").to_owned();
    let pickle = read_entry(&mut zip, &pickle_name)?;
    let root = Unpickler::default().run(&pickle)?;
    let mut found = Vec::new();
    collect_tensors(&root, "", 0, &mut found)?;
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    let mut out = Vec::with_capacity(found.len());
    for (name, t) in found {
        let storage = match storages.get(&t.storage.key) {
            Some(s) => s.shallow_clone(),
            None => {
                let s = read_storage(&mut zip, &prefix, &t.storage)?;
                storages.insert(t.storage.key.clone(), s.shallow_clone());
                s
            }
        };
        out.push((
            name.clone(),
            t.view_of(&storage).map_err(|e| format!("{name}: {e}"))?,
        ));
    }
    Ok(out)
}

fn read_entry(zip: &mut zip::ZipArchive<File>, name: &str) -> Result<Vec<u8>, String> {
    let mut entry = zip.by_name(name).map_err(|e| format!("{name}: {e}"))?;
    // No capacity from the header's size: the file is not trusted.
    let mut bytes = Vec::new();
    entry
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{name}: {e}"))?;
    Ok(bytes)
}

/// A storage as a flat tensor of its `numel` elements.
fn read_storage(zip: &mut zip::ZipArchive<File>, prefix: &str, s: &StorageRef) -> Result<Tensor, String> {
    let name = format!("{prefix}data/{}", s.key);
    let bytes = read_entry(zip, &name)?;
    let len = s
        .numel
        .checked_mul(s.kind.elt_size_in_bytes())
        .filter(|&len| len <= bytes.len())
        .ok_or_else(|| {
            format!(
                "{name}: {} bytes, fewer than {} {:?} elements",
                bytes.len(),
                s.numel,
                s.kind
            )
        })?;
    Tensor::f_from_data_size(&bytes[..len], &[s.numel as i64], s.kind).map_err(|e| format!("{name}: {e}"))
}

/// A pickled storage: `('storage', torch.<Kind>Storage, key, location, numel)`.
#[derive(Debug)]
struct StorageRef {
    kind: Kind,
    key: String,
    numel: usize,
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, ...)`.
#[derive(Debug)]
struct TensorRef {
    storage: Rc<StorageRef>,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

impl TensorRef {
    /// The tensor, copied out of its storage.
    fn view_of(&self, storage: &Tensor) -> Result<Tensor, String> {
        if self.size.len() != self.stride.len() || self.size.iter().chain(&self.stride).any(|&d| d < 0) {
            return Err(format!(
                "size {:?} and stride {:?} do not fit",
                self.size, self.stride
            ));
        }
        let last = self
            .size
            .iter()
            .zip(&self.stride)
            .map(|(&n, &s)| (n - 1).max(0) * s)
            .sum::<i64>()
            + self.offset;
        let empty = self.size.contains(&0);
        if self.offset < 0 || (!empty && last >= self.storage.numel as i64) {
            return Err(format!(
                "reaches element {last} of a storage of {}",
                self.storage.numel
            ));
        }
        storage
            .f_as_strided(&self.size, &self.stride, Some(self.offset))
            .and_then(|t| t.f_contiguous())
            .map_err(|e| e.to_string())
    }
}

/// The values the TorchScript pickler writes.
#[derive(Debug, Clone)]
enum Value {
    /// Only ever on the stack, between MARK and the opcode that pops to it.
    Mark,
    /// None, a bool or a float: read past, never looked into.
    Scalar,
    Int(i64),
    Str(Rc<str>),
    Tuple(Rc<[Value]>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// A `module.name` from GLOBAL.
    Global(Rc<str>),
    /// A TorchScript object (a module): its class and its state.
    Object(Rc<RefCell<(Rc<str>, Value)>>),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
    /// What a call this reader does not model returned; never looked into.
    Opaque,
}

#[derive(Debug, Default)]
struct Unpickler {
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

/// Reads little-endian fields from the pickle.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.bytes.len());
        let end = end.ok_or("data.pkl ends inside an opcode")?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn line(&mut self) -> Result<&'a str, String> {
        let rest = &self.bytes[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("GLOBAL without a newline")?;
        let text = std::str::from_utf8(&rest[..n]).map_err(|e| e.to_string())?;
        self.pos += n + 1;
        Ok(text)
    }

    fn utf8(&mut self, n: usize) -> Result<Rc<str>, String> {
        let bytes = self.take(n)?;
        std::str::from_utf8(bytes)
            .map(Rc::from)
            .map_err(|e| e.to_string())
    }
}

impl Unpickler {
    fn pop(&mut self) -> Result<Value, String> {
        self.stack
            .pop()
            .ok_or_else(|| "data.pkl pops an empty stack".to_owned())
    }

    /// The values pushed since the last MARK, which is removed.
    fn pop_to_mark(&mut self) -> Result<Vec<Value>, String> {
        let mark = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("data.pkl has no MARK to pop to")?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top(&self) -> Result<&Value, String> {
        self.stack
            .last()
            .ok_or_else(|| "data.pkl reads an empty stack".to_owned())
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<(), String> {
        let Value::Dict(dict) = self.top()? else {
            return Err("SETITEMS on a non-dict".to_owned());
        };
        let mut dict = dict.borrow_mut();
        let mut items = items.into_iter();
        while let (Some(k), Some(v)) = (items.next(), items.next()) {
            dict.push((k, v));
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> Result<(), String> {
        match self.top()? {
            Value::List(list) => {
                list.borrow_mut().extend(items);
                Ok(())
            }
            _ => Err("APPENDS on a non-list".to_owned()),
        }
    }

    fn run(mut self, bytes: &[u8]) -> Result<Value, String> {
        let mut r = Cursor { bytes, pos: 0 };
        loop {
            let op = r.u8()?;
            match op {
                0x80 => {
                    r.u8()?; // PROTO n
                }
                b'.' => return self.pop(), // STOP
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::Scalar),
                0x88 | 0x89 => self.stack.push(Value::Scalar),
                b'K' => {
                    let v = r.u8()?;
                    self.stack.push(Value::Int(v.into()));
                }
                b'M' => {
                    let v = r.u16()?;
                    self.stack.push(Value::Int(v.into()));
                }
                b'J' => {
                    let v = r.u32()? as i32;
                    self.stack.push(Value::Int(v.into()));
                }
                0x8a => {
                    // LONG1: n little-endian two's-complement bytes
                    let n = usize::from(r.u8()?);
                    let b = r.take(n)?;
                    if n > 8 {
                        return Err("LONG1 wider than 64 bits".to_owned());
                    }
                    let fill = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        0xFF
                    } else {
                        0
                    };
                    let mut le = [fill; 8];
                    le[..n].copy_from_slice(b);
                    self.stack.push(Value::Int(i64::from_le_bytes(le)));
                }
                b'G' => {
                    r.take(8)?; // BINFLOAT
                    self.stack.push(Value::Scalar);
                }
                b'X' => {
                    let n = r.u32()? as usize;
                    let s = r.utf8(n)?;
                    self.stack.push(Value::Str(s));
                }
                0x8c => {
                    let n = usize::from(r.u8()?);
                    let s = r.utf8(n)?;
                    self.stack.push(Value::Str(s));
                }
                b')' => self.stack.push(Value::Tuple(Rc::from(Vec::new()))),
                b't' => {
                    let items = self.pop_to_mark()?;
                    self.stack.push(Value::Tuple(Rc::from(items)));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let at = self.stack.len().checked_sub(n).ok_or("TUPLEn on a short stack")?;
                    let items = self.stack.split_off(at);
                    self.stack.push(Value::Tuple(Rc::from(items)));
                }
                b']' => self.stack.push(Value::List(Rc::default())),
                b'l' => {
                    let items = self.pop_to_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_to_mark()?;
                    self.append(items)?;
                }
                b'}' => self.stack.push(Value::Dict(Rc::default())),
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_to_mark()?;
                    self.set_items(items)?;
                }
                b'q' => {
                    let i = r.u8()?;
                    self.memo.insert(i.into(), self.top()?.clone());
                }
                b'r' => {
                    let i = r.u32()?;
                    self.memo.insert(i, self.top()?.clone());
                }
                0x94 => {
                    // MEMOIZE
                    let i = self.memo.len() as u32;
                    self.memo.insert(i, self.top()?.clone());
                }
                b'h' | b'j' => {
                    let i = if op == b'h' { r.u8()?.into() } else { r.u32()? };
                    let v = self.memo.get(&i).ok_or_else(|| format!("memo {i} is unset"))?;
                    self.stack.push(v.clone());
                }
                b'c' => {
                    let module = r.line()?;
                    let name = r.line()?;
                    self.stack.push(Value::Global(format!("{module}.{name}").into()));
                }
                0x81 => {
                    // NEWOBJ: cls(*args), a TorchScript object whose state BUILD sets.
                    let _args = self.pop()?;
                    let Value::Global(class) = self.pop()? else {
                        return Err("NEWOBJ on a non-class".to_owned());
                    };
                    self.stack
                        .push(Value::Object(Rc::new(RefCell::new((class, Value::Scalar)))));
                }
                b'b' => {
                    let state = self.pop()?;
                    match self.top()? {
                        Value::Object(obj) => obj.borrow_mut().1 = state,
                        _ => return Err("BUILD on a non-object".to_owned()),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(Value::Storage(Rc::new(storage_ref(&pid)?)));
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.stack.push(reduce(&callable, &args)?);
                }
                0x95 => {
                    r.take(8)?; // FRAME n: framing only
                }
                other => return Err(format!("data.pkl: unsupported pickle opcode 0x{other:02x}")),
            }
        }
    }
}

/// BINPERSID's id for a storage: `('storage', torch.HalfStorage, '0', 'cpu', 32)`.
fn storage_ref(pid: &Value) -> Result<StorageRef, String> {
    let Value::Tuple(parts) = pid else {
        return Err("persistent id is not a tuple".to_owned());
    };
    match &parts[..] {
        [
            Value::Str(tag),
            Value::Global(class),
            Value::Str(key),
            _,
            Value::Int(numel),
        ] if &**tag == "storage" => {
            let kind = match class.strip_prefix("torch.") {
                Some("HalfStorage") => Kind::Half,
                Some("FloatStorage") => Kind::Float,
                Some("DoubleStorage") => Kind::Double,
                Some("BFloat16Storage") => Kind::BFloat16,
                Some("LongStorage") => Kind::Int64,
                Some("IntStorage") => Kind::Int,
                Some("ShortStorage") => Kind::Int16,
                Some("CharStorage") => Kind::Int8,
                Some("ByteStorage") => Kind::Uint8,
                Some("BoolStorage") => Kind::Bool,
                _ => return Err(format!("storage of unsupported type {class}")),
            };
            let numel = usize::try_from(*numel).map_err(|_| format!("storage of {numel} elements"))?;
            Ok(StorageRef {
                kind,
                key: key.to_string(),
                numel,
            })
        }
        _ => Err(format!("persistent id {pid:?} is not a storage")),
    }
}

/// REDUCE: the calls the pickler writes. Tensors are rebuilt; other calls
/// give an opaque value (the module tree never holds a tensor inside one).
fn reduce(callable: &Value, args: &Value) -> Result<Value, String> {
    let Value::Global(name) = callable else {
        return Err("REDUCE on a non-global".to_owned());
    };
    let Value::Tuple(args) = args else {
        return Err(format!("{name} called without an argument tuple"));
    };
    let ints = |v: &Value| -> Result<Vec<i64>, String> {
        let Value::Tuple(items) = v else {
            return Err(format!("{name}: size or stride is not a tuple"));
        };
        items
            .iter()
            .map(|i| match i {
                Value::Int(i) => Ok(*i),
                _ => Err(format!("{name}: a size or stride is not an int")),
            })
            .collect()
    };
    Ok(match &**name {
        "torch._utils._rebuild_tensor_v2" => match &args[..] {
            [Value::Storage(storage), Value::Int(offset), size, stride, ..] => {
                Value::Tensor(Rc::new(TensorRef {
                    storage: storage.clone(),
                    offset: *offset,
                    size: ints(size)?,
                    stride: ints(stride)?,
                }))
            }
            _ => return Err(format!("{name} with unexpected arguments")),
        },
        "collections.OrderedDict" => Value::Dict(Rc::default()),
        // TorchScript's typed containers (`build_intlist`, `restore_type_tag`, ...)
        // wrap the plain value they are given first.
        n if n.starts_with("torch.jit._pickle.") => args.first().cloned().unwrap_or(Value::Scalar),
        _ => Value::Opaque,
    })
}

/// Walks the module tree: every tensor attribute, named by its path.
fn collect_tensors(
    value: &Value,
    prefix: &str,
    depth: usize,
    out: &mut Vec<(String, Rc<TensorRef>)>,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("modules nest deeper than {MAX_DEPTH} at {prefix}"));
    }
    let state = match value {
        Value::Object(obj) => obj.borrow().1.clone(),
        other => other.clone(),
    };
    let Value::Dict(attributes) = state else {
        return Ok(());
    };
    for (key, value) in attributes.borrow().iter() {
        let Value::Str(key) = key else { continue };
        match value {
            Value::Tensor(t) => out.push((format!("{prefix}{key}"), t.clone())),
            Value::Object(_) => collect_tensors(value, &format!("{prefix}{key}."), depth + 1, out)?,
            _ => {}
        }
    }
    Ok(())
}
