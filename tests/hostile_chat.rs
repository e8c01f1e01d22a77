//! `train` on a model whose `tokenizer_config.json` carries a hostile
//! `chat_template`: one that loops without end and one that prints without
//! end, and ones that build ever larger strings without printing them. Each run ends within seconds with exit status 1 (never a panic's
//! 101 or a signal), its message names `tokenizer_config.json` and the limit
//! it hit, and the printing one stays within bounded memory. A long normal
//! conversation is split into segments in linear time.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qlora_scale::train::chat::ChatTemplate;
use qlora_scale::train::data::Message;

mod train_common;

/// A run is killed (and the test fails) past this.
const TIMEOUT: Duration = Duration::from_secs(60);
/// A run is killed (and the test fails) once its resident memory passes
/// this, so a template that does blow up cannot take the machine with it.
const RSS_KILL_KB: u64 = 3 << 20;
/// The peak resident memory a refused run may reach.
const PEAK_LIMIT_KB: u64 = 1 << 20;

/// How a `train` run ended.
struct Ended {
    code: Option<i32>,
    stderr: String,
    elapsed: Duration,
    peak_kb: u64,
}

fn rss_kb(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `train` on a local model whose template is `template`, on one
/// conversation, and reaps it with `wait4` for its own peak memory.
fn run(template: &str) -> Ended {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    train_common::write_local_model(&model);
    let cfg = serde_json::json!({
        "bos_token": "<s>", "eos_token": "</s>", "chat_template": template
    });
    std::fs::write(model.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let conv = serde_json::json!({"messages": [
        {"role": "user", "content": "the river runs"},
        {"role": "assistant", "content": "past the mill ."}
    ]});
    std::fs::write(data.join("train.jsonl"), format!("{conv}\n")).unwrap();
    let stderr_path = dir.path().join("stderr.txt");
    let mut cmd: Command = train_common::train_without_profile(dir.path());
    cmd.arg("--model")
        .arg(&model)
        .arg("--data-dir")
        .arg(&data)
        .args(["--max-steps", "1", "--output-dir", "out"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    let started = Instant::now();
    let child = cmd.spawn().expect("train starts");
    let pid = child.id() as i32;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of that C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `pid` is our own child, not yet reaped; both pointers are
        // to live locals.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        assert!(r >= 0, "wait4: {}", std::io::Error::last_os_error());
        if r == pid {
            break;
        }
        let over = rss_kb(pid).is_some_and(|kb| kb > RSS_KILL_KB);
        if over || started.elapsed() > TIMEOUT {
            // SAFETY: signalling our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: as above; this reaps it.
            unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            panic!(
                "train killed after {:?}: {}",
                started.elapsed(),
                if over {
                    "resident memory past the kill limit"
                } else {
                    "timed out"
                }
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(child);
    let elapsed = started.elapsed();
    Ended {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        stderr: std::fs::read_to_string(&stderr_path).unwrap(),
        elapsed,
        // ru_maxrss is in kilobytes on Linux.
        peak_kb: usage.ru_maxrss as u64,
    }
}

/// The run failed cleanly, in time, naming the file and `limit`.
fn refused(end: &Ended, limit: &str) {
    let err = &end.stderr;
    eprintln!(
        "ended in {:?}, peak {} KiB: {}",
        end.elapsed,
        end.peak_kb,
        err.trim()
    );
    assert_eq!(end.code, Some(1), "exit status (101 is a panic): {err}");
    assert!(
        end.elapsed < Duration::from_secs(30),
        "took {:?}",
        end.elapsed
    );
    assert!(err.contains("tokenizer_config.json"), "{err}");
    assert!(err.contains(limit), "{limit:?} not in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_template_that_loops_without_end_runs_out_of_fuel() {
    let end = run(
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}\
         {% for m in messages %}{{ m.content }}{% endfor %}",
    );
    refused(&end, "trainer.chat_template_fuel");
}

#[test]
fn a_template_that_prints_without_end_hits_the_output_limit_in_bounded_memory() {
    let end = run(
        "{% for i in range(100000) %}{{ 'a' * 100000000 }}{% endfor %}\
         {% for m in messages %}{{ m.content }}{% endfor %}",
    );
    refused(&end, "trainer.chat_template_max_bytes");
    assert!(
        end.peak_kb < PEAK_LIMIT_KB,
        "peak resident memory {} KiB",
        end.peak_kb
    );
}

#[test]
fn a_template_that_doubles_a_string_it_never_prints_stops_at_the_memory_limit() {
    // One instruction per doubling: far within the fuel limit, and never
    // written, so the output limit does not see it either. Forty doublings
    // would be a terabyte.
    let end = run(
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}\
         {% for m in messages %}{{ m.content }}{% endfor %}",
    );
    refused(&end, "trainer.chat_template_max_memory_bytes");
    assert!(
        end.peak_kb < PEAK_LIMIT_KB,
        "peak resident memory {} KiB",
        end.peak_kb
    );
}

#[test]
fn a_template_that_squares_a_string_with_replace_stops_at_the_memory_limit() {
    let end = run(
        "{% set ns = namespace(s='aaaaaaaa') %}{% for i in range(5) %}{% set ns.s = ns.s | replace('a', ns.s) %}{% endfor %}\
         {% for m in messages %}{{ m.content }}{% endfor %}",
    );
    refused(&end, "trainer.chat_template_max_memory_bytes");
    assert!(
        end.peak_kb < PEAK_LIMIT_KB,
        "peak resident memory {} KiB",
        end.peak_kb
    );
}

const CHATML: &str = "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

fn conversation(n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| Message {
            role: if i % 2 == 0 { "user" } else { "assistant" }.into(),
            content: format!("message number {i}"),
        })
        .collect()
}

#[test]
fn five_thousand_messages_split_into_segments_in_well_under_a_second_or_two() {
    let t = ChatTemplate::new(CHATML, None, Some("<|im_end|>".into())).unwrap();
    let conv = conversation(5000);
    let started = Instant::now();
    let segs = t.segments(&conv).unwrap();
    let elapsed = started.elapsed();
    eprintln!("5000 messages: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    assert_eq!(segs.len(), 5000);
    assert_eq!(segs[1], ("message number 1<|im_end|>\n".to_string(), true));
    assert_eq!(
        segs[4998],
        (
            "<|im_start|>user\nmessage number 4998<|im_end|>\n<|im_start|>assistant\n".to_string(),
            false
        )
    );
    assert_eq!(
        segs[4999],
        ("message number 4999<|im_end|>\n".to_string(), true)
    );
    let all: String = segs.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(all, t.render(&conv, false).unwrap());
}

/// The linear split gives what rendering every prefix gives, for templates
/// of the common families and a conversation with a system prompt.
#[test]
fn the_linear_split_matches_the_prefix_by_prefix_one() {
    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
    const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}";
    let mut with_system = conversation(41);
    with_system.insert(
        0,
        Message {
            role: "system".into(),
            content: " Be brief. ".into(),
        },
    );
    for (template, conv) in [
        (CHATML, &with_system),
        (LLAMA3, &with_system),
        (MISTRAL, &conversation(40)),
    ] {
        let t = ChatTemplate::new(template, Some("<s>".into()), Some("</s>".into())).unwrap();
        let fast = t.segments(conv).unwrap();
        assert_eq!(fast, slow_segments(&t, conv), "{template}");
    }
}

/// The segments as the prefix-by-prefix definition gives them.
fn slow_segments(t: &ChatTemplate, messages: &[Message]) -> Vec<(String, bool)> {
    let mut out: Vec<(String, bool)> = Vec::new();
    let mut prev = String::new();
    for (i, m) in messages.iter().enumerate() {
        let full = t.render(&messages[..=i], false).unwrap();
        if m.role == "assistant" {
            let head = t.render(&messages[..i], true).unwrap();
            out.push((head.strip_prefix(prev.as_str()).unwrap().into(), false));
            out.push((full.strip_prefix(head.as_str()).unwrap().into(), true));
        } else {
            out.push((full.strip_prefix(prev.as_str()).unwrap().into(), false));
        }
        prev = full;
    }
    let mut merged: Vec<(String, bool)> = Vec::new();
    for (text, trained) in out {
        match merged.last_mut() {
            _ if text.is_empty() => {}
            Some(last) if last.1 == trained => last.0.push_str(&text),
            _ => merged.push((text, trained)),
        }
    }
    merged
}

#[test]
fn a_template_that_reads_every_message_first_still_splits_exactly() {
    // Reads all messages before printing any, so the probe's boundaries are
    // wrong and the split falls back to rendering every prefix.
    let t = ChatTemplate::new(
        "{% set n = messages | map(attribute='content') | join('') | length %}\
         {%- for message in messages %}<{{ message.role }}>{{ message.content }}</>{% endfor %}\
         {%- if add_generation_prompt %}<assistant>{% endif %}",
        None,
        None,
    )
    .unwrap();
    let conv = conversation(12);
    assert_eq!(t.segments(&conv).unwrap(), slow_segments(&t, &conv));
}
