//! `train generate` and `train eval`: a run's base + adapter (or its base
//! alone, or a model directory) put to use.

use std::io::{self, Write};

use anyhow::Context as _;
use qlora_scale::qlora::{FrozenStorage, LlamaModel};
use qlora_scale::train::evaluate::{EvalOptions, EvalReport, evaluate};
use qlora_scale::train::generate::{
    GenerateError, GenerateOptions, Prompt, Sampler, Stop, generate, prompt_ids, read_messages,
};
use qlora_scale::train::model::{build_on, load_adapter, run_spec};
use qlora_scale::train::settings::Settings;
use qlora_scale::train::spec::{RunSpec, plan};
use qlora_scale::train::tokenizer::Tokenizer;

use crate::args::{EvalArgs, GenerateArgs, ModelSource};

/// A model ready to use, and whether it has an adapter.
struct Loaded {
    model: LlamaModel,
    tok: Tokenizer,
    spec: RunSpec,
    adapter: bool,
}

/// The model of `source`: a run's base rebuilt from its newest checkpoint's
/// spec, with the run's adapter unless `base_only`; or a model directory,
/// resolved as `train --model` resolves it, without an adapter.
fn load(source: &ModelSource, base_only: bool) -> anyhow::Result<Loaded> {
    let compute = source.device.resolve()?;
    let build = |spec: &RunSpec| build_on(spec, &compute, FrozenStorage::Nf4);
    if let Some(dir) = &source.model {
        let settings = Settings {
            model: Some(dir.clone()),
            ..Settings::default()
        };
        let profile_path = qlora_scale::saved_profile::default_profile_path()
            .context("cannot tell where the saved profile lives")?;
        let mut spec = plan(&settings, &profile_path, crate::detected_machine)?.spec;
        // A plain model: no adapter to build.
        spec.settings.lora_rank = 0;
        let (model, tok) = build(&spec).with_context(|| format!("loading --model {dir}"))?;
        return Ok(Loaded {
            model,
            tok,
            spec,
            adapter: false,
        });
    }
    let run_dir = source.run_dir();
    let spec = run_spec(&run_dir).with_context(|| format!("--run-dir {}", run_dir.display()))?;
    let (model, tok) = build(&spec).with_context(|| format!("rebuilding {}", spec.model))?;
    if !base_only {
        load_adapter(&model, &run_dir)
            .with_context(|| format!("loading the adapter of {}", run_dir.display()))?;
    }
    Ok(Loaded {
        model,
        tok,
        spec,
        adapter: !base_only,
    })
}

/// `train generate`.
pub fn run_generate(args: &GenerateArgs) -> anyhow::Result<()> {
    // Read the input before the model: a bad file fails fast.
    let prompt = match (&args.messages, &args.prompt) {
        (Some(path), _) => Prompt::Messages(read_messages(path)?),
        (None, Some(text)) => Prompt::Text {
            text: text.clone(),
            raw: args.raw,
        },
        (None, None) => anyhow::bail!("give --prompt TEXT or --messages FILE"),
    };
    if matches!(&prompt, Prompt::Text { text, .. } if text.is_empty()) {
        Err(qlora_scale::train::generate::InputError::EmptyPrompt)?;
    }
    let m = load(&args.source, args.base_only)?;
    let ids = prompt_ids(&m.tok, &prompt)?;
    let mut sampler = Sampler::new(args.temperature, args.top_p, args.seed);
    let options = GenerateOptions {
        max_new_tokens: usize::try_from(args.max_new_tokens).unwrap_or(usize::MAX),
        adapters: m.adapter,
    };
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let stats = match generate(&m.model, &m.tok, &ids, options, &mut sampler, |text| {
        out.write_all(text.as_bytes())?;
        out.flush()
    }) {
        Ok(stats) => stats,
        // The reader is gone (`train generate ... | head`): nothing to say.
        Err(GenerateError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    out.write_all(b"\n")
        .and_then(|()| out.flush())
        .context("cannot write to stdout")?;
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    tracing::info!(
        "prompt: {} tokens, {:.1} tokens/s; generated: {} tokens, {:.1} tokens/s; stopped {}",
        stats.prompt_tokens,
        rate(stats.prompt_tokens, stats.prompt_secs),
        stats.generated_tokens,
        rate(stats.generated_tokens, stats.generation_secs),
        match stats.stop {
            Stop::Eos => "at EOS",
            Stop::MaxTokens => "at --max-new-tokens",
            Stop::Context => "at the end of the model's context",
        }
    );
    Ok(())
}

/// `train eval`.
pub fn run_eval(args: &EvalArgs) -> anyhow::Result<()> {
    let m = load(&args.source, false)?;
    let options = EvalOptions {
        seq_len: m.spec.settings.seq_len as usize,
        batch_size: m.spec.settings.batch_size as usize,
        max_batches: args.max_batches,
        adapter: m.adapter,
        strict: args.strict,
    };
    let report = evaluate(&m.model, &m.tok, &args.data, options)
        .with_context(|| format!("evaluating on --data {}", args.data.display()))?;
    for bad in &report.first_bad_lines {
        tracing::warn!("skipped {bad}");
    }
    let text = if args.json {
        serde_json::to_string(&report).context("cannot serialise the report")? + "\n"
    } else {
        table(&report)
    };
    let stdout = io::stdout();
    let mut out = stdout.lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

/// The report as a small table.
fn table(r: &EvalReport) -> String {
    let mut s = format!("{:<16} {:>10} {:>12}\n", "model", "loss", "perplexity");
    s += &format!(
        "{:<16} {:>10.4} {:>12.3}\n",
        "base", r.base.loss, r.base.perplexity
    );
    if let Some(a) = r.adapter {
        s += &format!(
            "{:<16} {:>10.4} {:>12.3}\n",
            "base + adapter", a.loss, a.perplexity
        );
    }
    s += &format!(
        "{} target tokens in {} examples ({} batches) of {}",
        r.tokens,
        r.examples,
        r.batches,
        r.data.display()
    );
    if r.bad_lines > 0 {
        s += &format!("; {} bad lines skipped", r.bad_lines);
    }
    s.push('\n');
    s
}
