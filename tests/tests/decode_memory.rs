//! The decode loop's memory. With the executor's memory plan a decode step writes its
//! activations into the plan's slots instead of allocating them: on SmolLM2, from the first
//! node of a decode step to the last, nothing of an activation's size (≥ 2 KiB; the hidden row
//! is 2,304 bytes) is allocated. Measured with a counting global allocator, so this file holds
//! one test (tests in one binary share the allocator).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use patch_runtime::llm::LanguageModel;
use patch_tests::{compile_fixture, load_model, smollm2_model};

/// The system allocator, counting allocations, their bytes, and those of at least
/// [`LARGE`] bytes.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
static LARGE_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
const LARGE: usize = 2048;

fn count(size: usize) {
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    BYTES.fetch_add(size as u64, Ordering::Relaxed);
    if size >= LARGE {
        LARGE_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call forwards to the system allocator with the caller's arguments.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations of one decode step, averaged over the steps measured.
#[derive(Debug)]
struct PerStep {
    allocations: f64,
    bytes: f64,
    large: f64,
    /// Large allocations from the first node of a step to the last.
    large_between_nodes: f64,
    /// Outputs written into a slot, and slot misses.
    slot_hits: f64,
    slot_misses: u64,
}

/// Feeds a prompt and two warm-up steps, then measures `steps` decode steps.
fn decode_steps(model: &LanguageModel, steps: usize) -> PerStep {
    let mut cache = model.new_cache();
    model.forward(&mut cache, &[1, 17, 42, 7, 300], 1).unwrap();
    for t in 0..2 {
        model.forward(&mut cache, &[20 + t], 1).unwrap();
    }
    let counters =
        || [&ALLOCATIONS, &BYTES, &LARGE_ALLOCATIONS].map(|c| c.load(Ordering::Relaxed) as f64);
    let (before, slots_before) = (counters(), model.slot_stats());
    let large = || LARGE_ALLOCATIONS.load(Ordering::Relaxed);
    let mut between_nodes = 0;
    for t in 0..steps as u32 {
        let mut first_node = None;
        let mut last_node = 0;
        let mut observe = |_: &patch_runtime::ir::Node, _: &[Option<&patch_runtime::Tensor>]| {
            last_node = large();
            first_node.get_or_insert(last_node);
        };
        model
            .forward_observed(&mut cache, &[100 + t], 1, &mut observe)
            .unwrap();
        between_nodes += last_node - first_node.unwrap();
    }
    let (after, slots) = (counters(), model.slot_stats());
    let per = |i: usize| (after[i] - before[i]) / steps as f64;
    PerStep {
        allocations: per(0),
        bytes: per(1),
        large: per(2),
        large_between_nodes: between_nodes as f64 / steps as f64,
        slot_hits: (slots.hits - slots_before.hits) as f64 / steps as f64,
        slot_misses: slots.misses - slots_before.misses,
    }
}

/// Decode steps without and with the memory plan.
fn compare(name: &str, model: &mut LanguageModel, steps: usize) -> (PerStep, PerStep) {
    model.set_memory_plan(false);
    let off = decode_steps(model, steps);
    model.set_memory_plan(true);
    let on = decode_steps(model, steps);
    println!("{name}, per decode step:\n  without the plan {off:?}\n  with it          {on:?}");
    (off, on)
}

#[test]
fn decode_steps_write_their_activations_into_the_plans_slots() {
    // The LLaMA fixture (hidden 64: its activations are smaller than LARGE).
    let dir = tempfile::tempdir().unwrap();
    let path = compile_fixture("llama_optimum_with_past", dir.path(), 256);
    let mut model = load_model(&path);
    let (off, on) = compare("llama fixture", &mut model, 40);
    assert!(on.slot_hits >= 10.0, "outputs written into slots: {on:?}");
    assert_eq!(off.slot_hits, 0.0);
    assert!(on.bytes < off.bytes, "{on:?} vs {off:?}");

    let Some(onnx) = smollm2_model() else {
        return;
    };
    let out = dir.path().join("smollm2.patch");
    let options = patch_compiler::pipeline::CompileOptions::new(onnx, out.clone());
    patch_compiler::pipeline::compile(&options, &patch_runtime::ops::OpRegistry::onnx()).unwrap();
    let mut model = load_model(&out);
    let (off, on) = compare("SmolLM2-135M", &mut model, 8);
    // Every product, norm, rotation, attention and SwiGLU output of 30 layers, and more.
    assert!(off.large_between_nodes >= 200.0, "{off:?}");
    assert_eq!(on.large_between_nodes, 0.0, "{on:?}");
    // Left around the graph: the driver's lists of input, output and cache tensors (one
    // `Tensor` per layer's key or value). The logits `forward` returns are a view of the
    // graph's output, not a copy.
    assert!(on.large <= 4.0, "{on:?}");
    assert!(on.allocations < off.allocations && on.bytes < off.bytes / 2.0);
    assert_eq!(on.slot_misses, 0, "{on:?}");
    assert!(on.slot_hits >= 300.0, "{on:?}");
}
