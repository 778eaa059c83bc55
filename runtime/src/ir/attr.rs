//! Node attributes, as ONNX defines them (minus subgraphs, which no supported op takes).

use std::collections::BTreeMap;
use std::fmt;

use crate::error::OpError;
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub enum Attr {
    Int(i64),
    Float(f32),
    String(String),
    Tensor(Tensor),
    Ints(Vec<i64>),
    Floats(Vec<f32>),
    Strings(Vec<String>),
}

impl Attr {
    fn kind(&self) -> &'static str {
        match self {
            Attr::Int(_) => "int",
            Attr::Float(_) => "float",
            Attr::String(_) => "string",
            Attr::Tensor(_) => "tensor",
            Attr::Ints(_) => "ints",
            Attr::Floats(_) => "floats",
            Attr::Strings(_) => "strings",
        }
    }
}

/// Attributes by name, sorted so that printing is deterministic.
#[derive(Clone, Debug, Default)]
pub struct Attrs(pub BTreeMap<String, Attr>);

impl Attrs {
    pub fn new() -> Attrs {
        Attrs::default()
    }

    pub fn with(mut self, name: &str, value: Attr) -> Attrs {
        self.0.insert(name.to_string(), value);
        self
    }

    pub fn get(&self, name: &str) -> Option<&Attr> {
        self.0.get(name)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn wrong(name: &str, want: &str, got: &Attr) -> OpError {
        OpError::BadAttr {
            name: name.to_string(),
            msg: format!("expected {want}, found {}", got.kind()),
        }
    }

    pub fn int(&self, name: &str) -> Result<Option<i64>, OpError> {
        match self.get(name) {
            None => Ok(None),
            Some(Attr::Int(v)) => Ok(Some(*v)),
            Some(a) => Err(Self::wrong(name, "int", a)),
        }
    }

    pub fn int_or(&self, name: &str, default: i64) -> Result<i64, OpError> {
        Ok(self.int(name)?.unwrap_or(default))
    }

    pub fn req_int(&self, name: &str) -> Result<i64, OpError> {
        self.int(name)?
            .ok_or_else(|| OpError::MissingAttr(name.to_string()))
    }

    pub fn float(&self, name: &str) -> Result<Option<f32>, OpError> {
        match self.get(name) {
            None => Ok(None),
            Some(Attr::Float(v)) => Ok(Some(*v)),
            Some(a) => Err(Self::wrong(name, "float", a)),
        }
    }

    pub fn float_or(&self, name: &str, default: f32) -> Result<f32, OpError> {
        Ok(self.float(name)?.unwrap_or(default))
    }

    pub fn string(&self, name: &str) -> Result<Option<&str>, OpError> {
        match self.get(name) {
            None => Ok(None),
            Some(Attr::String(v)) => Ok(Some(v)),
            Some(a) => Err(Self::wrong(name, "string", a)),
        }
    }

    pub fn ints(&self, name: &str) -> Result<Option<&[i64]>, OpError> {
        match self.get(name) {
            None => Ok(None),
            Some(Attr::Ints(v)) => Ok(Some(v)),
            Some(a) => Err(Self::wrong(name, "ints", a)),
        }
    }

    pub fn floats(&self, name: &str) -> Result<Option<&[f32]>, OpError> {
        match self.get(name) {
            None => Ok(None),
            Some(Attr::Floats(v)) => Ok(Some(v)),
            // The text form cannot tell an empty list's element type.
            Some(Attr::Ints(v)) if v.is_empty() => Ok(Some(&[])),
            Some(a) => Err(Self::wrong(name, "floats", a)),
        }
    }

    pub fn tensor(&self, name: &str) -> Result<Option<&Tensor>, OpError> {
        match self.get(name) {
            None => Ok(None),
            Some(Attr::Tensor(v)) => Ok(Some(v)),
            Some(a) => Err(Self::wrong(name, "tensor", a)),
        }
    }
}

impl fmt::Display for Attr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn list<T: fmt::Display>(f: &mut fmt::Formatter<'_>, v: &[T]) -> fmt::Result {
            f.write_str("[")?;
            for (i, x) in v.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{x}")?;
            }
            f.write_str("]")
        }
        match self {
            Attr::Int(v) => write!(f, "{v}"),
            Attr::Float(v) => write!(f, "{v:?}"),
            Attr::String(s) => write!(f, "{s:?}"),
            Attr::Tensor(t) => {
                write!(f, "tensor<{}{:?}>", t.dtype(), t.shape())?;
                if t.len() <= 8 {
                    if let Ok(v) = t.to_f64_vec() {
                        write!(f, " ")?;
                        list(f, &v)?;
                    }
                }
                Ok(())
            }
            Attr::Ints(v) => list(f, v),
            Attr::Floats(v) => {
                let v: Vec<String> = v.iter().map(|x| format!("{x:?}")).collect();
                list(f, &v)
            }
            Attr::Strings(v) => {
                let v: Vec<String> = v.iter().map(|x| format!("{x:?}")).collect();
                list(f, &v)
            }
        }
    }
}
