//! Data-parallel training over MPI with real processes: `mpirun -np 2` on
//! the built `train` binary, on the embedded model at tiny sizes.
//!
//! - over an epoch the ranks' shards cover every example exactly once;
//! - 2 ranks with batch B give, step by step, the losses and the adapter of
//!   1 rank with batch 2B (and of 2 ranks with batch B/2 and 2 accumulation
//!   steps): the global batch is split, not changed;
//! - only rank 0 writes files (rank 1 runs in its own empty directory);
//! - a killed rank ends the run with a message naming it, a hung one is
//!   caught by the watchdog, and the last checkpoint loads;
//! - a resumed 2-rank run reproduces the uninterrupted one; a resume with
//!   another world size works only with the same global batch;
//! - ranks that disagree about the configuration stop with a clear error.
//!
//! Needs Open MPI (`mpirun`): `cargo test --features mpi --test train_mpi`.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use qlora_scale::train::checkpoint;
use serde_json::Value;

mod train_common;

/// Tiny settings shared by every run here.
const TINY: [&str; 14] = [
    "--seq-len",
    "32",
    "--grad-accum-steps",
    "1",
    "--lora-rank",
    "4",
    "--warmup-steps",
    "2",
    "--eval-every",
    "3",
    "--seed",
    "11",
    "--checkpoint-every",
    "3",
];

use train_common::TRAIN;

/// Generous: a loaded CI machine with 2 cores.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// `train` with TINY and `args`, as a process of its own.
fn train_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(TRAIN);
    env(&mut cmd, dir);
    cmd.arg("--profile-path")
        .arg(dir.join("no-profile.json"))
        .args(TINY)
        .args(args);
    cmd
}

fn env(cmd: &mut Command, dir: &Path) {
    train_common::sandbox(cmd, dir)
        // One thread per rank: two ranks share the two cores.
        .env("RAYON_NUM_THREADS", "1")
        // CI runs as root.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
}

/// `mpirun -np 2 train TINY args` in `dir`.
fn mpirun_cmd(dir: &Path, args: &[&str]) -> Command {
    mpmd(dir, &[(dir, args), (dir, args)])
}

/// `mpirun` with one process per `(working directory, arguments)`.
fn mpmd(dir: &Path, ranks: &[(&Path, &[&str])]) -> Command {
    mpmd_with(dir, &[], ranks)
}

/// [`mpmd`], with `global` options of `mpirun` before the processes.
fn mpmd_with(dir: &Path, global: &[&std::ffi::OsStr], ranks: &[(&Path, &[&str])]) -> Command {
    let mut cmd = Command::new("mpirun");
    env(&mut cmd, dir);
    cmd.args(["--oversubscribe", "--bind-to", "none"]);
    cmd.args(global);
    for (i, (wdir, args)) in ranks.iter().enumerate() {
        if i > 0 {
            cmd.arg(":");
        }
        cmd.args(["-np", "1", "--wdir"])
            .arg(wdir)
            .arg("-x")
            .arg("RAYON_NUM_THREADS")
            .arg(TRAIN)
            .arg("--profile-path")
            .arg(dir.join("no-profile.json"))
            .args(TINY)
            .args(*args);
    }
    cmd
}

/// Runs `cmd` to its end, at most RUN_TIMEOUT.
fn output(mut cmd: Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command starts (is Open MPI's mpirun installed?)");
    wait_output(child, RUN_TIMEOUT)
}

fn wait_output(mut child: Child, timeout: Duration) -> Output {
    let start = Instant::now();
    // Read the pipes on threads so a chatty child cannot block.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut out, &mut v).ok();
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut err, &mut v).ok();
        v
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > timeout {
            child.kill().ok();
            panic!("still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

fn ok(out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "the run failed: {err}");
    err
}

fn failed(out: Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the run should fail: {err}");
    err
}

/// `(step, metrics line)` of a run.
fn metrics(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-12)
}

/// Same steps, and each step's loss, gradient norm and validation loss
/// within `rel`.
fn assert_same_losses(a: &Path, b: &Path, rel: f64) {
    assert_same(a, b, rel, &["loss", "grad_norm", "val_loss"]);
}

/// Same steps, and each step's `keys` within `rel`.
fn assert_same(a: &Path, b: &Path, rel: f64, keys: &[&str]) {
    let (ma, mb) = (metrics(a), metrics(b));
    assert_eq!(ma.len(), mb.len(), "{} vs {}", a.display(), b.display());
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(x["step"], y["step"]);
        for &key in keys {
            match (x[key].as_f64(), y[key].as_f64()) {
                (Some(p), Some(q)) => assert!(
                    close(p, q, rel),
                    "step {}: {key} {p} vs {q} ({} vs {})",
                    x["step"],
                    a.display(),
                    b.display()
                ),
                (None, None) => {}
                other => panic!("step {}: {key} {other:?}", x["step"]),
            }
        }
    }
}

