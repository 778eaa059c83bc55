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

/// Where a fused op's attribute comes from: the constants a rule matched.
#[derive(Clone, Copy)]
enum AttrFrom {
    None,
    /// RMSNorm epsilon: the constant itself (≥ 0).
    Epsilon(Var),
    /// Attention scale: the product of the two constants.
    Product(Var, Var),
    /// Attention scale: the constant.
    Value(Var),
    /// Attention scale: one over the constant.
    Reciprocal(Var),
    /// GELU-tanh: the cubic coefficient 0.044715 and `sqrt(2/π)`, within 1e-6.
    GeluTanh {
        cubic: Var,
        scale: Var,
    },
    /// Rotary half size from `rotate_half`'s two slices: `x[..., h:end]` and `x[..., z:h2]`
    /// on one axis with step 1, where `z = 0`, `h = h2 > 0`, `end ≥ 2h`.
    RotaryHalf {
        h: Var,
        end: Var,
        h2: Var,
        z: Var,
        axes: [Var; 2],
        steps: [Var; 2],
    },
}

/// Adds `op(inputs...)` to the matched e-class, its attribute read from matched constants
/// (a match whose constant is missing or out of range is not rewritten).
struct Build {
    op: FusedOp,
    inputs: Vec<Var>,
    attr: AttrFrom,
    /// Attention: the softcapping constant (`cap · tanh(scores / cap)`, cap > 0).
    softcap: Option<Var>,
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
        let c = |v: Var| constant(egraph, subst[v]);
        let softcap = match self.softcap.map(c) {
            None => None,
            Some(Some(cap)) if cap > 0.0 && cap.is_finite() => Some(cap as f32),
            Some(_) => return Vec::new(),
        };
        let mut rotary_axis = -1;
        let value = match self.attr {
            AttrFrom::None => None,
            AttrFrom::Epsilon(e) => match c(e) {
                Some(e) if e >= 0.0 => Some(e),
                _ => return Vec::new(),
            },
            AttrFrom::Product(a, b) => match (c(a), c(b)) {
                (Some(a), Some(b)) => Some(a * b),
                _ => return Vec::new(),
            },
            AttrFrom::Value(a) => match c(a) {
                Some(a) => Some(a),
                None => return Vec::new(),
            },
            AttrFrom::Reciprocal(a) => match c(a) {
                Some(a) if a != 0.0 => Some(1.0 / a),
                _ => return Vec::new(),
            },
            AttrFrom::GeluTanh { cubic, scale } => {
                let want = (2.0 / std::f64::consts::PI).sqrt();
                match (c(cubic), c(scale)) {
                    (Some(a), Some(b))
                        if (a - 0.044715).abs() < 1e-6 && (b - want).abs() < 1e-6 =>
                    {
                        None
                    }
                    _ => return Vec::new(),
                }
            }
            AttrFrom::RotaryHalf {
                h,
                end,
                h2,
                z,
                axes,
                steps,
            } => {
                // Both slices on one axis (the op checks it is the last one); step 1.
                let axis = c(axes[0]).filter(|&a| c(axes[1]) == Some(a));
                let unit_steps = steps.iter().all(|&s| c(s) == Some(1.0));
                match (c(h), c(end), c(h2), c(z), axis) {
                    (Some(h), Some(end), Some(h2), Some(0.0), Some(axis))
                        if unit_steps && h == h2 && h > 0.0 && end >= 2.0 * h =>
                    {
                        rotary_axis = axis as i64;
                        Some(h)
                    }
                    _ => return Vec::new(),
                }
            }
        };
        match (&mut op, value) {
            (FusedOp::RmsNorm { epsilon }, Some(v)) => *epsilon = v as f32,
            (
                FusedOp::Attention {
                    scale,
                    softcap: cap,
                },
                Some(v),
            ) if v.is_finite() => {
                *scale = v as f32;
                *cap = softcap;
            }
            (FusedOp::Softcap { cap }, Some(v)) if v > 0.0 && v.is_finite() => *cap = v as f32,
            (FusedOp::Softcap { .. }, _) => return Vec::new(),
            (FusedOp::Attention { .. }, _) => return Vec::new(),
            (FusedOp::Rotary { half, axis }, Some(v)) => {
                *half = v as i64;
                *axis = rotary_axis;
            }
            _ => {}
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

fn rule_with(name: &str, lhs: &str, op: FusedOp, inputs: &[&str], attr: AttrFrom) -> Rule {
    Rewrite::new(
        name,
        pattern(lhs),
        Build {
            op,
            inputs: inputs.iter().map(|v| var(v)).collect(),
            attr,
            softcap: None,
        },
    )
    .unwrap_or_else(|e| panic!("fusion rule {name}: {e}"))
}

/// Attention with its scale (and softcap, when `softcap` names the constant).
fn attention_rule(name: &str, lhs: &str, scale: AttrFrom, softcap: Option<&str>) -> Rule {
    Rewrite::new(
        name,
        pattern(lhs),
        Build {
            op: FusedOp::Attention {
                scale: 1.0,
                softcap: None,
            },
            inputs: ["?q", "?k", "?v", "?mask"].iter().map(|v| var(v)).collect(),
            attr: scale,
            softcap: softcap.map(var),
        },
    )
    .unwrap_or_else(|e| panic!("fusion rule {name}: {e}"))
}

fn rule(name: &str, lhs: &str, op: FusedOp, inputs: &[&str], eps: Option<&str>) -> Rule {
    let attr = eps.map_or(AttrFrom::None, |e| AttrFrom::Epsilon(var(e)));
    rule_with(name, lhs, op, inputs, attr)
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
        (
            "op18-noop",
            "(ReduceMean{keepdims=1,noop_with_empty_axes=0} ?sq -1)",
        ),
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

/// SiLU and GELU with the tanh approximation, and the gated MLP activations built on them:
/// SwiGLU `silu(gate) · up` and GeGLU `gelu_tanh(gate) · up` (Gemma). GELU-tanh is
/// `0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))`, written by GPT-2's TorchScript export as
/// `(x·0.5)·(1 + tanh((x + x³·a)·s))`, by the dynamo exporter as `x·(0.5·(1 + tanh(s·(x +
/// a·x³))))` and by TorchScript's decomposition (Gemma in Optimum) as `0.5·(x·(1 + tanh(s·(x +
/// a·(x·(x·x))))))`; the pieces are matched in each operand order through internal terms. Also
/// softcapping, `cap · tanh(x / cap)` (Gemma 2's final logits).
pub fn activation() -> Vec<Rule> {
    let mut rules = vec![
        internal("cube-pow", "(Pow ?x 3)", "(~cube ?x)"),
        internal("cube-mul", "(Mul ?x (Mul ?x ?x))", "(~cube ?x)"),
        internal("cube-mul-swapped", "(Mul (Mul ?x ?x) ?x)", "(~cube ?x)"),
        internal(
            "gelu-cubic",
            "(Add ?x (Mul (~cube ?x) ?a))",
            "(~gelu_cubic ?x ?a)",
        ),
        internal(
            "gelu-cubic-swapped",
            "(Add ?x (Mul ?a (~cube ?x)))",
            "(~gelu_cubic ?x ?a)",
        ),
        internal(
            "gelu-tanh-arg",
            "(Tanh (Mul (~gelu_cubic ?x ?a) ?s))",
            "(~gelu_tanh ?x ?a ?s)",
        ),
        internal(
            "gelu-tanh-arg-swapped",
            "(Tanh (Mul ?s (~gelu_cubic ?x ?a)))",
            "(~gelu_tanh ?x ?a ?s)",
        ),
        internal(
            "gelu-one-plus",
            "(Add (~gelu_tanh ?x ?a ?s) 1)",
            "(~gelu_1p ?x ?a ?s)",
        ),
        internal(
            "gelu-one-plus-swapped",
            "(Add 1 (~gelu_tanh ?x ?a ?s))",
            "(~gelu_1p ?x ?a ?s)",
        ),
    ];
    let gelu_attr = AttrFrom::GeluTanh {
        cubic: var("?a"),
        scale: var("?s"),
    };
    for (name, form) in [
        ("gelu-tanh", "(Mul (Mul ?x 0.5) (~gelu_1p ?x ?a ?s))"),
        ("gelu-tanh-half-x", "(Mul (Mul 0.5 ?x) (~gelu_1p ?x ?a ?s))"),
        ("gelu-tanh-x-half", "(Mul ?x (Mul 0.5 (~gelu_1p ?x ?a ?s)))"),
        (
            "gelu-tanh-x-half-swapped",
            "(Mul ?x (Mul (~gelu_1p ?x ?a ?s) 0.5))",
        ),
        (
            "gelu-tanh-half-outside",
            "(Mul 0.5 (Mul ?x (~gelu_1p ?x ?a ?s)))",
        ),
        (
            "gelu-tanh-half-outside-swapped",
            "(Mul (Mul ?x (~gelu_1p ?x ?a ?s)) 0.5)",
        ),
    ] {
        rules.push(rule_with(name, form, FusedOp::GeluTanh, &["?x"], gelu_attr));
    }
    for (name, form, op) in [
        ("silu", "(Mul ?x (Sigmoid ?x))", FusedOp::Silu),
        ("silu-swapped", "(Mul (Sigmoid ?x) ?x)", FusedOp::Silu),
    ] {
        rules.push(rule(name, form, op, &["?x"], None));
    }
    for (name, form, op) in [
        ("swiglu", "(Mul (patch.Silu ?g) ?u)", FusedOp::SwiGlu),
        (
            "swiglu-swapped",
            "(Mul ?u (patch.Silu ?g))",
            FusedOp::SwiGlu,
        ),
        (
            "geglu",
            "(Mul (patch.Gelu{approximate=tanh} ?g) ?u)",
            FusedOp::GeGlu,
        ),
        (
            "geglu-swapped",
            "(Mul ?u (patch.Gelu{approximate=tanh} ?g))",
            FusedOp::GeGlu,
        ),
    ] {
        rules.push(rule(name, form, op, &["?g", "?u"], None));
    }
    for (name, form) in [
        ("softcap", "(Mul (Tanh (Div ?x ?c)) ?c)"),
        ("softcap-swapped", "(Mul ?c (Tanh (Div ?x ?c)))"),
    ] {
        rules.push(rule_with(
            name,
            form,
            FusedOp::Softcap { cap: 0.0 },
            &["?x"],
            AttrFrom::Value(var("?c")),
        ));
    }
    rules
}

/// Scaled dot-product attention with an additive mask, grouped KV heads and the NaN-safe
/// softmax all three exporters emit: `MatMul(Where(IsNaN(P), 0, P), V)` with
/// `P = Softmax(scores + mask)`.
/// * `~rep k`: `repeat_kv` — `Reshape(Expand(Unsqueeze(k, 2)))` (the fusion pass checks the
///   Expand really repeats along the new axis);
/// * `~kt k`: `Kᵀ` — `Transpose{perm=[0,1,3,2]}`, or the dynamo exporter's
///   `Reshape(Transpose{perm=[0,2,1]}(Reshape(k)))`;
/// * scores: `(q · c1) (Kᵀ · c2)` (scale split over both operands, Optimum and TorchScript),
///   `(q Kᵀ) · c`, or `(q Kᵀ) / c`; optionally softcapped, `cap · tanh(scores / cap)` (Gemma 2);
/// * the softmax NaN-safe as above, or plain (eager attention, whose masks use the lowest
///   finite value: no row is all `-inf`, and where one is, the fused op's zeros replace NaNs).
pub fn attention() -> Vec<Rule> {
    let mut rules = Vec::new();
    for a in [0, 1] {
        rules.push(internal(
            &format!("repeat-kv-{a}"),
            &format!("(Reshape{{allowzero={a}}} (Expand (Unsqueeze ?k 2) ?e) ?r)"),
            "(~rep ?k)",
        ));
        for b in [0, 1] {
            rules.push(internal(
                &format!("k-transpose-3d-{a}{b}"),
                &format!(
                    "(Reshape{{allowzero={a}}} (Transpose{{perm=[0,2,1]}} (Reshape{{allowzero={b}}} ?k ?s1)) ?s2)"
                ),
                "(~kt ?k)",
            ));
        }
    }
    rules.push(internal(
        "k-transpose",
        "(Transpose{perm=[0,1,3,2]} ?k)",
        "(~kt ?k)",
    ));
    rules.push(internal(
        "safe-softmax",
        "(Where (IsNaN (Softmax{axis=-1} ?x)) 0 (Softmax{axis=-1} ?x))",
        "(~safe_softmax ?x)",
    ));
    for (kv_name, k, v) in [("gqa", "(~rep ?k)", "(~rep ?v)"), ("mha", "?k", "?v")] {
        for (scale_name, scores, attr) in [
            (
                "split",
                format!("(MatMul (Mul ?q ?c1) (Mul (~kt {k}) ?c2))"),
                AttrFrom::Product(var("?c1"), var("?c2")),
            ),
            (
                "mul",
                format!("(Mul (MatMul ?q (~kt {k})) ?c)"),
                AttrFrom::Value(var("?c")),
            ),
            (
                "div",
                format!("(Div (MatMul ?q (~kt {k})) ?c)"),
                AttrFrom::Reciprocal(var("?c")),
            ),
        ] {
            let capped = format!("(Mul (Tanh (Div {scores} ?cap)) ?cap)");
            for (cap_name, scores, softcap) in [
                ("", scores.as_str(), None),
                ("-softcap", &capped, Some("?cap")),
            ] {
                for (softmax_name, softmax) in
                    [("", "~safe_softmax"), ("-eager", "Softmax{axis=-1}")]
                {
                    rules.push(attention_rule(
                        &format!("attention-{kv_name}-{scale_name}{cap_name}{softmax_name}"),
                        &format!("(MatMul ({softmax} (Add {scores} ?mask)) {v})"),
                        attr,
                        softcap,
                    ));
                }
            }
        }
    }
    rules
}

/// Rotary position embedding, `x · cos + rotate_half(x) · sin` with
/// `rotate_half(x) = concat(-x[..., h:], x[..., :h])` (the LLaMA / Qwen layout of all three
/// exporters), in both orders of the final Add.
pub fn rotary() -> Vec<Rule> {
    let rot =
        "(Mul (Concat{axis=-1} (Neg (Slice ?x ?h ?end ?a1 ?s1)) (Slice ?x ?z ?h2 ?a2 ?s2)) ?sin)";
    let attr = AttrFrom::RotaryHalf {
        h: var("?h"),
        end: var("?end"),
        h2: var("?h2"),
        z: var("?z"),
        axes: [var("?a1"), var("?a2")],
        steps: [var("?s1"), var("?s2")],
    };
    let op = FusedOp::Rotary { half: 0, axis: -1 };
    vec![
        rule_with(
            "rotary",
            &format!("(Add (Mul ?x ?cos) {rot})"),
            op.clone(),
            &["?x", "?cos", "?sin"],
            attr,
        ),
        rule_with(
            "rotary-swapped",
            &format!("(Add {rot} (Mul ?x ?cos))"),
            op,
            &["?x", "?cos", "?sin"],
            attr,
        ),
    ]
}

/// Every rule, in topic order.
pub fn all() -> Vec<Rule> {
    let mut rules = norm();
    rules.extend(activation());
    rules.extend(attention());
    rules.extend(rotary());
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
