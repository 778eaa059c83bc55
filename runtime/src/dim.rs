//! Symbolic dimensions.
//!
//! A [`Dim`] is an integer polynomial over named symbols (`batch`, `seq`, `past`, …) whose
//! atoms may also be floor divisions of another polynomial by a positive constant. The
//! representation is canonical: two dims that are equal as polynomials compare equal, print
//! the same and hash the same. Symbols stand for non-negative sizes.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use crate::error::RuntimeError;

/// An indivisible factor of a monomial.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Atom {
    Sym(Arc<str>),
    /// `floor(expr / divisor)` with `divisor > 1`, kept when it cannot be simplified.
    FloorDiv(Box<Dim>, i64),
}

/// A product of atoms, sorted; the empty product is the constant monomial.
type Monomial = Vec<Atom>;

/// A symbolic dimension (see the module docs).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dim {
    /// Nonzero coefficients by monomial.
    terms: BTreeMap<Monomial, i64>,
}

/// A tensor shape whose dimensions may be symbolic.
pub type Shape = Vec<Dim>;

/// Values of symbols, used to evaluate dims for one call.
pub type Bindings = HashMap<Arc<str>, i64>;

impl Dim {
    pub fn constant(v: i64) -> Dim {
        let mut terms = BTreeMap::new();
        if v != 0 {
            terms.insert(Vec::new(), v);
        }
        Dim { terms }
    }

    pub fn sym(name: &str) -> Dim {
        Dim {
            terms: BTreeMap::from([(vec![Atom::Sym(Arc::from(name))], 1)]),
        }
    }

    /// The value of a constant dim.
    #[inline]
    pub fn as_const(&self) -> Option<i64> {
        let mut terms = self.terms.iter();
        match (terms.next(), terms.next()) {
            (None, _) => Some(0),
            (Some((mono, &coef)), None) if mono.is_empty() => Some(coef),
            _ => None,
        }
    }

    pub fn is_const(&self) -> bool {
        self.as_const().is_some()
    }

    /// Names of the symbols this dim mentions.
    pub fn symbols(&self) -> Vec<Arc<str>> {
        let mut out = Vec::new();
        self.collect_symbols(&mut out);
        out.sort();
        out.dedup();
        out
    }

    fn collect_symbols(&self, out: &mut Vec<Arc<str>>) {
        for mono in self.terms.keys() {
            for atom in mono {
                match atom {
                    Atom::Sym(s) => out.push(s.clone()),
                    Atom::FloorDiv(d, _) => d.collect_symbols(out),
                }
            }
        }
    }

    /// Evaluates the dim under `bindings`; an unbound symbol is an error naming it.
    pub fn eval(&self, bindings: &Bindings) -> Result<i64, RuntimeError> {
        let mut total = 0i64;
        for (mono, coef) in &self.terms {
            let mut product = *coef;
            for atom in mono {
                let v = match atom {
                    Atom::Sym(s) => *bindings
                        .get(s)
                        .ok_or_else(|| RuntimeError::UnboundSymbol(s.to_string()))?,
                    Atom::FloorDiv(d, q) => d.eval(bindings)?.div_euclid(*q),
                };
                product = product.checked_mul(v).ok_or_else(|| self.overflow())?;
            }
            total = total.checked_add(product).ok_or_else(|| self.overflow())?;
        }
        Ok(total)
    }

    fn overflow(&self) -> RuntimeError {
        RuntimeError::Tensor(format!(
            "the size `{self}` overflows 64 bits for these inputs"
        ))
    }

    /// If this dim is exactly one symbol, its name.
    pub fn as_sym(&self) -> Option<&str> {
        if self.terms.len() != 1 {
            return None;
        }
        let (mono, coef) = self.terms.iter().next()?;
        match (mono.as_slice(), coef) {
            ([Atom::Sym(s)], 1) => Some(s),
            _ => None,
        }
    }