fn adapter(run: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(run.join("adapter_model.safetensors")).unwrap();
    let mut t: Vec<(String, Tensor)> = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t.into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

/// Every adapter tensor within `rel` of the other: the norm of the
/// difference relative to the tensor's norm. (Single elements are not
/// compared one by one: AdamW divides by the root of the second moment, so
/// an element whose gradient is nearly zero turns the last-bit differences
/// of a summation order into relative differences of its update.)
fn assert_same_adapter(a: &Path, b: &Path, rel: f64) {
    let (ta, tb) = (adapter(a), adapter(b));
    assert_eq!(ta.len(), tb.len());
    let mut worst = 0f64;
    for ((na, va), (nb, vb)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        let norm = va.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let diff = va
            .iter()
            .zip(vb)
            .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let r = diff / norm.max(1e-12);
        worst = worst.max(r);
        assert!(r <= rel, "{na}: relative difference {r}");
    }
    eprintln!(
        "adapters {} and {}: worst relative difference {worst:e}",
        a.display(),
        b.display()
    );
}

#[test]
fn two_ranks_match_one_rank_with_twice_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let common = ["--lora-dropout", "0", "--max-steps", "6"];
    ok(output(train_cmd(
        d,
        &[&common[..], &["--batch-size", "4", "--output-dir", "one"]].concat(),
    )));
    // Rank 1 works in a directory of its own, which must stay empty.
    let rank1 = d.join("rank1");
    std::fs::create_dir(&rank1).unwrap();
    let args = [&common[..], &["--batch-size", "2", "--output-dir", "two"]].concat();
    ok(output(mpmd(d, &[(d, &args), (&rank1, &args)])));
    assert_same_losses(&d.join("one"), &d.join("two"), 1e-5);
    // gemm's AVX-512 kernels block products of different row counts
    // differently, and six AdamW steps carry those last-bit differences into
    // the adapter (up to 1.7e-5 seen); a wrong gradient average would be off
    // by far more.
    assert_same_adapter(&d.join("one"), &d.join("two"), 1e-4);
    let left: Vec<PathBuf> = std::fs::read_dir(&rank1)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "rank 1 wrote {left:?}");
    let m = metrics(&d.join("two"));
    assert!(m.iter().all(|l| l["allreduce_ms"].as_f64().is_some()));
    assert_eq!(
        m[0]["tokens"],
        metrics(&d.join("one"))[0]["tokens"],
        "global tokens"
    );

    // The same global batch as 2 ranks x 1 example x 2 accumulation steps.
    ok(output(mpirun_cmd(
        d,
        &[
            &common[..],
            &[
                "--batch-size",
                "1",
                "--grad-accum-steps",
                "2",
                "--output-dir",
                "accum",
            ],
        ]
        .concat(),
    )));
    // Validation batches are global micro-batches (here 2 examples, not
    // 4), so the validation loss covers other examples: not compared.
    assert_same(
        &d.join("one"),
        &d.join("accum"),
        1e-5,
        &["loss", "grad_norm"],
    );
    assert_same_adapter(&d.join("one"), &d.join("accum"), 1e-4);
}

