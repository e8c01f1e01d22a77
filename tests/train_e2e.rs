//! End-to-end runs of `train` on the embedded model at tiny sizes: the loss
//! falls, files are written, a killed run resumes to the straight run's
//! losses step for step, a corrupt checkpoint is named and skipped, bad
//! data lines are reported with file:line, NaN stops the run, the exported
//! adapter reloads to the same logits, and `train merge` writes a model.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use assert_cmd::Command;
use candle_core::{Device, Tensor};
use qlora_scale::qlora::FrozenStorage;
use qlora_scale::train::settings::Settings;
use qlora_scale::train::spec::plan;
use qlora_scale::train::{checkpoint, model};
use serde_json::Value;

mod train_common;

/// Tiny settings: 2 x 2 sequences of 32 bytes per step.
const TINY: [&str; 14] = [
    "--seq-len",
    "32",
    "--batch-size",
    "2",
    "--grad-accum-steps",
    "2",
    "--warmup-steps",
    "2",
    "--eval-every",
    "4",
    "--lora-rank",
    "4",
    "--checkpoint-every",
    "4",
];

fn train(dir: &Path, args: &[&str]) -> Output {
    Command::from_std(train_common::train_without_profile(dir))
        .args(TINY)
        .args(args)
        .timeout(Duration::from_secs(300))
        .output()
        .expect("train runs")
}

fn ok(out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "train failed: {err}");
    err
}

fn losses(run: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].to_string())
        })
        .collect()
}