    fn from_terms(terms: impl IntoIterator<Item = (Monomial, i64)>) -> Dim {
        let mut out: BTreeMap<Monomial, i64> = BTreeMap::new();
        for (m, c) in terms {
            // Saturating: a size past 64 bits stays huge (and is refused where it is used)
            // instead of wrapping to a small one.
            let e = out.entry(m).or_insert(0);
            *e = e.saturating_add(c);
        }
        out.retain(|_, c| *c != 0);
        Dim { terms: out }
    }

    /// Floor division by a constant. Exact when every coefficient is a multiple of `q`.
    pub fn floor_div(&self, q: i64) -> Dim {
        assert!(q != 0, "division of a dim by zero");
        if q == 1 {
            return self.clone();
        }
        if q == -1 {
            return -self.clone();
        }
        if let Some(c) = self.as_const() {
            return Dim::constant(c.div_euclid(q));
        }
        if q > 0 && self.terms.values().all(|c| c % q == 0) {
            return Dim::from_terms(self.terms.iter().map(|(m, c)| (m.clone(), c / q)));
        }
        if q < 0 {
            return (-self.clone()).floor_div(-q);
        }
        Dim {
            terms: BTreeMap::from([(vec![Atom::FloorDiv(Box::new(self.clone()), q)], 1)]),
        }
    }

    /// `self / divisor` when the division is exact as polynomials and the divisor is a single
    /// term (e.g. `batch*seq*64 / (seq*16) = 4*batch`); `None` otherwise.
    pub fn exact_div(&self, divisor: &Dim) -> Option<Dim> {
        if let Some(q) = divisor.as_const() {
            if q == 0 || self.terms.values().any(|c| c % q != 0) {
                return None;
            }
            return Some(self.floor_div(q));
        }
        if divisor.terms.len() != 1 {
            return (self == divisor).then(|| Dim::constant(1));
        }
        let (dmono, dcoef) = divisor.terms.iter().next()?;
        let mut out = Vec::new();
        for (mono, coef) in &self.terms {
            if coef % dcoef != 0 {
                return None;
            }
            let mut rest = mono.clone();
            for atom in dmono {
                let pos = rest.iter().position(|a| a == atom)?;
                rest.remove(pos);
            }
            out.push((rest, coef / dcoef));
        }
        Some(Dim::from_terms(out))
    }

    /// `min(self, other)` when it can be decided symbolically (symbols are non-negative).
    pub fn try_min(&self, other: &Dim) -> Option<Dim> {
        let diff = self.clone() - other.clone();
        if diff.is_nonnegative() {
            Some(other.clone())
        } else if (-diff).is_nonnegative() {
            Some(self.clone())
        } else {
            None
        }
    }

    /// True when the dim is provably `>= 0` for all non-negative symbol values: every
    /// coefficient is non-negative (floor divisions of such dims by positive constants are
    /// non-negative too).
    pub fn is_nonnegative(&self) -> bool {
        self.terms.values().all(|c| *c >= 0)
    }
}

impl From<i64> for Dim {
    fn from(v: i64) -> Dim {
        Dim::constant(v)
    }
}

impl From<usize> for Dim {
    fn from(v: usize) -> Dim {
        Dim::constant(v as i64)
    }
}

impl std::ops::Add for Dim {
    type Output = Dim;
    fn add(self, rhs: Dim) -> Dim {
        Dim::from_terms(self.terms.into_iter().chain(rhs.terms))
    }
}

impl std::ops::Neg for Dim {
    type Output = Dim;
    fn neg(self) -> Dim {
        Dim::from_terms(self.terms.into_iter().map(|(m, c)| (m, c.saturating_neg())))
    }
}

impl std::ops::Sub for Dim {
    type Output = Dim;
    fn sub(self, rhs: Dim) -> Dim {
        self + (-rhs)
    }
}

