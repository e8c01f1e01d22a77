//! Loading a sharded HF safetensors checkpoint written by the test.

mod qlora_common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use qlora_common::*;
use qlora_scale::qlora::{
    FrozenStorage, LlamaConfig, LlamaModel, LoadError, ModelOptions, SafetensorsDir, read_config,
};

fn write_checkpoint(
    dir: &Path,
    cfg: &qlora_scale::qlora::LlamaConfig,
    w: &HashMap<String, Tensor>,
    dtype: DType,
) {
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(cfg).unwrap(),
    )
    .unwrap();
    let mut names: Vec<&String> = w.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let shard: HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), w[*n].to_dtype(dtype).unwrap()))
            .collect();
        candle_core::safetensors::save(&shard, dir.join(file)).unwrap();
        for n in part {
            map.insert((*n).clone(), serde_json::Value::String(file.into()));
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

fn options(storage: FrozenStorage) -> ModelOptions {
    ModelOptions {
        storage,
        lora: lora(0.0),
        ..ModelOptions::default()
    }
}

#[test]
fn sharded_checkpoint_gives_the_in_memory_logits() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_cfg(2);
    cfg.model_type = Some("qwen2".into()); // q/k/v biases
    cfg.tie_word_embeddings = true;
    cfg.rope_theta = 500_000.0;
    let w = cfg.random_weights(3, DType::F32, &Device::Cpu).unwrap();
    write_checkpoint(dir.path(), &cfg, &w, DType::F32);

    let read = read_config(dir.path()).unwrap();
    assert_eq!(read, cfg);
    let src = SafetensorsDir::open(dir.path(), &Device::Cpu).unwrap();
    let (ids, am, _) = batch();
    for storage in [FrozenStorage::Nf4, FrozenStorage::F32] {
        let from_disk = LlamaModel::new(&read, &src, &options(storage)).unwrap();
        let in_memory = LlamaModel::new(&cfg, &w, &options(storage)).unwrap();
        let a = from_disk
            .forward(&ids, Some(&am), None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = in_memory
            .forward(&ids, Some(&am), None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b, "{storage:?}");
    }
}

#[test]
fn bf16_checkpoint_with_llama3_rope_scaling_loads() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_cfg(1);
    cfg.rope_scaling = Some(
        serde_json::from_str(
            r#"{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        )
        .unwrap(),
    );
    let w = cfg.random_weights(3, DType::F32, &Device::Cpu).unwrap();
    write_checkpoint(dir.path(), &cfg, &w, DType::BF16);
    let src = SafetensorsDir::open(dir.path(), &Device::Cpu).unwrap();
    let m = LlamaModel::new(
        &read_config(dir.path()).unwrap(),
        &src,
        &options(FrozenStorage::Nf4DoubleQuant),
    )
    .unwrap();
    let (ids, am, _) = batch();
    let logits = m.forward(&ids, Some(&am), None).unwrap();
    assert_eq!(logits.dims(), &[2, 6, 37]);
    assert!(
        logits
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|x| x.is_finite())
    );
    // Scaling changes the low frequencies only.
    let inv = cfg.rope_inv_freq().unwrap();
    let mut plain = cfg.clone();
    plain.rope_scaling = None;
    let base = plain.rope_inv_freq().unwrap();
    assert_eq!(inv[0], base[0]);
    assert!(inv[3] < base[3]);
}

fn embedding_and_head(m: &LlamaModel) -> (Vec<f32>, Vec<f32>) {
    let w = m.dequantized_weights().unwrap();
    let v = |n: &str| w[n].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (v("model.embed_tokens.weight"), v("lm_head.weight"))
}