#[test]
fn an_epoch_over_two_ranks_covers_every_example_once() {
    let dir = tempfile::tempdir().unwrap();
    let n = include_str!("../data/default/train.jsonl").lines().count();
    // Global batch 8 (4 per rank): exactly one epoch of the default corpus.
    assert_eq!(n % 8, 0, "the corpus has {n} examples");
    let steps = (n / 8).to_string();
    let mut cmd = mpirun_cmd(
        dir.path(),
        &[
            "--batch-size",
            "4",
            "--max-steps",
            &steps,
            "--eval-every",
            "100000",
            "--checkpoint-every",
            "100000",
        ],
    );
    cmd.env("QLORA_SCALE_LOG", "qlora_scale::shard=trace");
    let err = ok(output(cmd));
    let mut seen = vec![Vec::new(); n];
    let mut lines = 0;
    for line in err.lines().filter(|l| l.contains("examples=[")) {
        let rank: usize = field(line, "rank=").parse().unwrap();
        let step: usize = field(line, "step=").parse().unwrap();
        let list = line.split("examples=[").nth(1).unwrap();
        let list = &list[..list.find(']').unwrap()];
        let ids: Vec<usize> = list.split(", ").map(|x| x.parse().unwrap()).collect();
        assert_eq!(ids.len(), 4, "{line}");
        for i in ids {
            seen[i].push((step, rank));
        }
        lines += 1;
    }
    assert_eq!(lines, 2 * n / 8, "one line per rank and step:\n{err}");
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(s.len(), 1, "example {i} trained at (step, rank) {s:?}");
    }
}

/// The value after `key` up to the next space.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let rest = &line[line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len()..];
    rest.split(' ').next().unwrap()
}

#[test]
fn dry_run_shows_rank_world_and_batches() {
    let dir = tempfile::tempdir().unwrap();
    let args: &[&str] = &[
        "--batch-size",
        "3",
        "--grad-accum-steps",
        "2",
        "--dry-run",
        "--json",
    ];
    // Each rank's stdout in a file of its own: mpirun forwards a rank's
    // output in pieces, and one rank's 2.6 KB JSON line would interleave
    // with the other's on a shared stdout.
    let files = dir.path().join("stdout");
    let global = [std::ffi::OsStr::new("--output-filename"), files.as_os_str()];
    let d = dir.path();
    let out = output(mpmd_with(d, &global, &[(d, args), (d, args)]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut ranks: Vec<Value> = (0..2)
        .map(|r| {
            let path = files.join(format!("1/rank.{r}/stdout"));
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
            serde_json::from_str(text.trim()).unwrap()
        })
        .collect();
    ranks.sort_by_key(|v| v["rank"].as_u64());
    assert_eq!(ranks.len(), 2);
    for (r, v) in ranks.iter().enumerate() {
        assert_eq!(v["rank"], r as u64);
        assert_eq!(v["world_size"], 2);
        assert_eq!(v["collective"], "mpi");
        assert_eq!(v["batch_size"], 3);
        assert_eq!(v["per_rank_batch_size"], 3);
        assert_eq!(v["global_batch_size"], 12, "3 x 2 ranks x 2 accumulation");
    }
}

#[test]
fn resumed_two_rank_run_reproduces_the_straight_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Dropout on: each rank's masks must come back on resume too.
    let common = [
        "--lora-dropout",
        "0.1",
        "--max-steps",
        "6",
        "--batch-size",
        "2",
    ];
    ok(output(mpirun_cmd(
        d,
        &[&common[..], &["--output-dir", "straight"]].concat(),
    )));
    ok(output(mpirun_cmd(
        d,
        &[&common[..], &["--output-dir", "killed"]].concat(),
    )));
    // The run "died" after step 3's checkpoint.
    let killed = d.join("killed");
    std::fs::remove_file(checkpoint::checkpoint_path(&killed.join("checkpoints"), 6)).unwrap();
    let err = ok(output(mpirun_cmd(
        d,
        &[&common[..], &["--output-dir", "killed", "--resume"]].concat(),
    )));
    assert!(err.contains("resumed from"), "{err}");
    let (a, b) = (metrics(&d.join("straight")), metrics(&killed));
    assert_eq!(a.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            (&x["step"], &x["loss"], &x["val_loss"]),
            (&y["step"], &y["loss"], &y["val_loss"]),
            "same losses step for step"
        );
    }
}