impl std::ops::Mul for Dim {
    type Output = Dim;
    fn mul(self, rhs: Dim) -> Dim {
        let mut terms = Vec::new();
        for (ma, ca) in &self.terms {
            for (mb, cb) in &rhs.terms {
                let mut m: Monomial = ma.iter().chain(mb).cloned().collect();
                m.sort();
                terms.push((m, ca.saturating_mul(*cb)));
            }
        }
        Dim::from_terms(terms)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return f.write_str("0");
        }
        // Highest-degree terms first, the constant last, each group in canonical order.
        let mut terms: Vec<(&Monomial, &i64)> = self.terms.iter().collect();
        terms.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(b.0)));
        for (i, (mono, coef)) in terms.into_iter().enumerate() {
            let coef = *coef;
            let sign_neg = coef < 0;
            if i == 0 {
                if sign_neg {
                    f.write_str("-")?;
                }
            } else {
                f.write_str(if sign_neg { " - " } else { " + " })?;
            }
            let abs = coef.unsigned_abs();
            if mono.is_empty() {
                write!(f, "{abs}")?;
                continue;
            }
            if abs != 1 {
                write!(f, "{abs}*")?;
            }
            for (j, atom) in mono.iter().enumerate() {
                if j > 0 {
                    f.write_str("*")?;
                }
                match atom {
                    Atom::Sym(s) => f.write_str(s)?,
                    Atom::FloorDiv(d, q) => write!(f, "({d})/{q}")?,
                }
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Dim {
    type Err = RuntimeError;

    /// Parses the text form printed by `Display` (`batch*seq + 3`, `(seq + 1)/2`, `-2*past`).
    fn from_str(text: &str) -> Result<Dim, RuntimeError> {
        let mut p = DimParser {
            s: text.as_bytes(),
            pos: 0,
        };
        let d = p.expr()?;
        p.skip_ws();
        if p.pos != p.s.len() {
            return Err(p.error("unexpected trailing text"));
        }
        Ok(d)
    }
}

/// Recursive-descent parser for dim expressions:
/// `expr := term (('+' | '-') term)*`, `term := factor ('*' factor)*`,
/// `factor := int | ident | '-' factor | '(' expr ')' ['/' int]`.
struct DimParser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl DimParser<'_> {
    fn error(&self, msg: &str) -> RuntimeError {
        RuntimeError::Tensor(format!(
            "cannot parse dim `{}` at byte {}: {msg}",
            String::from_utf8_lossy(self.s),
            self.pos
        ))
    }

    fn skip_ws(&mut self) {
        while self
            .s
            .get(self.pos)
            .is_some_and(|c| c.is_ascii_whitespace())
        {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.pos).copied()
    }

    fn expr(&mut self) -> Result<Dim, RuntimeError> {
        let mut acc = self.term()?;
        while let Some(c @ (b'+' | b'-')) = self.peek() {
            self.pos += 1;
            let t = self.term()?;
            acc = if c == b'+' { acc + t } else { acc - t };
        }
        Ok(acc)
    }

    fn term(&mut self) -> Result<Dim, RuntimeError> {
        let mut acc = self.factor()?;
        while self.peek() == Some(b'*') {
            self.pos += 1;
            acc = acc * self.factor()?;
        }
        Ok(acc)
    }

    fn int(&mut self) -> Result<i64, RuntimeError> {
        self.skip_ws();
        let start = self.pos;
        while self.s.get(self.pos).is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        std::str::from_utf8(&self.s[start..self.pos])
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| self.error("expected an integer"))
    }

    fn factor(&mut self) -> Result<Dim, RuntimeError> {
        match self.peek() {
            Some(b'-') => {
                self.pos += 1;
                Ok(-self.factor()?)
            }
            Some(b'(') => {
                self.pos += 1;
                let inner = self.expr()?;
                if self.peek() != Some(b')') {
                    return Err(self.error("expected `)`"));
                }
                self.pos += 1;
                if self.peek() == Some(b'/') {
                    self.pos += 1;
                    let q = self.int()?;
                    if q == 0 {
                        return Err(self.error("division by zero"));
                    }
                    return Ok(inner.floor_div(q));
                }
                Ok(inner)
            }
            Some(c) if c.is_ascii_digit() => Ok(Dim::constant(self.int()?)),
            Some(c) if c.is_ascii_alphabetic() || c == b'_' => {
                let start = self.pos;
                while self
                    .s
                    .get(self.pos)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
                {
                    self.pos += 1;
                }
                let name = std::str::from_utf8(&self.s[start..self.pos]).expect("ascii");
                Ok(Dim::sym(name))
            }
            _ => Err(self.error("expected a number, a symbol, `-` or `(`")),
        }
    }
}