/// The ids of the SVG's elements with the texts under each.
fn svg_texts(svg: &str) -> std::collections::HashMap<String, Vec<String>> {
    let doc = roxmltree::Document::parse(svg).expect("loss.svg is well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    doc.descendants()
        .filter_map(|n| {
            let texts = n
                .descendants()
                .filter(|t| t.has_tag_name("text"))
                .filter_map(|t| t.text().map(str::to_string))
                .collect();
            Some((n.attribute("id")?.to_string(), texts))
        })
        .collect()
}

/// How many points the plot's training-loss line has.
fn plotted_steps(run: &Path) -> usize {
    let svg = std::fs::read_to_string(run.join("loss.svg")).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("well-formed XML");
    let line = doc
        .descendants()
        .find(|n| n.attribute("id") == Some("train-loss"))
        .expect("a training-loss line");
    line.attribute("points").unwrap().split_whitespace().count()
}

/// Each metrics row's wall-clock time (RFC 3339) and elapsed seconds.
fn times(run: &Path) -> Vec<(std::time::SystemTime, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let t = v["time"]
                .as_str()
                .unwrap_or_else(|| panic!("no time in {l}"));
            assert!(t.ends_with('Z'), "UTC: {t}");
            let t = humantime::parse_rfc3339(t).unwrap_or_else(|e| panic!("{t}: {e}"));
            (t, v["elapsed_s"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn loss_falls_and_outputs_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let err = ok(train(
        dir.path(),
        &["--max-steps", "16", "--output-dir", "run"],
    ));
    // The log names the model that trains (not the id its profile was
    // scaled for) and the LoRA layers it really gets: 4 blocks, 8 asked.
    let setup = err.lines().find(|l| l.contains("profile:")).unwrap();
    assert!(
        setup.contains("model the built-in model (4 blocks, width 256, seeded NF4 weights); profile scaled for NousResearch/Hermes-2-Pro-Mistral-7B")
            && setup.contains("4 LoRA layers (all the model's blocks; 8 asked)"),
        "{setup}"
    );
    let run = dir.path().join("run");
    let l = losses(&run);
    assert_eq!(l.len(), 16);
    let first: f64 = l[0].1.parse().unwrap();
    let last: f64 = l[15].1.parse().unwrap();
    assert!(last < first - 0.3, "loss {first} -> {last}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let step4: Value = serde_json::from_str(metrics.lines().nth(3).unwrap()).unwrap();
    for key in [
        "step",
        "loss",
        "lr",
        "tokens_per_s",
        "val_loss",
        "peak_rss_mib",
    ] {
        assert!(step4.get(key).is_some(), "{key} missing in {step4}");
    }
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(run.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8.0);
    assert_eq!(cfg["bias"], "none");
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
    let st = std::fs::read(run.join("adapter_model.safetensors")).unwrap();
    let tensors = candle_core::safetensors::load_buffer(&st, &Device::Cpu).unwrap();
    assert!(tensors.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    let svg = svg_texts(&std::fs::read_to_string(run.join("loss.svg")).unwrap());
    assert_eq!(svg["loss-y-title"], ["loss"]);
    assert_eq!(svg["lr-x-title"], ["optimizer step"]);
    assert!(svg["lr-y-title"][0].starts_with("learning rate"));
    for axis in ["loss-x-ticks", "loss-y-ticks", "lr-x-ticks", "lr-y-ticks"] {
        assert!(svg[axis].len() >= 3, "{axis}: {:?}", svg[axis]);
    }
    assert!(svg.contains_key("loss-grid") && svg.contains_key("lr-grid"));
    for series in ["train-loss", "valid-loss", "valid-points", "learning-rate"] {
        assert!(svg.contains_key(series), "{series} missing");
    }
    assert_eq!(svg["legend"], ["train", "validation"]);
    assert_eq!(plotted_steps(&run), 16);
    let t = times(&run);
    assert!(
        t.windows(2).all(|w| w[0].1 < w[1].1 && w[0].0 <= w[1].0),
        "{t:?}"
    );
    let cks = checkpoint::list(&run.join("checkpoints"));
    let steps: Vec<u64> = cks.iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, vec![8, 12, 16], "every 4 steps, the last 3 kept");
}

#[test]
fn resumed_run_matches_straight_run_and_corrupt_checkpoint_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let common = ["--max-steps", "8", "--lora-dropout", "0.1"];
    ok(train(
        dir.path(),
        &[&common[..], &["--output-dir", "straight"]].concat(),
    ));
    ok(train(
        dir.path(),
        &[&common[..], &["--output-dir", "killed"]].concat(),
    ));
    let killed = dir.path().join("killed");
    // The run "dies" after writing step 8's checkpoint torn: flip a byte.
    let last = checkpoint::checkpoint_path(&killed.join("checkpoints"), 8);
    let mut bytes = std::fs::read(&last).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&last, bytes).unwrap();
    let err = ok(train(
        dir.path(),
        &[&common[..], &["--output-dir", "killed", "--resume"]].concat(),
    ));
    // At WARN, naming the file and why.
    assert!(
        err.lines().any(|l| l.contains("WARN")
            && l.contains("step-00000008.ckpt is corrupt: checksum mismatch")),
        "{err}"
    );
    assert!(
        err.contains("resumed from") && err.contains("step-00000004.ckpt"),
        "{err}"
    );
    let straight = losses(&dir.path().join("straight"));
    assert_eq!(straight.len(), 8);
    assert_eq!(losses(&killed), straight, "same losses step for step");
}

#[test]
fn a_run_killed_mid_training_resumes_to_the_straight_runs_losses() {
    let dir = tempfile::tempdir().unwrap();
    let common = [
        "--max-steps",
        "40",
        "--lora-dropout",
        "0.1",
        "--keep-checkpoints",
        "2",
    ];
    ok(train(
        dir.path(),
        &[&common[..], &["--output-dir", "straight"]].concat(),
    ));
    // The same run, killed (SIGKILL: no chance to clean up) once its second
    // checkpoint is on disk.
    let killed = dir.path().join("killed");
    let mut child = train_common::train_without_profile(dir.path())
        .args(TINY)
        .args(common)
        .args(["--output-dir", "killed"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let second = checkpoint::checkpoint_path(&killed.join("checkpoints"), 8);
    let start = std::time::Instant::now();
    // The plot is written with each checkpoint, not only at the end.
    while !killed.join("loss.svg").exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(start.elapsed() < Duration::from_secs(240), "no plot");
        std::thread::sleep(Duration::from_millis(5));
    }
    let first_plot = plotted_steps(&killed);
    assert!(
        first_plot < 40 && first_plot.is_multiple_of(4),
        "{first_plot}"
    );
    while !second.exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(start.elapsed() < Duration::from_secs(240), "no checkpoint");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run finished before it was killed");
    let err = ok(train(
        dir.path(),
        &[&common[..], &["--output-dir", "killed", "--resume"]].concat(),
    ));
    assert!(err.contains("resumed from"), "{err}");
    let straight = losses(&dir.path().join("straight"));
    assert_eq!(straight.len(), 40);
    assert_eq!(losses(&killed), straight, "same losses step for step");
    // The resumed run's plot and elapsed seconds cover the whole run.
    assert_eq!(plotted_steps(&killed), 40);
    let t = times(&killed);
    assert!(t.windows(2).all(|w| w[0].1 < w[1].1), "{t:?}");
    // The adapters are the straight run's too.
    let a = std::fs::read(dir.path().join("straight/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(killed.join("adapter_model.safetensors")).unwrap();
    assert_eq!(a, b);
}

#[test]
fn bad_lines_are_reported_and_strict_fails() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(
        data.join("train.jsonl"),
        concat!(
            "{\"text\": \"The river runs past the mill and the wheel turns.\"}\n",
            "{\"prompt\": \"Question: what turns? Answer:\", \"completion\": \" the wheel\"}\n",
            "{\"text\": unquoted}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello there\"}]}\n",
            "{\"txt\": \"wrong key\"}\n",
        ),
    )
    .unwrap();
    let d = data.to_str().unwrap();
    let err = ok(train(
        dir.path(),
        &["--data-dir", d, "--max-steps", "2", "--output-dir", "r"],
    ));
    assert!(err.contains("train.jsonl:3: invalid JSON"), "{err}");
    assert!(err.contains("train.jsonl:5:"), "{err}");
    assert!(err.contains("2 bad data line(s) skipped"), "{err}");
    let out = train(
        dir.path(),
        &[
            "--data-dir",
            d,
            "--max-steps",
            "2",
            "--strict",
            "--output-dir",
            "s",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("train.jsonl:3: invalid JSON") && err.contains("--strict"),
        "{err}"
    );
}

#[test]
fn non_finite_loss_stops_with_last_good_checkpoint_intact() {
    let dir = tempfile::tempdir().unwrap();
    let out = train(
        dir.path(),
        &[
            "--max-steps",
            "6",
            "--learning-rate",
            "1e30",
            "--grad-clip",
            "1e9",
            "--checkpoint-every",
            "1",
            "--output-dir",
            "r",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let cks = checkpoint::list(&dir.path().join("r/checkpoints"));
    let (newest_step, newest) = cks
        .last()
        .expect("a checkpoint was written before the blow-up");
    checkpoint::load(newest).expect("the last checkpoint verifies");
    // The newest checkpoint (written every step) holds the weights that gave
    // the non-finite loss: it is named as such, never as the last good one.
    assert!(
        err.contains(&format!(
            "{} holds the weights that gave it",
            newest.file_name().unwrap().to_string_lossy()
        )),
        "{err}"
    );
    match cks.len() {
        1 => assert!(err.contains("no checkpoint is known good"), "{err}"),
        n => {
            let (_, good) = &cks[n - 2];
            assert!(
                err.contains(&format!(
                    "the last good checkpoint is r/checkpoints/{}",
                    good.file_name().unwrap().to_string_lossy()
                )),
                "step {newest_step}: {err}"
            );
        }
    }
}

fn logits(m: &qlora_scale::qlora::LlamaModel) -> Vec<f32> {
    let ids = Tensor::new(&[[256u32, 84, 104, 101, 32, 114, 105, 118]], &Device::Cpu).unwrap();
    m.forward(&ids, None, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn exported_adapter_reloads_to_the_same_logits_and_merges() {
    let dir = tempfile::tempdir().unwrap();
    ok(train(
        dir.path(),
        &["--max-steps", "4", "--output-dir", "run"],
    ));
    let run = dir.path().join("run");
    let ck = checkpoint::load(&checkpoint::checkpoint_path(&run.join("checkpoints"), 4)).unwrap();
    let cfg = ck.state.spec.clone();
    // The model as trained: adapters from the checkpoint.
    let (trained, _) = model::build(&cfg).unwrap();
    for (name, var) in trained.trainable_vars() {
        var.set(&ck.adapters[&name]).unwrap();
    }
    // A fresh model with the exported adapter.
    let (reloaded, _) = model::build(&cfg).unwrap();
    let base = logits(&reloaded);
    model::load_adapter(&reloaded, &run).unwrap();
    let (a, b) = (logits(&trained), logits(&reloaded));
    assert_eq!(a, b, "same logits");
    assert!(
        a.iter().zip(&base).any(|(x, y)| (x - y).abs() > 1e-4),
        "the adapter changes the output"
    );

    // `train merge --into-quantized` (the NF4 base the adapter was trained
    // against), then the merged dense model without adapters.
    let out = Command::from_std(train_common::train_in(dir.path()))
        .args(["merge", "--run-dir", "run", "--out", "merged"])
        .arg("--into-quantized")
        .timeout(Duration::from_secs(120))
        .output()
        .unwrap();
    ok(out);
    let merged_dir = dir.path().join("merged");
    // No null key: transformers refuses `attention_bias: null` and the like.
    let merged_config: Value =
        serde_json::from_slice(&std::fs::read(merged_dir.join("config.json")).unwrap()).unwrap();
    assert!(
        merged_config
            .as_object()
            .unwrap()
            .values()
            .all(|v| !v.is_null()),
        "{merged_config}"
    );
    let llama = qlora_scale::qlora::read_config(&merged_dir).unwrap();
    let w = qlora_scale::qlora::SafetensorsDir::open(&merged_dir, &Device::Cpu).unwrap();
    let opts = qlora_scale::qlora::ModelOptions {
        storage: FrozenStorage::F32,
        lora: qlora_scale::qlora::LoraConfig {
            targets: Vec::new(),
            ..Default::default()
        },
        ..Default::default()
    };
    let merged = qlora_scale::qlora::LlamaModel::new(&llama, &w, &opts).unwrap();
    let m = logits(&merged);
    let max = a
        .iter()
        .zip(&m)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-3, "merged logits differ by {max}");

    // By default the embedded model's original base is its seeded f32
    // weights before quantization: an untouched tensor comes out as they are.
    ok(Command::from_std(train_common::train_in(dir.path()))
        .args(["merge", "--run-dir", "run", "--out", "original"])
        .timeout(Duration::from_secs(120))
        .output()
        .unwrap());
    let original =
        candle_core::safetensors::load(dir.path().join("original/model.safetensors"), &Device::Cpu)
            .unwrap();
    let arch = cfg.architecture.clone().unwrap();
    let seeded = qlora_scale::qlora::RandomWeights::new(
        &arch,
        qlora_scale::tables::embedded::WEIGHT_SEED,
        &Device::Cpu,
    );
    use qlora_scale::qlora::WeightSource as _;
    let name = "model.embed_tokens.weight";
    let want: Vec<f32> = seeded
        .tensor(name)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let got: Vec<f32> = original[name].flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got, want, "{name}: the seeded f32 weights");
}

#[test]
fn config_resolution_in_process_matches_defaults() {
    let run = plan(
        &Settings::default(),
        Path::new("/nonexistent/p.json"),
        || None,
    )
    .unwrap();
    let s = &run.spec.settings;
    assert_eq!(s.max_steps, qlora_scale::tables::embedded::MAX_STEPS);
    assert_eq!(s.seq_len, qlora_scale::tables::embedded::SEQ_LEN);
}

#[test]
fn a_stored_spec_without_quantize_embeddings_means_nf4_embeddings() {
    // Checkpoints written before the setting existed trained with NF4
    // embeddings: resuming or merging them must build that model again.
    let run = plan(
        &Settings::default(),
        Path::new("/nonexistent/p.json"),
        || None,
    )
    .unwrap();
    assert!(!run.spec.settings.quantize_embeddings, "16-bit by default");
    let mut stored = serde_json::to_value(&run.spec).unwrap();
    assert_eq!(stored["quantize_embeddings"], false);
    stored
        .as_object_mut()
        .unwrap()
        .remove("quantize_embeddings");
    let old: qlora_scale::train::spec::RunSpec = serde_json::from_value(stored).unwrap();
    assert!(old.settings.quantize_embeddings);
}

#[test]
fn a_stored_spec_without_cpu_matmul_means_f32_products() {
    use qlora_scale::qlora::bf16_gemm::CpuMatmul;
    let settings = Settings {
        cpu_matmul: Some(CpuMatmul::Bf16),
        ..Settings::default()
    };
    let run = plan(&settings, Path::new("/nonexistent/p.json"), || None).unwrap();
    let mut stored = serde_json::to_value(&run.spec).unwrap();
    assert_eq!(stored["cpu_matmul"], "bf16");
    stored.as_object_mut().unwrap().remove("cpu_matmul");
    let old: qlora_scale::train::spec::RunSpec = serde_json::from_value(stored).unwrap();
    assert_eq!(old.settings.cpu_matmul, CpuMatmul::F32);
}

#[test]
fn local_model_dir_trains_and_bad_dirs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("tiny-llama");
    train_common::write_local_model(&m);
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(
        data.join("train.jsonl"),
        "{\"text\": \"the river runs past the mill .\"}\n{\"text\": \"the wheel turns .\"}\n",
    )
    .unwrap();
    let (ms, d) = (m.to_str().unwrap(), data.to_str().unwrap());
    // Two steps of the local model into `out`.
    let run = |out: &str| {
        train(
            dir.path(),
            &[
                "--model",
                ms,
                "--data-dir",
                d,
                "--max-steps",
                "2",
                "--output-dir",
                out,
            ],
        )
    };
    let err = ok(run("r"));
    assert!(
        err.contains(&format!("model {ms} (local folder); ")),
        "{err}"
    );
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("r/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["base_model_name_or_path"], ms);

    // The merged model carries the tokenizer and trains as a model of its own.
    let out = Command::from_std(train_common::train_in(dir.path()))
        .args(["merge", "--run-dir", "r", "--out", "merged"])
        .timeout(Duration::from_secs(120))
        .output()
        .unwrap();
    ok(out);
    for f in ["tokenizer.json", "tokenizer_config.json", "config.json"] {
        assert!(dir.path().join("merged").join(f).is_file(), "{f}");
    }
    let merged = dir.path().join("merged");
    ok(train(
        dir.path(),
        &[
            "--model",
            merged.to_str().unwrap(),
            "--data-dir",
            d,
            "--max-steps",
            "1",
            "--output-dir",
            "r-merged",
        ],
    ));

    std::fs::remove_file(m.join("tokenizer.json")).unwrap();
    let out = run("r2");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tokenizer.json: not found"), "{err}");

    std::fs::remove_file(m.join("model.safetensors")).unwrap();
    std::fs::write(m.join("pytorch_model.bin"), b"pickle").unwrap();
    let out = run("r3");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pytorch_model.bin") && err.contains("refused"),
        "{err}"
    );
}

#[test]
fn lora_targets_reach_the_adapter_and_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    ok(train(
        dir.path(),
        &[
            "--max-steps",
            "2",
            "--lora-targets",
            "v,q",
            "--output-dir",
            "run",
        ],
    ));
    let run = dir.path().join("run");
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(run.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    let bytes = std::fs::read(run.join("adapter_model.safetensors")).unwrap();
    let names = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .len();
    let ck = checkpoint::load(&checkpoint::checkpoint_path(&run.join("checkpoints"), 2)).unwrap();
    assert_eq!(ck.state.spec.settings.lora_targets.0.len(), 2);
    // Two adapters (A and B) for each of q and v in every adapted block.
    assert_eq!(names, ck.adapters.len());
    assert!(
        ck.adapters
            .keys()
            .all(|k| k.contains("q_proj") || k.contains("v_proj"))
    );
    assert_eq!(names % 4, 0);
}

#[test]
fn a_used_output_dir_is_refused_unless_resume_or_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let first = [
        "--max-steps",
        "3",
        "--checkpoint-every",
        "1",
        "--output-dir",
        "run",
    ];
    ok(train(dir.path(), &first));
    let run = dir.path().join("run");
    let before = std::fs::read(run.join("metrics.jsonl")).unwrap();
    // A new run into it is refused by name, and nothing there changes.
    let out = train(dir.path(), &["--max-steps", "2", "--output-dir", "run"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("run is not empty") && err.contains("--resume") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), before);
    assert_eq!(checkpoint::list(&run.join("checkpoints")).len(), 3);
    // --overwrite replaces the old run: only the new run's steps and
    // checkpoints remain; a file of the user's stays.
    std::fs::write(run.join("notes.txt"), "mine").unwrap();
    ok(train(
        dir.path(),
        &[
            "--max-steps",
            "2",
            "--checkpoint-every",
            "1",
            "--output-dir",
            "run",
            "--overwrite",
        ],
    ));
    let steps: Vec<u64> = losses(&run).into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [1, 2]);
    let cks: Vec<u64> = checkpoint::list(&run.join("checkpoints"))
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(cks, [1, 2]);
    assert!(run.join("notes.txt").is_file());
}

/// SIGINT (twice) or SIGTERM to a run of `args` in `dir/NAME` once its
/// `metrics.jsonl` has two steps; the exit status and stderr.
#[cfg(unix)]
fn interrupt(dir: &Path, name: &str, signal: i32, twice: bool) -> (Option<i32>, String) {
    let run = dir.join(name);
    let mut child = train_common::train_without_profile(dir)
        .args(TINY)
        .args(["--max-steps", "100000", "--checkpoint-every", "1000"])
        .args(["--output-dir", name])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < 2 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(start.elapsed() < Duration::from_secs(120), "no steps");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    if twice {
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(180),
        "it did not stop"
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[cfg(unix)]
#[test]
fn a_stopped_run_saves_its_last_step_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = interrupt(dir.path(), "run", libc::SIGTERM, false);
    assert_eq!(code, Some(130), "{err}");
    assert!(
        err.contains("train --resume --output-dir run"),
        "says how to resume: {err}"
    );
    let run = dir.path().join("run");
    let last = losses(&run).last().unwrap().0;
    let cks = checkpoint::list(&run.join("checkpoints"));
    assert_eq!(
        cks.last().map(|c| c.0),
        Some(last),
        "a checkpoint of the last step"
    );
    assert!(run.join("adapter_model.safetensors").is_file());
    assert!(run.join("loss.svg").is_file());
    for d in [&run, &run.join("checkpoints")] {
        for e in std::fs::read_dir(d).unwrap() {
            let name = e.unwrap().file_name();
            assert!(
                !name.to_string_lossy().starts_with(".tmp-"),
                "{name:?} left"
            );
        }
    }
    let err = ok(train(
        dir.path(),
        &[
            "--max-steps",
            &(last + 2).to_string(),
            "--output-dir",
            "run",
            "--resume",
        ],
    ));
    assert!(err.contains(&format!("(step {last})")), "{err}");
    assert_eq!(losses(&run).last().unwrap().0, last + 2);

    // A second SIGINT ends the process at once.
    let (code, _) = interrupt(dir.path(), "twice", libc::SIGINT, true);
    assert_ne!(code, Some(0));
}

#[test]
fn resume_keeps_the_runs_settings_and_refuses_a_different_rank() {
    let dir = tempfile::tempdir().unwrap();
    ok(train(
        dir.path(),
        &[
            "--max-steps",
            "6",
            "--checkpoint-every",
            "3",
            "--output-dir",
            "run",
        ],
    ));
    let resume = |extra: &[&str]| {
        Command::from_std(train_common::train_without_profile(dir.path()))
            .args(["--output-dir", "run", "--resume"])
            .args(extra)
            .timeout(Duration::from_secs(300))
            .output()
            .unwrap()
    };
    // Another rank would change what the stored adapters mean: refused.
    let out = resume(&["--lora-rank", "8"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("lora_rank: 4 -> 8") && err.contains("keeps the settings"),
        "{err}"
    );
    // More steps are allowed and said; everything else comes from the
    // checkpoint (TINY's sequence length and rank, a checkpoint every 3
    // steps), not from the defaults.
    // So is another product precision (a machine with AMX, or without).
    let err = ok(resume(&["--max-steps", "12", "--cpu-matmul", "bf16"]));
    assert!(err.contains("max_steps: 6 -> 12"), "{err}");
    assert!(err.contains(r#"cpu_matmul: "f32" -> "bf16""#), "{err}");
    let run = dir.path().join("run");
    let cks: Vec<u64> = checkpoint::list(&run.join("checkpoints"))
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(cks, [6, 9, 12]);
    let ck = checkpoint::load(&checkpoint::checkpoint_path(&run.join("checkpoints"), 12)).unwrap();
    let s = &ck.state.spec.settings;
    assert_eq!((s.seq_len, s.lora_rank, s.max_steps), (32, 4, 12));
    assert_eq!(s.cpu_matmul, qlora_scale::qlora::bf16_gemm::CpuMatmul::Bf16);
}

/// Each row's step, loss and learning rate, as written.
fn loss_and_lr(run: &Path) -> Vec<(u64, String, String)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let step = v["step"].as_u64().unwrap();
            (step, v["loss"].to_string(), v["lr"].to_string())
        })
        .collect()
}

/// A run of a local model on its own data, stopped by SIGINT, continues
/// with `train --resume --output-dir DIR` and nothing else: the model, the
/// data and every setting come from its checkpoint, and its losses and
/// learning rates are those of the same run never stopped.
#[cfg(unix)]
#[test]
fn resume_alone_continues_a_local_models_run_as_if_never_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    train_common::write_local_model(&model);
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let lines: String = (0..40)
        .map(|i| format!("{{\"text\": \"the river runs past mill {i} and the road\"}}\n"))
        .collect();
    std::fs::write(data.join("train.jsonl"), lines).unwrap();
    let start_run = |out: &str| {
        let mut cmd = train_common::train_without_profile(dir.path());
        cmd.arg("--model").arg(&model).arg("--data-dir").arg(&data);
        cmd.args(["--max-steps", "60", "--checkpoint-every", "1000"]);
        cmd.args([
            "--warmup-steps",
            "5",
            "--learning-rate",
            "0.01",
            "--seq-len",
            "32",
        ]);
        cmd.args(["--output-dir", out]);
        cmd
    };
    let straight = start_run("straight").output().unwrap();
    assert!(straight.status.success());
    // The same run, stopped after a few steps by SIGINT.
    let run = dir.path().join("run");
    let mut child = start_run("run")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < 3 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(start.elapsed() < Duration::from_secs(120), "no steps");
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    assert_eq!(child.wait().unwrap().code(), Some(130));
    let stopped = loss_and_lr(&run).last().unwrap().0;
    assert!(stopped < 60, "stopped at {stopped}");
    // Resumed with nothing but the directory.
    let out = Command::from_std(train_common::train_without_profile(dir.path()))
        .args(["--resume", "--output-dir", "run"])
        .timeout(Duration::from_secs(300))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("(step {stopped})")), "{err}");
    assert_eq!(loss_and_lr(&run), loss_and_lr(&dir.path().join("straight")));
}
