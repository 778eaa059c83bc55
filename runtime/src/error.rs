//! Structured errors. Op implementations return [`OpError`]; the graph-level code wraps it in
//! [`RuntimeError::Node`] with the node's name and op type so that a message always says where.

use crate::dtype::DType;

/// An error raised by one op: bad attributes, inputs it cannot take, shapes that disagree.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OpError {
    #[error("missing required attribute `{0}`")]
    MissingAttr(String),
    #[error("attribute `{name}`: {msg}")]
    BadAttr { name: String, msg: String },
    #[error("expected {expected} inputs, got {got}")]
    Arity { expected: String, got: usize },
    #[error("required input {0} is missing")]
    MissingInput(usize),
    #[error("input {index} has dtype {got}, expected {expected}")]
    DType {
        index: usize,
        got: DType,
        expected: String,
    },
    #[error("shape error: {0}")]
    Shape(String),
    #[error("input {0} must be a constant known at compile time")]
    NotConstant(usize),
    #[error("{0}")]
    Invalid(String),
}

/// Errors of the IR, inference, verification and execution.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RuntimeError {
    #[error("unsupported op `{op_type}` (domain `{domain}`, opset {opset}) at node `{node}`; run `patchc list-ops` for the supported set")]
    UnsupportedOp {
        op_type: String,
        domain: String,
        opset: i64,
        node: String,
    },
    #[error("node `{node}` ({op}): {source}")]
    Node {
        node: String,
        op: String,
        #[source]
        source: OpError,
    },
    #[error("symbol `{0}` has no value: bind it through a graph input of that shape")]
    UnboundSymbol(String),
    #[error("graph input `{name}`: {msg}")]
    Input { name: String, msg: String },
    #[error("graph is cyclic: node `{0}` is on a cycle")]
    Cycle(String),
    #[error("value `{0}` is used but never defined")]
    Undefined(String),
    #[error("value `{0}` is defined more than once")]
    Redefined(String),
    #[error("verifier: {0}")]
    Verify(String),
    #[error("tensor: {0}")]
    Tensor(String),
    #[error("unknown element type code {code} for `{what}`")]
    UnknownDType { code: i32, what: String },
}

impl RuntimeError {
    /// Wraps an op error with the node it came from.
    pub fn at_node(node: &str, op: &str, source: OpError) -> RuntimeError {
        RuntimeError::Node {
            node: node.to_string(),
            op: op.to_string(),
            source,
        }
    }
}

/// `error: cause: cause…` for a CLI: every link of the `source()` chain, each printed once (a
/// link whose text the message already holds, as `"cannot write `x`: {source}"` does, is
/// skipped).
pub fn chain_message(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !text.is_empty() && !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        next = cause.source();
    }
    message
}

#[cfg(test)]
mod chain_tests {
    use super::chain_message;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot write `out.patch`: {source}")]
    struct Embeds {
        #[source]
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("compiling `m.onnx`")]
    struct Context {
        #[source]
        source: Embeds,
    }

    #[test]
    fn every_cause_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory");
        let e = Context {
            source: Embeds { source: io },
        };
        assert_eq!(
            chain_message(&e),
            "compiling `m.onnx`: cannot write `out.patch`: no such directory"
        );
    }
}
