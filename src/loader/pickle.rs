//! A restricted unpickler for PyTorch state dicts (`torch.save` zip archives).
//!
//! It interprets only the opcodes a state dict uses and calls nothing: the few globals a state
//! dict names (`OrderedDict`, `_rebuild_tensor_v2`, `_rebuild_parameter`, the float storage
//! types) are recognised by name and turned into plain descriptions; any other global is an
//! error. Tensor data stays in the archive's `data/<key>` entries.

use anyhow::{anyhow, bail, Result};

use super::SrcDType;

/// Where one tensor's elements live in the archive.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    pub name: String,
    pub dtype: SrcDType,
    /// Storage key: the archive entry is `<prefix>/data/<key>`.
    pub key: String,
    /// Offset into the storage, in elements.
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

#[derive(Clone, Debug)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    Storage(SrcDType),
}

#[derive(Clone, Debug)]
enum Val {
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    Bytes,
    Tuple(Vec<Val>),
    List(Vec<Val>),
    Dict(Vec<(Val, Val)>),
    Global(Global),
    Storage { dtype: SrcDType, key: String },
    Tensor(Box<TensorRef>),
    Mark,
}

const MAX_STACK: usize = 1 << 20;

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| anyhow!("pickle truncated at byte {}", self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| anyhow!("pickle truncated in GLOBAL"))?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| anyhow!("GLOBAL name is not UTF-8"))?;
        self.pos += n + 1;
        Ok(s)
    }
    fn utf8(&mut self, n: usize) -> Result<String> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| anyhow!("string is not UTF-8"))
    }
}

fn global(module: &str, name: &str) -> Result<Global> {
    Ok(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch", "FloatStorage") => Global::Storage(SrcDType::F32),
        ("torch", "HalfStorage") => Global::Storage(SrcDType::F16),
        ("torch", "BFloat16Storage") => Global::Storage(SrcDType::BF16),
        ("torch", "DoubleStorage") => Global::Storage(SrcDType::F64),
        _ => bail!("pickle refers to {module}.{name}, which a weights file has no use for; refusing to load it"),
    })
}

fn usize_of(v: &Val, what: &str) -> Result<usize> {
    match v {
        Val::Int(i) if *i >= 0 => Ok(*i as usize),
        _ => bail!("{what} is not a non-negative integer"),
    }
}

fn usizes(v: &Val, what: &str) -> Result<Vec<usize>> {
    match v {
        Val::Tuple(items) | Val::List(items) => items.iter().map(|x| usize_of(x, what)).collect(),
        _ => bail!("{what} is not a tuple"),
    }
}

fn call(f: Global, args: Vec<Val>) -> Result<Val> {
    match f {
        Global::OrderedDict => Ok(Val::Dict(vec![])),
        Global::RebuildTensor => {
            if args.len() < 4 {
                bail!("_rebuild_tensor_v2 called with {} arguments", args.len());
            }
            let (dtype, key) = match &args[0] {
                Val::Storage { dtype, key } => (*dtype, key.clone()),
                _ => bail!("_rebuild_tensor_v2 without a storage"),
            };
            let shape = usizes(&args[2], "tensor size")?;
            let stride = usizes(&args[3], "tensor stride")?;
            if shape.len() != stride.len() {
                bail!("tensor size and stride have different ranks");
            }
            Ok(Val::Tensor(Box::new(TensorRef {
                name: String::new(),
                dtype,
                key,
                offset: usize_of(&args[1], "storage offset")?,
                shape,
                stride,
            })))
        }
        Global::RebuildParameter => match args.into_iter().next() {
            Some(t @ Val::Tensor(_)) => Ok(t),
            _ => bail!("_rebuild_parameter without a tensor"),
        },
        Global::Storage(_) => bail!("a storage type was called like a function"),
    }
}