#[test]
fn embedding_and_head_stay_16_bit_unless_quantize_embeddings() {
    let cfg = tiny_cfg(1); // untied: an embedding and a head
    let as_f32 = |w: &HashMap<String, Tensor>, n: &str| {
        let t = w[n].to_dtype(DType::F32).unwrap();
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let nf4 = |w: &HashMap<String, Tensor>, n: &str| {
        let v = as_f32(w, n);
        qlora_scale::qlora::Nf4Tensor::quantize(&v, w[n].dims(), false)
            .unwrap()
            .dequantize()
    };
    for dtype in [DType::BF16, DType::F16] {
        let w = cfg.random_weights(3, dtype, &Device::Cpu).unwrap();
        let (embed, head) = ("model.embed_tokens.weight", "lm_head.weight");
        // By default: the base's 16-bit values exactly.
        let sixteen = LlamaModel::new(&cfg, &w, &options(FrozenStorage::Nf4)).unwrap();
        assert_eq!(
            embedding_and_head(&sixteen),
            (as_f32(&w, embed), as_f32(&w, head)),
            "{dtype:?}"
        );
        // With the setting: NF4, like the linears.
        let opts = ModelOptions {
            quantize_embeddings: true,
            ..options(FrozenStorage::Nf4)
        };
        let quantized = LlamaModel::new(&cfg, &w, &opts).unwrap();
        let (e, h) = embedding_and_head(&quantized);
        assert_eq!((&e, &h), (&nf4(&w, embed), &nf4(&w, head)), "{dtype:?}");
        assert_ne!(e, as_f32(&w, embed));
        // Two bytes a value against NF4's, for each of the two.
        let n = cfg.vocab_size * cfg.hidden_size;
        let extra = 2 * (2 * n - qlora_scale::qlora::nf4::nf4_storage_bytes(n));
        assert_eq!(sixteen.frozen_bytes() - quantized.frozen_bytes(), extra);
    }
}

#[test]
fn pickled_weights_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), b"not really a pickle").unwrap();
    let err = SafetensorsDir::open(dir.path(), &Device::Cpu).unwrap_err();
    assert!(matches!(err, LoadError::PickleRefused(_)));
    assert!(err.to_string().contains("pytorch_model.bin"), "{err}");
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        SafetensorsDir::open(empty.path(), &Device::Cpu),
        Err(LoadError::NoWeights(_))
    ));
}

#[test]
fn bad_files_give_errors_naming_file_or_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_cfg(1);
    let mut w = cfg.random_weights(3, DType::F32, &Device::Cpu).unwrap();
    w.insert(
        "model.layers.0.mlp.up_proj.weight".into(),
        Tensor::zeros((5, 5), DType::F32, &Device::Cpu).unwrap(),
    );
    write_checkpoint(dir.path(), &cfg, &w, DType::F32);
    let src = SafetensorsDir::open(dir.path(), &Device::Cpu).unwrap();
    let err = LlamaModel::new(&cfg, &src, &options(FrozenStorage::Nf4)).unwrap_err();
    assert!(
        err.to_string()
            .contains("model.layers.0.mlp.up_proj.weight"),
        "{err}"
    );
    w.remove("model.norm.weight");
    let err = LlamaModel::new(&cfg, &w, &options(FrozenStorage::Nf4)).unwrap_err();
    assert!(err.to_string().contains("model.norm.weight"), "{err}");
    // A corrupt shard and a broken config.
    std::fs::write(
        dir.path().join("model-00002-of-00002.safetensors"),
        b"garbage",
    )
    .unwrap();
    let err = SafetensorsDir::open(dir.path(), &Device::Cpu).unwrap_err();
    assert!(
        err.to_string().contains("model-00002-of-00002.safetensors"),
        "{err}"
    );
    std::fs::write(dir.path().join("config.json"), b"{").unwrap();
    let err = read_config(dir.path()).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");
}

/// transformers 5 writes `rope_parameters` in place of `rope_theta` and
/// `rope_scaling`: both spellings of a Llama 3 RoPE give the same frequencies.
#[test]
fn rope_parameters_read_like_rope_theta_and_rope_scaling() {
    let base = serde_json::json!({
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 128, "model_type": "llama"
    });
    let scaling = serde_json::json!({
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
    });
    let read = |extra: serde_json::Value| {
        let mut cfg = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
        read_config(dir.path()).unwrap()
    };
    let old = read(serde_json::json!({"rope_theta": 500000.0, "rope_scaling": scaling}));
    let mut params = scaling.clone();
    params["rope_theta"] = serde_json::json!(500000.0);
    let new = read(serde_json::json!({ "rope_parameters": params }));
    assert_eq!(new.rope_theta, 500000.0);
    assert_eq!(new.rope_scaling_kind(), Some("llama3"));
    assert_eq!(new.rope_inv_freq().unwrap(), old.rope_inv_freq().unwrap());
    let plain =
        read(serde_json::json!({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}));
    assert_eq!((plain.rope_theta, plain.rope_scaling), (1e6, None));
}

/// The `config.json` of the parity fixture `name` with `edit` applied, read as
/// `train` reads it.
fn read_fixture(
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> Result<LlamaConfig, String> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity")
        .join(name);
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    read_config(dir.path()).map_err(|e| e.to_string())
}

