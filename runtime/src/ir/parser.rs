//! Reads the text form that [`super::printer`] writes back into a [`Graph`].
//!
//! Every node is rebuilt through the op registry, and the type each node line declares must
//! be the one inference gives (so a hand-edited line that no longer fits is named). The text
//! form holds the values of small constants only (up to 8 elements); larger constants and
//! tensor attributes come back as zeros of their declared type, so a parsed graph has the
//! structure, types and shape arithmetic of the printed one, not its weights. Printing a
//! parsed graph gives the text it was parsed from when that text came from the printer.
//!
//! Names are read as the printer writes them: a value name is a run of characters other than
//! white space and `,()[]{}"#%=` (so names holding those cannot come back, and are refused).

use std::str::FromStr;

use super::{Attr, Attrs, Def, Graph, InputRole, OutputRole, TensorType};
use crate::dim::{Dim, Shape};
use crate::dtype::DType;
use crate::ops::OpRegistry;
use crate::tensor::Tensor;

/// Largest total of placeholder (zero) bytes a parse may allocate for constants and tensor
/// attributes whose values the text does not hold.
pub const MAX_PLACEHOLDER_BYTES: usize = 1 << 30;

/// A line of the text form that does not parse, or a graph it describes that cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("IR text, line {line}: {msg}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    pub msg: String,
}

/// Parses the text form of one graph (see the module docs).
pub fn parse(text: &str, registry: &OpRegistry) -> Result<Graph, ParseError> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty());
    let (line, header) = lines.next().ok_or_else(|| ParseError {
        line: 1,
        msg: "empty text: expected `graph \"NAME\" opset N {`".into(),
    })?;
    let mut graph = header_line(header).map_err(|msg| ParseError { line, msg })?;
    let mut builder = Builder {
        graph: &mut graph,
        registry,
        placeholder_bytes: 0,
        outputs: Vec::new(),
    };
    let mut closed = false;
    for (line, text) in lines {
        if closed {
            return Err(ParseError {
                line,
                msg: "text after the closing `}`".into(),
            });
        }
        let body = text.trim();
        if body == "}" {
            closed = true;
            continue;
        }
        builder.line(body).map_err(|msg| ParseError { line, msg })?;
    }
    if !closed {
        return Err(ParseError {
            line: text.lines().count().max(1),
            msg: "missing the closing `}`".into(),
        });
    }
    let outputs = std::mem::take(&mut builder.outputs);
    graph.set_outputs(outputs);
    Ok(graph)
}

fn header_line(text: &str) -> Result<Graph, String> {
    let mut c = Cursor::new(text.trim());
    c.keyword("graph ")?;
    let name = c.string()?;
    c.keyword(" opset ")?;
    let opset = c.integer()?;
    c.keyword(" {")?;
    c.end()?;
    Ok(Graph::new(name, opset))
}

struct Builder<'a> {
    graph: &'a mut Graph,
    registry: &'a OpRegistry,
    placeholder_bytes: usize,
    outputs: Vec<(super::ValueId, OutputRole)>,
}