/// Parses a state-dict pickle into tensor references, in file order.
pub fn parse_state_dict(data: &[u8]) -> Result<Vec<TensorRef>> {
    let mut r = Reader { data, pos: 0 };
    let mut stack: Vec<Val> = Vec::new();
    let mut memo: std::collections::HashMap<u32, Val> = Default::default();
    let pop = |stack: &mut Vec<Val>| stack.pop().ok_or_else(|| anyhow!("pickle stack underflow"));
    let pop_mark = |stack: &mut Vec<Val>| -> Result<Vec<Val>> {
        let m = stack.iter().rposition(|v| matches!(v, Val::Mark)).ok_or_else(|| anyhow!("pickle MARK missing"))?;
        let items = stack.split_off(m + 1);
        stack.pop();
        Ok(items)
    };
    loop {
        if stack.len() > MAX_STACK {
            bail!("pickle stack too deep");
        }
        let op = r.u8()?;
        match op {
            0x80 => {
                r.u8()?;
            } // PROTO
            0x95 => {
                r.take(8)?;
            } // FRAME
            b'.' => break,
            b'(' => stack.push(Val::Mark),
            b')' => stack.push(Val::Tuple(vec![])),
            b']' => stack.push(Val::List(vec![])),
            b'}' => stack.push(Val::Dict(vec![])),
            b'N' => stack.push(Val::None),
            0x88 => stack.push(Val::Bool),
            0x89 => stack.push(Val::Bool),
            b'K' => stack.push(Val::Int(r.u8()? as i64)),
            b'M' => stack.push(Val::Int(r.u16()? as i64)),
            b'J' => stack.push(Val::Int(r.u32()? as i32 as i64)),
            0x8a => {
                let n = r.u8()? as usize;
                let bytes = r.take(n)?;
                if n > 8 {
                    bail!("integer too large in pickle");
                }
                let mut buf = if bytes.last().is_some_and(|b| b & 0x80 != 0) { [0xffu8; 8] } else { [0u8; 8] };
                buf[..n].copy_from_slice(bytes);
                stack.push(Val::Int(i64::from_le_bytes(buf)));
            }
            b'G' => {
                r.take(8)?;
                stack.push(Val::Float)
            }
            b'X' => {
                let n = r.u32()? as usize;
                stack.push(Val::Str(r.utf8(n)?))
            }
            0x8c => {
                let n = r.u8()? as usize;
                stack.push(Val::Str(r.utf8(n)?))
            }
            b'T' | b'B' => {
                let n = r.u32()? as usize;
                r.take(n)?;
                stack.push(Val::Bytes)
            }
            b'U' | b'C' => {
                let n = r.u8()? as usize;
                r.take(n)?;
                stack.push(Val::Bytes)
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                stack.push(Val::Global(global(module, name)?));
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (module, name) {
                    (Val::Str(m), Val::Str(n)) => stack.push(Val::Global(global(&m, &n)?)),
                    _ => bail!("STACK_GLOBAL needs two strings"),
                }
            }
            b'q' => {
                let k = r.u8()? as u32;
                memo.insert(k, stack.last().cloned().ok_or_else(|| anyhow!("BINPUT on empty stack"))?);
            }
            b'r' => {
                let k = r.u32()?;
                memo.insert(k, stack.last().cloned().ok_or_else(|| anyhow!("LONG_BINPUT on empty stack"))?);
            }
            0x94 => {
                let k = memo.len() as u32;
                memo.insert(k, stack.last().cloned().ok_or_else(|| anyhow!("MEMOIZE on empty stack"))?);
            }
            b'h' | b'j' => {
                let k = if op == b'h' { r.u8()? as u32 } else { r.u32()? };
                stack.push(memo.get(&k).cloned().ok_or_else(|| anyhow!("pickle memo {k} missing"))?);
            }
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Val::Tuple(items))
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    bail!("pickle stack underflow");
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Val::Tuple(items));
            }
            b'0' => {
                pop(&mut stack)?;
            }
            b'1' => {
                pop_mark(&mut stack)?;
            }
            b'2' => {
                let top = stack.last().cloned().ok_or_else(|| anyhow!("DUP on empty stack"))?;
                stack.push(top);
            }
            b'a' => {
                let v = pop(&mut stack)?;
                match stack.last_mut() {
                    Some(Val::List(l)) => l.push(v),
                    _ => bail!("APPEND to a non-list"),
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                match stack.last_mut() {
                    Some(Val::List(l)) => l.extend(items),
                    _ => bail!("APPENDS to a non-list"),
                }
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    let v = pop(&mut stack)?;
                    let k = pop(&mut stack)?;
                    vec![k, v]
                } else {
                    pop_mark(&mut stack)?
                };
                if items.len() % 2 != 0 {
                    bail!("SETITEMS with an odd number of items");
                }
                match stack.last_mut() {
                    Some(Val::Dict(d)) => {
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                    _ => bail!("SETITEM on a non-dict"),
                }
            }
            b'b' => {
                // BUILD sets object state (a state dict's `_metadata`); nothing to keep.
                pop(&mut stack)?;
                if stack.is_empty() {
                    bail!("BUILD on empty stack");
                }
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                let Val::Tuple(items) = pid else { bail!("persistent id is not a tuple") };
                match items.as_slice() {
                    [Val::Str(tag), Val::Global(Global::Storage(dtype)), Val::Str(key), ..] if tag == "storage" => {
                        stack.push(Val::Storage { dtype: *dtype, key: key.clone() })
                    }
                    _ => bail!("unsupported persistent id (expected a float storage)"),
                }
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let f = pop(&mut stack)?;
                let (Val::Global(g), Val::Tuple(args)) = (f, args) else {
                    bail!("REDUCE needs a known global and a tuple")
                };
                stack.push(call(g, args)?);
            }
            _ => bail!("unsupported pickle opcode 0x{op:02x} at byte {}", r.pos - 1),
        }
    }
    let top = stack.pop().ok_or_else(|| anyhow!("pickle is empty"))?;
    let Val::Dict(items) = top else { bail!("pickle does not hold a state dict") };
    let mut out = Vec::with_capacity(items.len());
    for (k, v) in items {
        // Entries other than named tensors (ints, floats, None) are not weights.
        let (Val::Str(name), Val::Tensor(mut t)) = (k, v) else { continue };
        t.name = name;
        out.push(*t);
    }
    Ok(out)
}
