//! `train` on data files a stranger made: one enormous line, and a flood of
//! bad lines. The run's memory stays bounded by the line cap (`[trainer]
//! max_line_bytes`), not by the file; the long line is a bad line named by
//! `file:line` and the cap (fatal with `--strict`); a hundred thousand bad
//! lines give a short report with their count, not a hundred thousand
//! warnings.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use qlora_scale::tables::trainer::MAX_LINE_BYTES;

mod train_common;

/// What a run of `train` gave: exit code, stderr, peak resident memory of
/// the process (MiB, from `/proc/PID/status` `VmHWM`) and wall time.
struct Run {
    code: Option<i32>,
    stderr: String,
    peak_mib: u64,
    took: Duration,
}

/// The `VmHWM` (peak resident set) of process `pid`, KiB, while it lives.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `train` in `dir` with `args`, polling its peak memory until it
/// exits (killed after `limit`).
fn run(dir: &Path, args: &[&str], limit: Duration) -> Run {
    let mut cmd: Command = train_common::train_without_profile(dir);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().expect("train starts");
    let pid = child.id();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = thread::spawn(move || {
        let mut v = Vec::new();
        out.read_to_end(&mut v).ok();
        v
    });
    let err_reader = thread::spawn(move || {
        let mut v = Vec::new();
        err.read_to_end(&mut v).ok();
        v
    });
    let mut peak_kib = 0;
    let status = loop {
        if let Some(k) = vm_hwm_kib(pid) {
            peak_kib = peak_kib.max(k);
        }
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > limit {
            child.kill().ok();
            panic!("train ran past {limit:?}");
        }
        thread::sleep(Duration::from_millis(5));
    };
    let took = started.elapsed();
    out_reader.join().unwrap();
    let stderr = err_reader.join().unwrap();
    Run {
        code: status.code(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        peak_mib: peak_kib >> 10,
        took,
    }
}

/// `data/train.jsonl` in `dir`: two good lines, then `text` bytes of one
/// record on line 3, then two more good lines.
fn write_long_line(dir: &Path, text: usize) -> std::path::PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut f = std::io::BufWriter::new(std::fs::File::create(data.join("train.jsonl")).unwrap());
    let good = "{\"text\": \"The river runs past the mill and the wheel turns.\"}\n";
    f.write_all(good.as_bytes()).unwrap();
    f.write_all(good.as_bytes()).unwrap();
    f.write_all(b"{\"text\": \"").unwrap();
    let chunk = vec![b'a'; 1 << 20];
    let mut left = text;
    while left > 0 {
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    f.write_all(b"\"}\n").unwrap();
    f.write_all(good.as_bytes()).unwrap();
    f.write_all(good.as_bytes()).unwrap();
    f.flush().unwrap();
    data
}

/// Peak memory the long-line runs may reach: the embedded model's run
/// (well under 100 MiB) plus a few copies of one line at the cap. Before
/// streaming and the cap, a 64 MiB line took over 700 MiB.
const PEAK_MIB: u64 = 256;

#[test]
fn a_64_mib_line_is_skipped_with_bounded_memory() {
    const {
        assert!(
            MAX_LINE_BYTES < 64 << 20,
            "the test needs a line over the cap"
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let data = write_long_line(dir.path(), 64 << 20);
    let d = data.to_str().unwrap();
    let cap = format!("longer than {MAX_LINE_BYTES} bytes");
    let args = [
        "--data-dir",
        d,
        "--max-steps",
        "1",
        "--seq-len",
        "32",
        "--output-dir",
        "out",
    ];
    let r = run(dir.path(), &args, Duration::from_secs(120));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains("train.jsonl:3: "), "{}", r.stderr);
    assert!(r.stderr.contains(&cap), "{}", r.stderr);
    assert!(
        r.stderr.contains("1 bad data line(s) skipped"),
        "{}",
        r.stderr
    );
    eprintln!("64 MiB line: peak {} MiB in {:?}", r.peak_mib, r.took);
    assert!(r.peak_mib < PEAK_MIB, "peak RSS {} MiB", r.peak_mib);
    assert!(r.took < Duration::from_secs(60), "took {:?}", r.took);

    let mut strict = args.to_vec();
    strict[7] = "strict-out";
    strict.push("--strict");
    let r = run(dir.path(), &strict, Duration::from_secs(120));
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("train.jsonl:3: "), "{}", r.stderr);
    assert!(r.stderr.contains(&cap), "{}", r.stderr);
    assert!(r.stderr.contains("--strict"), "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    eprintln!(
        "64 MiB line, --strict: peak {} MiB in {:?}",
        r.peak_mib, r.took
    );
    assert!(r.peak_mib < PEAK_MIB, "peak RSS {} MiB", r.peak_mib);
    assert!(r.took < Duration::from_secs(60), "took {:?}", r.took);
}

#[test]
fn a_hundred_thousand_bad_lines_give_a_short_report() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut f = std::io::BufWriter::new(std::fs::File::create(data.join("train.jsonl")).unwrap());
    f.write_all(b"{\"text\": \"The river runs past the mill and the wheel turns.\"}\n")
        .unwrap();
    for _ in 0..100_000 {
        f.write_all(b"{\"txt\": \"wrong key\"}\n").unwrap();
    }
    f.flush().unwrap();
    drop(f);
    let d = data.to_str().unwrap();
    let r = run(
        dir.path(),
        &[
            "--data-dir",
            d,
            "--max-steps",
            "1",
            "--seq-len",
            "32",
            "--output-dir",
            "out",
        ],
        Duration::from_secs(120),
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stderr.contains("100000 bad data line(s) skipped"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("train.jsonl:2: "), "{}", r.stderr);
    assert!(
        r.stderr.len() < 64 << 10,
        "{} bytes of stderr",
        r.stderr.len()
    );
}
