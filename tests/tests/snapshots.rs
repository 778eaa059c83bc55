//! The imported IR of every fixture, as a reviewable snapshot: later passes show their
//! rewrites as diffs of these files.

use patch_tests::{import_fixture, FIXTURES};

#[test]
fn imported_ir_text() {
    for name in FIXTURES {
        let text = import_fixture(name).to_text();
        insta::assert_snapshot!(format!("import_{name}"), text);
    }
}

#[test]
fn ir_text_is_deterministic() {
    for name in FIXTURES {
        assert_eq!(
            import_fixture(name).to_text(),
            import_fixture(name).to_text(),
            "{name}"
        );
    }
}