#[test]
fn resume_with_another_world_size_needs_the_same_global_batch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let common = ["--lora-dropout", "0", "--max-steps", "6"];
    ok(output(mpirun_cmd(
        d,
        &[&common[..], &["--batch-size", "2", "--output-dir", "two"]].concat(),
    )));
    let stop_at_3 = |name: &str| {
        let run = d.join(name);
        copy_dir(&d.join("two"), &run);
        std::fs::remove_file(checkpoint::checkpoint_path(&run.join("checkpoints"), 6)).unwrap();
    };
    // One rank with the same global batch continues the same run.
    stop_at_3("one");
    ok(output(train_cmd(
        d,
        &[
            &common[..],
            &["--batch-size", "4", "--output-dir", "one", "--resume"],
        ]
        .concat(),
    )));
    assert_same_losses(&d.join("two"), &d.join("one"), 1e-5);
    // One rank with the per-rank batch would halve it: refused.
    stop_at_3("half");
    let err = failed(output(train_cmd(
        d,
        &[
            &common[..],
            &["--batch-size", "2", "--output-dir", "half", "--resume"],
        ]
        .concat(),
    )));
    assert!(
        err.contains("written by 2 rank(s) with a global batch of 4")
            && err.contains("this run has 1 rank(s) and a global batch of 2"),
        "{err}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn ranks_that_disagree_stop_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = output(mpmd(
        d,
        &[
            (d, &["--max-steps", "2", "--batch-size", "2"]),
            (d, &["--max-steps", "2", "--batch-size", "3"]),
        ],
    ));
    let err = failed(out);
    assert!(
        err.contains("rank 1 disagrees with rank 0: batch_size is 2 on rank 0 but 3 here"),
        "{err}"
    );
}

/// The pid of rank `rank` among `mpirun`'s children.
fn rank_pid(mpirun: u32, rank: usize) -> Option<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{mpirun}/task/{mpirun}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|&b| b == 0)
                    .any(|kv| kv == format!("OMPI_COMM_WORLD_RANK={rank}").as_bytes())
            })
        })
}

/// Starts a long 2-rank run in `d/run` that checkpoints every step, and
/// waits for its second checkpoint and for rank 1's pid.
fn start_long_run(d: &Path, extra: &[&str]) -> (Child, u32) {
    let mut cmd = mpirun_cmd(
        d,
        &[
            &[
                "--max-steps",
                "100000",
                "--batch-size",
                "1",
                "--checkpoint-every",
                "1",
                "--keep-checkpoints",
                "2",
                "--output-dir",
                "run",
            ][..],
            extra,
        ]
        .concat(),
    );
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let pid = loop {
        let cks = checkpoint::list(&d.join("run/checkpoints"));
        if cks.len() >= 2
            && let Some(pid) = rank_pid(child.id(), 1)
        {
            break Some(pid);
        }
        if start.elapsed() > RUN_TIMEOUT || child.try_wait().unwrap().is_some() {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let Some(pid) = pid else {
        child.kill().ok();
        let out = child.wait_with_output().unwrap();
        panic!(
            "no two checkpoints and rank 1: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    (child, pid)
}

fn newest_checkpoint_loads(run: &Path) {
    let cks = checkpoint::list(&run.join("checkpoints"));
    let (step, newest) = cks.last().expect("checkpoints were written");
    let ck = checkpoint::load(newest).expect("the last checkpoint verifies");
    assert_eq!(ck.state.step, *step);
    assert_eq!(ck.state.world_size, 2);
}

#[test]
fn killed_rank_ends_the_run_naming_it_and_the_last_checkpoint_loads() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (child, pid) = start_long_run(d, &[]);
    let killed = Instant::now();
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    let err = failed(wait_output(child, Duration::from_secs(60)));
    assert!(
        killed.elapsed() < Duration::from_secs(60),
        "ended within a bounded time"
    );
    assert!(err.contains("rank 1"), "the message names rank 1: {err}");
    newest_checkpoint_loads(&d.join("run"));
}

#[test]
fn hung_rank_is_caught_by_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (child, pid) = start_long_run(d, &["--collective-timeout", "3"]);
    Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap();
    let out = wait_output(child, Duration::from_secs(60));
    // Let the stopped rank go, should the launcher have left it.
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .ok();
    let err = failed(out);
    assert!(
        err.contains("rank 0 of 2: the all-reduce got no answer from the other ranks within 3 s"),
        "{err}"
    );
    newest_checkpoint_loads(&d.join("run"));
}