impl Builder<'_> {
    fn line(&mut self, body: &str) -> Result<(), String> {
        let mut c = Cursor::new(body);
        if c.eat("input ") {
            let (name, ty) = c.definition()?;
            c.keyword("  # ")?;
            let label = c.rest();
            let role = InputRole::from_label(label)
                .ok_or_else(|| format!("unknown input role `{label}`"))?;
            self.graph
                .add_input(name, ty, role)
                .map_err(|e| e.to_string())?;
            return Ok(());
        }
        if c.eat("const ") {
            let (name, ty) = c.definition()?;
            let values = if c.eat(" = ") {
                Some(c.numbers()?)
            } else {
                None
            };
            c.end()?;
            let t = self.tensor(&ty, values.as_deref())?;
            self.graph.add_const(name, t).map_err(|e| e.to_string())?;
            return Ok(());
        }
        if c.eat("output ") {
            let (name, ty) = c.definition()?;
            let id = self
                .graph
                .value_by_name(&name)
                .ok_or_else(|| format!("output `%{name}` is not defined"))?;
            let value = self.graph.value(id);
            let source = if c.eat(" (input)") {
                Some("input")
            } else if c.eat(" (const)") {
                Some("const")
            } else {
                None
            };
            let actual = match value.def {
                Def::Input(_) => Some("input"),
                Def::Const(_) => Some("const"),
                _ => None,
            };
            if source != actual {
                return Err(format!(
                    "output `%{name}` is marked {} but is {}",
                    source.unwrap_or("as a node's"),
                    actual.unwrap_or("a node's")
                ));
            }
            if value.ty != ty {
                return Err(format!(
                    "output `%{name}` is declared {ty} but the value is {}",
                    value.ty
                ));
            }
            c.keyword("  # ")?;
            let label = c.rest();
            let role = OutputRole::from_label(label)
                .ok_or_else(|| format!("unknown output role `{label}`"))?;
            self.outputs.push((id, role));
            return Ok(());
        }
        self.node(c)
    }

    fn node(&mut self, mut c: Cursor<'_>) -> Result<(), String> {
        let mut outputs = vec![c.definition()?];
        while c.eat(", ") {
            outputs.push(c.definition()?);
        }
        c.keyword(" = ")?;
        let op = c.take_while(|ch| ch != '(');
        let (domain, op_type) = op.rsplit_once('.').unwrap_or(("", op));
        if op_type.is_empty() || !op_type.chars().all(|ch| ch.is_alphanumeric() || ch == '_') {
            return Err(format!("`{op}` is not an op name"));
        }
        c.keyword("(")?;
        let mut inputs = Vec::new();
        if !c.eat(")") {
            loop {
                if c.eat("_") {
                    inputs.push(None);
                } else {
                    c.keyword("%")?;
                    let name = c.name();
                    let id = self
                        .graph
                        .value_by_name(name)
                        .ok_or_else(|| format!("input `%{name}` is used before it is defined"))?;
                    inputs.push(Some(id));
                }
                if c.eat(")") {
                    break;
                }
                c.keyword(", ")?;
            }
        }
        let mut attrs = Attrs::new();
        if c.eat(" {") {
            loop {
                let key = c.take_while(|ch| !ch.is_whitespace() && !"=,{}".contains(ch));
                if key.is_empty() {
                    return Err(c.expected("an attribute name"));
                }
                let key = key.to_string();
                c.keyword(" = ")?;
                let value = self.attr(&mut c)?;
                if attrs.0.insert(key.clone(), value).is_some() {
                    return Err(format!("attribute `{key}` is given twice"));
                }
                if c.eat("}") {
                    break;
                }
                c.keyword(", ")?;
            }
        }
        let mut syms = Vec::new();
        if c.eat(" -> ") {
            syms.push(c.shape()?);
            while c.eat(", ") {
                syms.push(c.shape()?);
            }
        }
        let node_name = if c.eat("  # ") { c.rest() } else { "" };
        c.end()?;
        if syms.len() > outputs.len() {
            return Err(format!(
                "{} symbolic contents for {} outputs",
                syms.len(),
                outputs.len()
            ));
        }
        let names = outputs.iter().map(|(n, _)| n.clone()).collect();
        let ids = self
            .graph
            .add_node(
                self.registry,
                node_name,
                domain,
                op_type,
                attrs,
                inputs,
                names,
            )
            .map_err(|e| e.to_string())?;
        if ids.len() != outputs.len() {
            return Err(format!(
                "the line names {} outputs but the op gives {}",
                outputs.len(),
                ids.len()
            ));
        }
        let mut syms = syms.into_iter();
        for (id, (name, ty)) in ids.into_iter().zip(outputs) {
            let value = self.graph.value_mut(id);
            if value.ty != ty {
                return Err(format!(
                    "`%{name}` is declared {ty} but {op} infers {}",
                    value.ty
                ));
            }
            value.sym = syms.next();
        }
        Ok(())
    }

    fn attr(&mut self, c: &mut Cursor<'_>) -> Result<Attr, String> {
        if c.peek() == Some('"') {
            return Ok(Attr::String(c.string()?));
        }
        if c.eat("tensor<") {
            let dtype = c.dtype()?;
            c.keyword("[")?;
            let mut shape = Vec::new();
            if !c.eat("]") {
                loop {
                    shape.push(c.integer()?);
                    if c.eat("]") {
                        break;
                    }
                    c.keyword(", ")?;
                }
            }
            c.keyword(">")?;
            let values = if c.peek_str(" [") {
                c.eat(" ");
                Some(c.numbers()?)
            } else {
                None
            };
            let shape = shape
                .into_iter()
                .map(|d| usize::try_from(d).map(Dim::from))
                .collect::<Result<Shape, _>>()
                .map_err(|_| "a tensor attribute's dims must not be negative".to_string())?;
            return Ok(Attr::Tensor(
                self.tensor(&TensorType::new(dtype, shape), values.as_deref())?,
            ));
        }
        if c.eat("[") {
            if c.eat("]") {
                // An empty list prints the same whatever its element type; ops take an
                // empty `ints` where they want floats or strings.
                return Ok(Attr::Ints(Vec::new()));
            }
            if c.peek() == Some('"') {
                let mut v = vec![c.string()?];
                while c.eat(", ") {
                    v.push(c.string()?);
                }
                c.keyword("]")?;
                return Ok(Attr::Strings(v));
            }
            let mut words = vec![c.number_word()];
            while c.eat(", ") {
                words.push(c.number_word());
            }
            c.keyword("]")?;
            return if words.iter().any(|w| is_float_word(w)) {
                words
                    .iter()
                    .map(|w| parse_f32(w))
                    .collect::<Result<_, _>>()
                    .map(Attr::Floats)
            } else {
                words
                    .iter()
                    .map(|w| parse_i64(w))
                    .collect::<Result<_, _>>()
                    .map(Attr::Ints)
            };
        }
        let word = c.number_word();
        if word.is_empty() {
            return Err(c.expected("an attribute value"));
        }
        if is_float_word(word) {
            parse_f32(word).map(Attr::Float)
        } else {
            parse_i64(word).map(Attr::Int)
        }
    }

    /// A tensor of `ty` (constant dims) holding `values`, or zeros when the text has none.
    fn tensor(&mut self, ty: &TensorType, values: Option<&[f64]>) -> Result<Tensor, String> {
        let shape = ty
            .shape
            .iter()
            .map(|d| {
                d.as_const()
                    .and_then(|v| usize::try_from(v).ok())
                    .ok_or_else(|| format!("a constant's dims must be numbers, got {ty}"))
            })
            .collect::<Result<Vec<usize>, String>>()?;
        let volume = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| format!("{ty} has more elements than memory can hold"))?;
        match values {
            Some(values) => {
                if values.len() != volume {
                    return Err(format!(
                        "{ty} has {volume} elements but {} values are given",
                        values.len()
                    ));
                }
                let t = Tensor::from_vec(shape, values.to_vec()).map_err(|e| e.to_string())?;
                crate::ops::elementwise::cast(&t, ty.dtype).map_err(|e| e.to_string())
            }
            None => {
                let bytes = volume
                    .checked_mul(ty.dtype.size_of())
                    .filter(|b| {
                        self.placeholder_bytes
                            .checked_add(*b)
                            .is_some_and(|total| total <= MAX_PLACEHOLDER_BYTES)
                    })
                    .ok_or_else(|| {
                        format!(
                            "{ty} would take the zero-filled constants past {MAX_PLACEHOLDER_BYTES} bytes"
                        )
                    })?;
                self.placeholder_bytes += bytes;
                Ok(Tensor::zeros(ty.dtype, shape))
            }
        }
    }
}

