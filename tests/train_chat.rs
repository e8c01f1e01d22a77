//! Conversations in the model's own chat template (`tokenizer_config.json`'s
//! Jinja `chat_template`): real templates of the ChatML and Llama 3 families
//! render, the assistant replies alone are trained, a template's
//! `raise_exception` and a broken template are clear errors, and the
//! default template applies without one.

use std::path::Path;

use qlora_scale::train::chat::ChatTemplate;
use qlora_scale::train::data::{Message, Record, tokenize};
use qlora_scale::train::tokenizer::{Tokenizer, TokenizerError};

/// Qwen2.5's template, system-prompt default and tool branches dropped.
const CHATML: &str = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/// Llama 3's template as published.
const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// Mistral's v0.1 template: roles must alternate, via raise_exception.
const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}";

fn msg(role: &str, content: &str) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
    }
}

#[test]
fn chatml_segments_train_the_reply_and_its_end_of_turn_only() {
    let t = ChatTemplate::new(CHATML, None, Some("<|im_end|>".into())).unwrap();
    let conv = [
        msg("system", "Be brief."),
        msg("user", "hi"),
        msg("assistant", "hello"),
        msg("user", "bye"),
        msg("assistant", "see you"),
    ];
    let segs = t.segments(&conv).unwrap();
    let trained: Vec<&str> = segs.iter().filter(|s| s.1).map(|s| s.0.as_str()).collect();
    assert_eq!(trained, ["hello<|im_end|>\n", "see you<|im_end|>\n"]);
    let all: String = segs.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(all, t.render(&conv, false).unwrap());
    assert!(all.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n"));
}

#[test]
fn llama3_template_with_bos_and_python_methods_renders() {
    let t = ChatTemplate::new(
        LLAMA3,
        Some("<|begin_of_text|>".into()),
        Some("<|eot_id|>".into()),
    )
    .unwrap();
    let conv = [msg("user", "  hi  "), msg("assistant", "hello")];
    let segs = t.segments(&conv).unwrap();
    assert_eq!(
        segs,
        [
            (
                "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n".to_string(),
                false
            ),
            ("hello<|eot_id|>".to_string(), true),
        ]
    );
}

#[test]
fn a_templates_own_exception_and_a_syntax_error_are_clear() {
    let t = ChatTemplate::new(MISTRAL, Some("<s>".into()), Some("</s>".into())).unwrap();
    let ok = t
        .segments(&[msg("user", "hi"), msg("assistant", "hello")])
        .unwrap();
    assert_eq!(ok[1], ("hello</s>".to_string(), true));
    let err = t
        .segments(&[msg("assistant", "hello"), msg("user", "hi")])
        .unwrap_err();
    assert!(err.contains("Conversation roles must alternate"), "{err}");
    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }", None, None).unwrap_err();
    assert!(err.contains("chat template line 1"), "{err}");
}

/// A word-level tokenizer whose special tokens are ChatML's, with that
/// template in `tokenizer_config.json`.
fn write_chatml_model(dir: &Path, template: &str) {
    let words = [
        "<unk>",
        "<s>",
        "<|im_start|>",
        "<|im_end|>",
        "user",
        "assistant",
        "hi",
        "hello",
    ];
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i.into()))
        .collect();
    let added: Vec<serde_json::Value> = [(1, "<s>"), (2, "<|im_start|>"), (3, "<|im_end|>")]
        .iter()
        .map(|(id, c)| {
            serde_json::json!({"id": id, "content": c, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let cfg = serde_json::json!({
        "bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": template
    });
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
}

#[test]
fn a_conversation_is_tokenized_in_the_models_template() {
    let dir = tempfile::tempdir().unwrap();
    write_chatml_model(dir.path(), CHATML);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert!(tok.chat_template().is_some());
    let rec = Record::Messages {
        messages: vec![msg("user", "hi"), msg("assistant", "hello")],
    };
    let ex = tokenize(&rec, &tok).unwrap();
    // BOS (the template writes none), then the template's tokens.
    assert_eq!(ex.ids, [1, 2, 4, 6, 3, 2, 5, 7, 3]);
    assert_eq!(ex.targets, [0, 0, 0, 0, 0, 0, 0, 1, 1]);
}

#[test]
fn a_broken_template_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_chatml_model(dir.path(), "{% if %}");
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, TokenizerError::Template { .. }));
    let text = err.to_string();
    assert!(
        text.contains("tokenizer_config.json: chat_template:"),
        "{text}"
    );
}

#[test]
fn without_a_template_the_default_one_applies() {
    let rec = Record::Messages {
        messages: vec![msg("user", "hi"), msg("assistant", "yo")],
    };
    let ex = tokenize(&rec, &Tokenizer::Bytes).unwrap();
    let text: Vec<u8> = ex
        .ids
        .iter()
        .filter(|&&i| i < 256)
        .map(|&i| i as u8)
        .collect();
    assert_eq!(text, b"<|user|>\nhi\n<|assistant|>\nyo\n");
    let trained: Vec<u8> = ex
        .ids
        .iter()
        .zip(&ex.targets)
        .filter(|(i, t)| **t == 1 && **i < 256)
        .map(|(&i, _)| i as u8)
        .collect();
    assert_eq!(trained, b"yo");
}
