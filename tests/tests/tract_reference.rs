//! tract-onnx as a second, independent reference: on the TorchScript LLaMA fixture, tract,
//! ONNX Runtime's goldens and our interpreter agree.

use patch_runtime::interp;
use patch_tests::{fixture_dir, import_fixture, max_abs_diff, read_case};
use tract_onnx::prelude::*;

#[test]
fn interpreter_agrees_with_tract_and_onnx_runtime() -> TractResult<()> {
    let name = "llama_torchscript_op17";
    let case = read_case(&fixture_dir(name).join("cases/seq7"));
    let ours = interp::run(
        &import_fixture(name),
        &case
            .inputs
            .iter()
            .map(|(_, t)| t.clone())
            .collect::<Vec<_>>(),
    )
    .unwrap();

    let mut model = tract_onnx::onnx().model_for_path(fixture_dir(name).join("model.onnx"))?;
    let mut values = TVec::new();
    for (i, (_, t)) in case.inputs.iter().enumerate() {
        let ids = t.to_i64_vec().unwrap();
        model.set_input_fact(i, i64::fact(t.shape()).into())?;
        let array = tract_ndarray::ArrayD::from_shape_vec(t.shape(), ids)?;
        values.push(array.into_tvalue());
    }
    let runnable = model.into_optimized()?.into_runnable()?;
    let out = runnable.run(values)?;
    let view = out[0].to_plain_array_view::<f32>()?;
    let tract_logits =
        patch_runtime::Tensor::from_vec(view.shape().to_vec(), view.iter().copied().collect())
            .unwrap();

    let golden = &case.outputs[0].1;
    let tract_vs_ort = max_abs_diff(&tract_logits, golden);
    let ours_vs_tract = max_abs_diff(&ours[0], &tract_logits);
    println!("tract vs ORT {tract_vs_ort:.3e}, ours vs tract {ours_vs_tract:.3e}");
    assert!(
        tract_vs_ort <= 1e-4,
        "tract disagrees with ORT: {tract_vs_ort}"
    );
    assert!(
        ours_vs_tract <= 1e-4,
        "interpreter disagrees with tract: {ours_vs_tract}"
    );
    Ok(())
}
