//! The fusion rules, grouped by topic. Each rule names the exporter layout it recognizes.
//! There are no blanket commutativity or associativity rules: where exporters differ in
//! operand order, each order is its own rule.
//!
//! Patterns are written over the encoding of `super` (op symbols with attributes, one-element
//! constants by value). Identity casts are gone before fusion (the canonicalize pass).

use egg::{Applier, EGraph, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, SymbolLang, Var};

use super::FusedOp;

type Rule = Rewrite<SymbolLang, ()>;

fn pattern(s: &str) -> Pattern<SymbolLang> {
    s.parse()
        .unwrap_or_else(|e| panic!("fusion rule pattern {s:?} does not parse: {e}"))
}

fn var(s: &str) -> Var {
    s.parse()
        .unwrap_or_else(|e| panic!("fusion rule variable {s:?}: {e}"))
}

/// Adds `op(inputs...)` to the matched e-class; an RMSNorm takes its epsilon from the
/// constant bound to `eps`.
struct Build {
    op: FusedOp,
    inputs: Vec<Var>,
    eps: Option<Var>,
}

/// The value of the constant leaf in e-class `id`, if it has one.
fn constant(egraph: &EGraph<SymbolLang, ()>, id: Id) -> Option<f64> {
    egraph[id]
        .nodes
        .iter()
        .filter(|n| n.children.is_empty())
        .find_map(|n| n.op.as_str().parse::<f64>().ok())
}

impl Applier<SymbolLang, ()> for Build {
    fn apply_one(
        &self,
        egraph: &mut EGraph<SymbolLang, ()>,
        eclass: Id,
        subst: &Subst,
        _searcher_ast: Option<&PatternAst<SymbolLang>>,
        _rule_name: Symbol,
    ) -> Vec<Id> {
        let mut op = self.op.clone();
        if let (FusedOp::RmsNorm { epsilon }, Some(eps)) = (&mut op, self.eps) {
            match constant(egraph, subst[eps]) {
                Some(e) if e >= 0.0 => *epsilon = e as f32,
                _ => return Vec::new(),
            }
        }
        let children = self.inputs.iter().map(|v| subst[*v]).collect();
        let id = egraph.add(SymbolLang::new(op.symbol(), children));
        if egraph.union(eclass, id) {
            vec![eclass]
        } else {
            Vec::new()
        }
    }
}

fn rule(name: &str, lhs: &str, op: FusedOp, inputs: &[&str], eps: Option<&str>) -> Rule {
    Rewrite::new(
        name,
        pattern(lhs),
        Build {
            op,
            inputs: inputs.iter().map(|v| var(v)).collect(),
            eps: eps.map(var),
        },
    )
    .unwrap_or_else(|e| panic!("fusion rule {name}: {e}"))
}

/// A rewrite to an internal term (`~name`): a shared piece of several patterns that is never
/// materialized in the graph (only [`FusedOp`]s are).
fn internal(name: &str, lhs: &str, rhs: &str) -> Rule {
    Rewrite::new(name, pattern(lhs), pattern(rhs))
        .unwrap_or_else(|e| panic!("fusion rule {name}: {e}"))
}

/// RMSNorm. `mean(x², last axis)` as the three exporters spell ReduceMean (opset 18 with axes
/// as an input, with and without `noop_with_empty_axes`; opset 17 with axes as an attribute)
/// over `Pow(x, 2)` or `x · x`; then `1 / sqrt(· + eps)` as `Div(1, Sqrt)` or
/// `Reciprocal(Sqrt)`; then `w · (x · inv)` in each operand order, or `w · (x / sqrt(...))`.
pub fn norm() -> Vec<Rule> {
    let mut rules = Vec::new();
    let means = [
        ("op18", "(ReduceMean{keepdims=1} ?sq -1)"),
        ("op18-noop", "(ReduceMean{keepdims=1,noop_with_empty_axes=0} ?sq -1)"),
        ("op17", "(ReduceMean{axes=[-1],keepdims=1} ?sq)"),
    ];
    for (name, mean) in means {
        for (sq_name, sq) in [("pow", "(Pow ?x 2)"), ("mul", "(Mul ?x ?x)")] {
            rules.push(internal(
                &format!("mean-square-{name}-{sq_name}"),
                &mean.replace("?sq", sq),
                "(~mean_sq ?x)",
            ));
        }
    }
    rules.push(internal(
        "inv-rms-div",
        "(Div 1 (Sqrt (Add (~mean_sq ?x) ?eps)))",
        "(~inv_rms ?x ?eps)",
    ));
    rules.push(internal(
        "inv-rms-reciprocal",
        "(Reciprocal (Sqrt (Add (~mean_sq ?x) ?eps)))",
        "(~inv_rms ?x ?eps)",
    ));
    let rms = FusedOp::RmsNorm { epsilon: 0.0 };
    for (name, form) in [
        ("rmsnorm-w-xinv", "(Mul ?w (Mul ?x (~inv_rms ?x ?eps)))"),
        ("rmsnorm-xinv-w", "(Mul (Mul ?x (~inv_rms ?x ?eps)) ?w)"),
        ("rmsnorm-w-invx", "(Mul ?w (Mul (~inv_rms ?x ?eps) ?x))"),
        ("rmsnorm-invx-w", "(Mul (Mul (~inv_rms ?x ?eps) ?x) ?w)"),
        (
            "rmsnorm-w-div",
            "(Mul ?w (Div ?x (Sqrt (Add (~mean_sq ?x) ?eps))))",
        ),
        (
            "rmsnorm-div-w",
            "(Mul (Div ?x (Sqrt (Add (~mean_sq ?x) ?eps))) ?w)",
        ),
    ] {
        rules.push(rule(name, form, rms.clone(), &["?x", "?w"], Some("?eps")));
    }
    rules
}

/// SiLU and the gated MLP activation `silu(gate) · up`.
pub fn activation() -> Vec<Rule> {
    vec![
        rule("silu", "(Mul ?x (Sigmoid ?x))", FusedOp::Silu, &["?x"], None),
        rule("silu-swapped", "(Mul (Sigmoid ?x) ?x)", FusedOp::Silu, &["?x"], None),
        rule(
            "swiglu",
            "(Mul (patch.Silu ?g) ?u)",
            FusedOp::SwiGlu,
            &["?g", "?u"],
            None,
        ),
        rule(
            "swiglu-swapped",
            "(Mul ?u (patch.Silu ?g))",
            FusedOp::SwiGlu,
            &["?g", "?u"],
            None,
        ),
    ]
}

/// Every rule, in topic order.
pub fn all() -> Vec<Rule> {
    let mut rules = norm();
    rules.extend(activation());
    rules
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_rule_builds_and_names_are_unique() {
        let rules = super::all();
        let mut names: Vec<String> = rules.iter().map(|r| r.name.to_string()).collect();
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n, "duplicate rule names");
    }
}
