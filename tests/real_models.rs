//! Detection on real public model ids against their true totals
//! (`tests/data/real_models.tsv`): categories right for at least 98% of them
//! and counts within 10% for at least 90%.

use qlora_scale::{SizeCategory, detect_model_size};

struct Case {
    id: &'static str,
    params: u64,
}

fn cases() -> Vec<Case> {
    include_str!("data/real_models.tsv")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (id, b) = l.split_once('\t').expect("id<TAB>params_b");
            let b: f64 = b.trim().parse().expect("params_b is a number");
            Case {
                id,
                params: (b * 1e9).round() as u64,
            }
        })
        .collect()
}

#[test]
fn real_ids_categories_and_counts() {
    let cases = cases();
    assert!(cases.len() >= 150, "at least 150 real ids");
    let (mut category_ok, mut count_ok) = (0usize, 0usize);
    let mut misses = Vec::new();
    for c in &cases {
        let got = detect_model_size(c.id);
        let want = SizeCategory::for_params(c.params);
        let close = (got.params as f64 - c.params as f64).abs() <= 0.10 * c.params as f64;
        category_ok += usize::from(got.category == want);
        count_ok += usize::from(close);
        if got.category != want || !close {
            misses.push(format!(
                "{}: got {:.3}B {} ({}), want {:.3}B {}",
                c.id,
                got.params as f64 / 1e9,
                got.category,
                got.source.describe(),
                c.params as f64 / 1e9,
                want
            ));
        }
    }
    let n = cases.len() as f64;
    let cat_rate = category_ok as f64 / n;
    let count_rate = count_ok as f64 / n;
    eprintln!(
        "{} ids: categories {:.1}%, counts within 10% {:.1}%\n{}",
        cases.len(),
        cat_rate * 100.0,
        count_rate * 100.0,
        misses.join("\n")
    );
    assert!(cat_rate >= 0.98, "category accuracy {cat_rate:.3}");
    assert!(count_rate >= 0.90, "count accuracy {count_rate:.3}");
}