/// Formats a shape as `[batch, seq, 64]`.
pub fn shape_to_string(shape: &[Dim]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// Constant shape from concrete sizes.
pub fn shape_of(dims: &[usize]) -> Shape {
    dims.iter().map(|&d| Dim::from(d)).collect()
}

/// Product of the dims of a shape.
pub fn volume(shape: &[Dim]) -> Dim {
    shape.iter().cloned().fold(Dim::constant(1), |a, b| a * b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polynomial_arithmetic_is_canonical() {
        let b = Dim::sym("batch");
        let s = Dim::sym("seq");
        let a = b.clone() * s.clone() + Dim::constant(3);
        let c = Dim::constant(3) + s.clone() * b.clone();
        assert_eq!(a, c);
        assert_eq!(a.to_string(), "batch*seq + 3");
        assert_eq!((s.clone() - s.clone()).as_const(), Some(0));
        assert_eq!(
            (s.clone() * Dim::constant(4)).floor_div(2),
            s.clone() * Dim::constant(2)
        );
        let d = (s.clone() + Dim::constant(1)).floor_div(2);
        assert_eq!(d.to_string(), "(seq + 1)/2");
        let bindings = Bindings::from([(Arc::from("seq"), 6), (Arc::from("batch"), 2)]);
        assert_eq!(d.eval(&bindings).unwrap(), 3);
        assert_eq!(a.eval(&bindings).unwrap(), 15);
        assert!(matches!(
            Dim::sym("past").eval(&bindings),
            Err(RuntimeError::UnboundSymbol(s)) if s == "past"
        ));
    }

    #[test]
    fn text_form_parses_back() {
        let b = Dim::sym("batch");
        let s = Dim::sym("seq");
        let p = Dim::sym("past_sequence_length");
        for d in [
            Dim::constant(0),
            Dim::constant(-7),
            b.clone() * s.clone() + Dim::constant(3),
            p.clone() + s.clone(),
            (s.clone() + Dim::constant(1)).floor_div(2) * Dim::constant(3) - b.clone(),
            -(b.clone() * Dim::constant(2)) + p.clone() * p.clone(),
            ((p.clone() - s.clone()).floor_div(4) + Dim::constant(1)).floor_div(2),
        ] {
            let text = d.to_string();
            assert_eq!(text.parse::<Dim>().unwrap(), d, "{text}");
        }
        for bad in ["", "seq +", "(seq", "3 $", "(seq)/0"] {
            assert!(bad.parse::<Dim>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn exact_division_cancels_monomials() {
        let b = Dim::sym("batch");
        let s = Dim::sym("seq");
        let vol = b.clone() * s.clone() * Dim::constant(64);
        let div = s.clone() * Dim::constant(16);
        assert_eq!(vol.exact_div(&div), Some(b.clone() * Dim::constant(4)));
        assert_eq!(vol.exact_div(&Dim::constant(3)), None);
        assert_eq!((s.clone() + Dim::constant(1)).exact_div(&s), None);
        assert_eq!(vol.exact_div(&vol), Some(Dim::constant(1)));
    }

    #[test]
    fn min_is_decided_only_when_provable() {
        let s = Dim::sym("seq");
        let p = Dim::sym("past");
        assert_eq!(s.try_min(&(s.clone() + p.clone())), Some(s.clone()));
        assert_eq!(s.try_min(&p), None);
        assert_eq!(
            Dim::constant(4).try_min(&Dim::constant(2)),
            Some(Dim::constant(2))
        );
    }
}