/// Gemma 2: a config without `layer_types` alternates sliding and full
/// attention as transformers does; a missing soft cap is named rather than
/// guessed, a `null` one is off; another activation is refused.
#[test]
fn gemma2_configs_are_read_as_transformers_reads_them() {
    let c = read_fixture("gemma2", |c| {
        c.as_object_mut().unwrap().remove("layer_types");
        c["num_hidden_layers"] = serde_json::json!(3);
    })
    .unwrap();
    let windows: Vec<_> = (0..3).map(|l| c.layer_window(l)).collect();
    assert_eq!(windows, [Some(6), None, Some(6)]);
    let c = read_fixture("gemma2", |c| {
        c["final_logit_softcapping"] = serde_json::Value::Null
    })
    .unwrap();
    assert_eq!(c.final_logit_softcapping, Some(None));
    assert_eq!(c.attn_logit_softcapping, Some(Some(50.0)));
    for key in [
        "attn_logit_softcapping",
        "query_pre_attn_scalar",
        "hidden_activation",
    ] {
        let err = read_fixture("gemma2", |c| {
            c.as_object_mut().unwrap().remove(key);
        })
        .unwrap_err();
        assert!(
            err.contains("config.json") && err.contains(key) && err.contains("absent"),
            "{err}"
        );
    }
    let err = read_fixture("gemma2", |c| {
        c["use_bidirectional_attention"] = serde_json::json!(true)
    })
    .unwrap_err();
    assert!(err.contains("use_bidirectional_attention"), "{err}");
    let err = read_fixture("gemma2", |c| {
        c["hidden_activation"] = serde_json::json!("gelu")
    })
    .unwrap_err();
    assert!(
        err.contains("hidden_activation") && err.contains("gelu_pytorch_tanh"),
        "{err}"
    );
}

/// Gemma 3: the flat RoPE keys of configs before transformers 5
/// (`rope_theta`, `rope_local_base_freq`) and `sliding_window_pattern` give
/// what `rope_parameters` per layer type and `layer_types` give; a missing
/// entry or base is named.
#[test]
fn gemma3_configs_old_and_new_give_the_same_model() {
    let new = read_fixture("gemma3", |_| {}).unwrap();
    let old = read_fixture("gemma3", |c| {
        let m = c.as_object_mut().unwrap();
        m.remove("rope_parameters");
        m.remove("layer_types");
        m.insert("rope_theta".into(), serde_json::json!(1e6));
        m.insert("rope_local_base_freq".into(), serde_json::json!(1e4));
        m.insert("sliding_window_pattern".into(), serde_json::json!(2));
    })
    .unwrap();
    assert_eq!(old.layer_types, new.layer_types);
    assert_eq!(old.rope_inv_freq().unwrap(), new.rope_inv_freq().unwrap());
    let local = new.sliding_rope_inv_freq().unwrap().unwrap();
    assert_eq!(old.sliding_rope_inv_freq().unwrap().unwrap(), local);
    assert_ne!(local, new.rope_inv_freq().unwrap());
    let err = read_fixture("gemma3", |c| {
        c["rope_parameters"]
            .as_object_mut()
            .unwrap()
            .remove("sliding_attention");
    })
    .unwrap_err();
    assert!(
        err.contains("rope_parameters") && err.contains("sliding_attention"),
        "{err}"
    );
    let err = read_fixture("gemma3", |c| {
        let m = c.as_object_mut().unwrap();
        m.remove("rope_parameters");
        m.insert("rope_theta".into(), serde_json::json!(1e6));
    })
    .unwrap_err();
    let flat = read_fixture("gemma3", |c| {
        c["rope_parameters"] = serde_json::json!({"rope_theta": 1e6, "rope_type": "default"})
    })
    .unwrap_err();
    assert!(
        flat.contains("rope_parameters") && flat.contains("sliding_attention"),
        "{flat}"
    );
    assert!(
        err.contains("rope_local_base_freq") && err.contains("absent"),
        "{err}"
    );
}

/// Phi-3: `partial_rotary_factor` is read from `rope_parameters`; LongRoPE
/// (the 128k models) and a factor that leaves no even rotary width are
/// refused by name.
#[test]
fn phi3_rope_parameters_are_read_or_refused_by_name() {
    let c = read_fixture("phi3_partial", |_| {}).unwrap();
    assert_eq!((c.partial_rotary_factor, c.rotary_dim()), (Some(0.5), 4));
    assert_eq!(c.rope_inv_freq().unwrap().len(), 2);
    let err = read_fixture("phi3", |c| {
        c["rope_parameters"] = serde_json::json!({
            "rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0, 1.0], "long_factor": [2.0, 2.0]
        });
    })
    .unwrap_err();
    assert!(
        err.contains("rope_parameters") && err.contains("longrope"),
        "{err}"
    );
    let err = read_fixture("phi3", |c| {
        c["rope_parameters"]["partial_rotary_factor"] = serde_json::json!(0.1);
    })
    .unwrap_err();
    assert!(
        err.contains("partial_rotary_factor") && err.contains("0.1"),
        "{err}"
    );
}
