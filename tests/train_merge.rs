//! `train merge` on a bf16 local model: by default the original bf16 base
//! plus `s · B A` (rounded once to bf16), every other tensor byte for byte;
//! `--into-quantized` the NF4-dequantized base plus the same update; the
//! merged directory trains as a model of its own.

use std::collections::HashMap;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use assert_cmd::Command;
use candle_core::{DType, Device, Tensor};
use qlora_scale::qlora::LoraTarget;
use qlora_scale::train::{checkpoint, model, trainer};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

mod train_common;

fn ok(out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "train failed: {err}");
    err
}

/// `train ARGS` in the sandbox `dir`.
fn train(dir: &Path, args: &[&str]) -> String {
    ok(Command::from_std(train_common::train_without_profile(dir))
        .args(args)
        .timeout(Duration::from_secs(300))
        .output()
        .expect("train runs"))
}

/// `train merge --run-dir r --out OUT EXTRA` in the sandbox `dir`.
fn merge(dir: &Path, out: &str, extra: &[&str]) -> String {
    ok(Command::from_std(train_common::train_in(dir))
        .args(["merge", "--run-dir", "r", "--out", out])
        .args(extra)
        .timeout(Duration::from_secs(120))
        .output()
        .expect("train merge runs"))
}

/// A bf16 local model `dir/m`, its data `dir/data`, and a two-step run
/// `dir/r` with a learning rate high enough that the update shows in bf16.
fn trained_run(dir: &Path) {
    train_common::write_local_model_as(&dir.join("m"), DType::BF16);
    let data = dir.join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(
        data.join("train.jsonl"),
        "{\"text\": \"the river runs past the mill .\"}\n{\"text\": \"the wheel turns .\"}\n",
    )
    .unwrap();
    train(
        dir,
        &[
            "--model",
            dir.join("m").to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--max-steps",
            "2",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--lora-rank",
            "4",
            "--learning-rate",
            "0.02",
            "--warmup-steps",
            "0",
            "--output-dir",
            "r",
        ],
    );
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The run's updates `s · B A` (f32) by base tensor name.
fn updates(run: &Path) -> HashMap<String, Tensor> {
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(run.join("adapter_config.json")).unwrap()).unwrap();
    let scale = cfg["lora_alpha"].as_f64().unwrap() / cfg["r"].as_f64().unwrap();
    let ad = tensors(&run.join("adapter_model.safetensors"));
    ad.iter()
        .filter_map(|(k, a)| {
            let stem = k.strip_suffix(".lora_A.weight")?;
            let b = &ad[&format!("{stem}.lora_B.weight")];
            let ba = b.matmul(a).unwrap().affine(scale, 0.0).unwrap();
            let name = format!("{}.weight", stem.strip_prefix("base_model.model.").unwrap());
            Some((name, ba))
        })
        .collect()
}

/// `got` is `want` rounded to bf16: within one bf16 step (2^-7 relative).
fn assert_bf16_close(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= w.abs() / 128.0 + 1e-7,
            "{name}[{i}]: merged {g}, base + s·BA = {w}"
        );
    }
}

#[test]
fn default_merge_is_the_original_bf16_base_plus_the_update() {
    let dir = tempfile::tempdir().unwrap();
    trained_run(dir.path());
    let err = merge(dir.path(), "merged", &[]);
    assert!(err.contains("merging: "), "progress on stderr: {err}");
    let base_bytes = std::fs::read(dir.path().join("m/model.safetensors")).unwrap();
    let merged_bytes = std::fs::read(dir.path().join("merged/model.safetensors")).unwrap();
    let base = SafeTensors::deserialize(&base_bytes).unwrap();
    let merged = SafeTensors::deserialize(&merged_bytes).unwrap();
    let mut names = base.names();
    names.sort();
    let mut merged_names = merged.names();
    merged_names.sort();
    assert_eq!(
        names, merged_names,
        "the same tensors, under the same names"
    );

    let updates = updates(&dir.path().join("r"));
    assert!(!updates.is_empty());
    let base_t = tensors(&dir.path().join("m/model.safetensors"));
    let merged_t = tensors(&dir.path().join("merged/model.safetensors"));
    let mut changed = 0;
    for name in names {
        let (b, m) = (base.tensor(name).unwrap(), merged.tensor(name).unwrap());
        assert_eq!(m.dtype(), Dtype::BF16, "{name} stays bf16");
        match updates.get(name) {
            None => assert_eq!(b.data(), m.data(), "{name}: copied byte for byte"),
            Some(ba) => {
                let want = (base_t[name].to_dtype(DType::F32).unwrap() + ba).unwrap();
                let got = f32s(&merged_t[name]);
                assert_bf16_close(name, &got, &f32s(&want));
                changed += (b.data() != m.data()) as usize;
            }
        }
    }
    assert!(changed > 0, "the update shows in the merged weights");
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("merged/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    assert_eq!(cfg["dtype"], "bfloat16");
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");

    // The merged directory trains as a model of its own.
    let merged_dir = dir.path().join("merged");
    train(
        dir.path(),
        &[
            "--model",
            merged_dir.to_str().unwrap(),
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "--max-steps",
            "1",
            "--seq-len",
            "16",
            "--output-dir",
            "r-merged",
        ],
    );
}

#[test]
fn into_quantized_is_the_dequantized_nf4_base_plus_the_update() {
    let dir = tempfile::tempdir().unwrap();
    trained_run(dir.path());
    merge(dir.path(), "original", &[]);
    merge(dir.path(), "quantized", &["--into-quantized"]);
    merge(
        dir.path(),
        "quantized32",
        &["--into-quantized", "--dtype", "f32"],
    );
    let original = tensors(&dir.path().join("original/model.safetensors"));
    let quantized = tensors(&dir.path().join("quantized/model.safetensors"));
    let quantized32 = tensors(&dir.path().join("quantized32/model.safetensors"));

    // The NF4 model as trained, from the run's checkpoint.
    let run = dir.path().join("r");
    let (_, ck) = checkpoint::list(&run.join(trainer::CHECKPOINT_DIR))
        .pop()
        .unwrap();
    let spec = checkpoint::load(&ck).unwrap().state.spec;
    let (nf4, _) = model::build(&spec).unwrap();
    let updates = updates(&run);
    let mut checked = 0;
    for block in nf4.blocks() {
        for (t, l) in LoraTarget::ALL.iter().zip(block.linears()) {
            let name = format!("model.layers.{}.{}.weight", block.index(), t.block_path());
            let w = l
                .base()
                .weight()
                .dequantize(DType::F32, &Device::Cpu)
                .unwrap();
            let want = match updates.get(&name) {
                Some(ba) => (w + ba).unwrap(),
                None => w,
            };
            assert_eq!(quantized[&name].dtype(), DType::BF16, "{name}");
            assert_bf16_close(&name, &f32s(&quantized[&name]), &f32s(&want));
            let got32 = f32s(&quantized32[&name]);
            let want = f32s(&want);
            let max = got32
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .fold(0f32, f32::max);
            assert!(max < 1e-6, "{name}: f32 merge differs by {max}");
            if updates.contains_key(&name) {
                checked += 1;
                assert_ne!(
                    f32s(&quantized[&name]),
                    f32s(&original[&name]),
                    "{name}: NF4 base and original base merge differently"
                );
            }
        }
    }
    assert_eq!(checked, updates.len(), "every adapted weight checked");
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("quantized32/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["torch_dtype"], "float32");
}