fn is_float_word(w: &str) -> bool {
    w.contains(['.', 'e', 'E']) || w.contains("NaN") || w.contains("inf")
}

fn parse_f32(w: &str) -> Result<f32, String> {
    f32::from_str(w).map_err(|_| format!("`{w}` is not a number"))
}

fn parse_i64(w: &str) -> Result<i64, String> {
    i64::from_str(w).map_err(|_| format!("`{w}` is not an integer"))
}

/// A position in one line.
struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(s: &'a str) -> Cursor<'a> {
        Cursor { s, pos: 0 }
    }

    fn rest(&mut self) -> &'a str {
        let r = &self.s[self.pos..];
        self.pos = self.s.len();
        r
    }

    fn peek(&self) -> Option<char> {
        self.s[self.pos..].chars().next()
    }

    fn peek_str(&self, p: &str) -> bool {
        self.s[self.pos..].starts_with(p)
    }

    fn eat(&mut self, p: &str) -> bool {
        if self.peek_str(p) {
            self.pos += p.len();
            true
        } else {
            false
        }
    }

    fn expected(&self, what: &str) -> String {
        let at: String = self.s[self.pos..].chars().take(24).collect();
        if at.is_empty() {
            format!("expected {what} at the end of the line")
        } else {
            format!("expected {what} at `{at}`")
        }
    }

    fn keyword(&mut self, p: &str) -> Result<(), String> {
        if self.eat(p) {
            Ok(())
        } else {
            Err(self.expected(&format!("`{}`", p.trim())))
        }
    }

    fn end(&self) -> Result<(), String> {
        if self.pos == self.s.len() {
            Ok(())
        } else {
            Err(self.expected("the end of the line"))
        }
    }

    fn take_while(&mut self, mut keep: impl FnMut(char) -> bool) -> &'a str {
        let start = self.pos;
        let len: usize = self.s[start..]
            .chars()
            .take_while(|&ch| keep(ch))
            .map(char::len_utf8)
            .sum();
        self.pos += len;
        &self.s[start..start + len]
    }

    /// A value name after `%` (possibly empty).
    fn name(&mut self) -> &'a str {
        self.take_while(|ch| !ch.is_whitespace() && !",()[]{}\"#%=".contains(ch))
    }

    /// `%NAME: TYPE`. A name may hold `:`; the one before the space ends it.
    fn definition(&mut self) -> Result<(String, TensorType), String> {
        self.keyword("%")?;
        let run = self.name();
        let name = run
            .strip_suffix(':')
            .filter(|_| self.peek() == Some(' '))
            .ok_or_else(|| self.expected("`:` and a type after the name"))?;
        self.keyword(" ")?;
        let dtype = self.dtype()?;
        Ok((name.to_string(), TensorType::new(dtype, self.shape()?)))
    }

    fn dtype(&mut self) -> Result<DType, String> {
        let word = self.take_while(|ch| ch.is_ascii_alphanumeric());
        DType::ALL
            .into_iter()
            .find(|d| d.name() == word)
            .ok_or_else(|| format!("`{word}` is not an element type"))
    }

    /// `[d, d, ...]`, each a dim expression (which may hold parentheses).
    fn shape(&mut self) -> Result<Shape, String> {
        self.keyword("[")?;
        let mut dims = Vec::new();
        if self.eat("]") {
            return Ok(dims);
        }
        loop {
            let mut depth = 0usize;
            let text = self.take_while(|ch| match ch {
                '(' => {
                    depth += 1;
                    true
                }
                ')' => {
                    depth = depth.saturating_sub(1);
                    true
                }
                ',' | ']' => depth > 0,
                _ => true,
            });
            dims.push(Dim::from_str(text.trim()).map_err(|e| e.to_string())?);
            if self.eat("]") {
                return Ok(dims);
            }
            self.keyword(", ")?;
        }
    }

    fn integer(&mut self) -> Result<i64, String> {
        let start = self.pos;
        self.eat("-");
        self.take_while(|ch| ch.is_ascii_digit());
        let w = &self.s[start..self.pos];
        parse_i64(w)
    }

    /// The characters a number may be written with (`-1`, `0.5`, `1e-5`, `NaN`, `-inf`).
    fn number_word(&mut self) -> &'a str {
        self.take_while(|ch| ch.is_ascii_alphanumeric() || "+-.".contains(ch))
    }

    /// `[v, v, ...]` of numbers.
    fn numbers(&mut self) -> Result<Vec<f64>, String> {
        self.keyword("[")?;
        let mut v = Vec::new();
        if self.eat("]") {
            return Ok(v);
        }
        loop {
            let w = self.number_word();
            v.push(f64::from_str(w).map_err(|_| format!("`{w}` is not a number"))?);
            if self.eat("]") {
                return Ok(v);
            }
            self.keyword(", ")?;
        }
    }

    /// A string as Rust's `{:?}` writes it.
    fn string(&mut self) -> Result<String, String> {
        self.keyword("\"")?;
        let mut out = String::new();
        let mut chars = self.s[self.pos..].char_indices();
        while let Some((i, ch)) = chars.next() {
            match ch {
                '"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' => {
                    let (_, e) = chars.next().ok_or("a string ends in `\\`")?;
                    out.push(match e {
                        'n' => '\n',
                        'r' => '\r',
                        't' => '\t',
                        '0' => '\0',
                        '\\' | '"' | '\'' => e,
                        'u' => {
                            let rest = chars.as_str();
                            let hex = rest
                                .strip_prefix('{')
                                .and_then(|r| r.split_once('}'))
                                .map(|(h, _)| h)
                                .ok_or("`\\u` without `{..}`")?;
                            let code =
                                u32::from_str_radix(hex, 16)
                                    .ok()
                                    .and_then(char::from_u32)
                                    .ok_or_else(|| format!("`\\u{{{hex}}}` is not a character"))?;
                            for _ in 0..hex.len() + 2 {
                                chars.next();
                            }
                            code
                        }
                        other => return Err(format!("unknown escape `\\{other}` in a string")),
                    });
                }
                _ => out.push(ch),
            }
        }
        Err("a string is not closed".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> OpRegistry {
        OpRegistry::onnx()
    }

    const SMALL: &str = r#"graph "tiny \"g\"" opset 18 {
  input %x: f32[batch, 4]  # ids
  const %w: f32[4, 3]
  const %shape: i64[2] = [-1, 3]
  %y: f32[batch, 3] = MatMul(%x, %w)  # mm
  %s: i64[2] = Shape(%y) -> [batch, 3]
  %z: f32[batch, 3] = Reshape(%y, %shape) {allowzero = 0}
  output %z: f32[batch, 3]  # logits
}
"#;

    #[test]
    fn printed_text_parses_back_to_the_same_text() {
        let g = parse(SMALL, &registry()).unwrap();
        assert_eq!(g.to_text(), SMALL);
        assert_eq!(g.node_count(), 3);
        assert_eq!(g.name, "tiny \"g\"");
    }

    #[test]
    fn errors_name_the_line_and_what_is_wrong() {
        let err = |text: &str| parse(text, &registry()).unwrap_err().to_string();
        assert_eq!(
            err(&SMALL.replace("%y: f32[batch, 3] = MatMul", "%y: f32[batch, 5] = MatMul")),
            "IR text, line 5: `%y` is declared f32[batch, 5] but MatMul infers f32[batch, 3]"
        );
        assert_eq!(
            err(&SMALL.replace("MatMul(%x, %w)", "MatMul(%x, %q)")),
            "IR text, line 5: input `%q` is used before it is defined"
        );
        assert_eq!(
            err(&SMALL.replace("  # ids", "  # idz")),
            "IR text, line 2: unknown input role `idz`"
        );
        assert_eq!(
            err(&SMALL.replace("\n}\n", "\n")),
            "IR text, line 8: missing the closing `}`"
        );
        assert_eq!(
            err("graph \"g\" opset 18 {\n  const %w: f32[65536, 65536, 65536]\n}\n"),
            "IR text, line 2: f32[65536, 65536, 65536] would take the zero-filled constants past 1073741824 bytes"
        );
        assert_eq!(
            err(""),
            "IR text, line 1: empty text: expected `graph \"NAME\" opset N {`"
        );
    }

    #[test]
    fn attributes_of_every_kind_come_back() {
        let text = "graph \"a\" opset 20 {\n  input %x: f32[2, 3]  # other\n  %y: f32[2, 3] = Gelu(%x) {approximate = \"tanh\"}\n  %c: f32[3] = Constant() {value = tensor<f32[3]> [1, 2.5, -3]}\n  %d: i64[2] = Constant() {value_ints = [4, 5]}\n  %e: f32[] = Constant() {value_float = 1e-5}\n  output %y: f32[2, 3]  # other\n}\n";
        let g = parse(text, &registry()).unwrap();
        assert_eq!(g.to_text(), text);
    }
}
