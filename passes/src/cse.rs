//! Common-subexpression elimination, two ways:
//!
//! * **structural**: a node with the same op, attributes and inputs as an earlier node computes
//!   the same values (ops are deterministic; nondeterministic ones are skipped), so its users
//!   read the earlier node's outputs;
//! * **symbolic**: two integer values whose symbolic content is the same expression of the
//!   graph's dimensions (e.g. `past_sequence_length + sequence_length` read from each layer's
//!   key cache) are equal at run time, so users of the later read the earlier.
//!
//! Graph outputs keep their producers (their names are the model's interface). Dead-code
//! elimination then removes what no longer has users.

use std::collections::HashMap;

use patch_runtime::ops::OpRegistry;
use patch_runtime::{Graph, RuntimeError, ValueId};

use crate::fold::is_nondeterministic;
use crate::{attrs_key, Pass};

pub struct CommonSubexpressions;

impl Pass for CommonSubexpressions {
    fn name(&self) -> &'static str {
        "cse"
    }

    fn run(&self, graph: &mut Graph, _registry: &OpRegistry) -> Result<bool, RuntimeError> {
        let graph_outputs: Vec<ValueId> = graph.outputs().iter().map(|(v, _)| *v).collect();
        // Replacements found so far: later value → earlier value. Inputs are looked up through
        // it, so chains of duplicates collapse in one pass.
        let mut same: HashMap<ValueId, ValueId> = HashMap::new();
        let canon = |same: &HashMap<ValueId, ValueId>, v: ValueId| *same.get(&v).unwrap_or(&v);
        let mut by_node: HashMap<String, Vec<ValueId>> = HashMap::new();
        let mut by_content: HashMap<String, ValueId> = HashMap::new();
        for (_, node) in graph.nodes() {
            let keeps_interface = node.outputs.iter().any(|o| graph_outputs.contains(o));
            if !is_nondeterministic(&node.op_type) && !keeps_interface {
                let inputs: Vec<String> = node
                    .inputs
                    .iter()
                    .map(|i| i.map_or("_".to_string(), |v| canon(&same, v).0.to_string()))
                    .collect();
                let key = format!(
                    "{}.{}{{{}}}({})",
                    node.domain,
                    node.op_type,
                    attrs_key(&node.attrs),
                    inputs.join(",")
                );
                match by_node.get(&key) {
                    Some(earlier) if earlier.len() == node.outputs.len() => {
                        for (o, e) in node.outputs.iter().zip(earlier) {
                            same.insert(*o, *e);
                        }
                        continue;
                    }
                    _ => {
                        by_node.insert(key, node.outputs.clone());
                    }
                }
            }
            for &o in &node.outputs {
                let v = graph.value(o);
                let Some(sym) = &v.sym else { continue };
                if !v.ty.dtype.is_int() || graph_outputs.contains(&o) || same.contains_key(&o) {
                    continue;
                }
                let shape: Vec<String> = v.ty.shape.iter().map(|d| d.to_string()).collect();
                let content: Vec<String> = sym.iter().map(|d| d.to_string()).collect();
                let key = format!("{}[{}]={}", v.ty.dtype, shape.join(","), content.join(","));
                match by_content.get(&key) {
                    Some(&earlier) => {
                        same.insert(o, earlier);
                    }
                    None => {
                        by_content.insert(key, o);
                    }
                }
            }
        }
        let mut changed = false;
        for (later, earlier) in same {
            changed |= graph.replace_uses(later, earlier) > 0;
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patch_runtime::ir::{Attr, Attrs};
    use patch_runtime::{DType, Dim, InputRole, OutputRole, Tensor, TensorType};

    /// Equal nodes merge; nodes that differ only in a large tensor attribute (which the text
    /// form abbreviates) or in an input do not.
    #[test]
    fn merges_equal_nodes_only() {
        let r = OpRegistry::onnx();
        let mut g = Graph::new("cse", 18);
        let ty = TensorType::new(DType::F32, vec![Dim::sym("n")]);
        let x = g.add_input("x", ty.clone(), InputRole::Other).unwrap();
        let y = g.add_input("y", ty, InputRole::Other).unwrap();
        let node = |g: &mut Graph, op: &str, attrs: Attrs, ins: Vec<ValueId>, out: &str| {
            g.add_node(
                &r,
                out,
                "",
                op,
                attrs,
                ins.into_iter().map(Some).collect(),
                vec![out.into()],
            )
            .unwrap()[0]
        };
        let a1 = node(&mut g, "Sigmoid", Attrs::new(), vec![x], "a1");
        let a2 = node(&mut g, "Sigmoid", Attrs::new(), vec![x], "a2");
        let b = node(&mut g, "Sigmoid", Attrs::new(), vec![y], "b");
        let shape = g
            .add_const("shape", Tensor::from_vec(vec![1], vec![16i64]).unwrap())
            .unwrap();
        let fill = |v: f32| {
            Attrs::new().with(
                "value",
                Attr::Tensor(Tensor::from_vec(vec![1], vec![v]).unwrap()),
            )
        };
        let c1 = node(&mut g, "ConstantOfShape", fill(1.0), vec![shape], "c1");
        let c2 = node(&mut g, "ConstantOfShape", fill(2.0), vec![shape], "c2");
        let s1 = node(&mut g, "Add", Attrs::new(), vec![a1, b], "s1");
        let s2 = node(&mut g, "Add", Attrs::new(), vec![a2, b], "s2");
        g.set_outputs(
            [s1, s2, c1, c2]
                .into_iter()
                .map(|v| (v, OutputRole::Other))
                .collect(),
        );
        assert!(CommonSubexpressions.run(&mut g, &r).unwrap());
        // s2 now reads a1 (a2 is dead); s1 and s2 stay (graph outputs keep their producers).
        let s2_node = g.nodes().find(|(_, n)| n.name == "s2").unwrap().1;
        assert_eq!(s2_node.inputs, vec![Some(a1), Some(b)]);
        // The two fills differ: both remain read by their outputs.
        assert_eq!(
            g.outputs().iter().map(|(v, _)| *v).collect::<Vec<_>>(),
            vec![s1, s2, c1, c2]
        );
        assert!(
            !CommonSubexpressions.run(&mut g, &r).unwrap(),
            "a second run changes nothing"
        );
    }
}
