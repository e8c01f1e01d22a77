//! `tables/models.toml`: the recommender's models and fit thresholds.

use super::super::model::ModelsFile;
use super::Model;
use super::checker::{FileChecker, Seen};

/// What `models.toml` contributes to [`super::Tables`].
pub(super) struct Models {
    pub tight_below_gb: u32,
    pub comfortable_below_gb: u32,
    pub tight_advice: String,
    pub models: Vec<Model>,
}

/// `[fit]` thresholds in order; `[[model]]` keys and ids unique ignoring
/// case, sizes in range, tiers known.
pub(super) fn check(f: &mut FileChecker, t: &ModelsFile, tiers: &[String]) -> Models {
    let fit = t.fit.get_ref();
    let tight_below_gb = f.int(&fit.tight_below_gb, "tight_below_gb", 0, 1 << 20);
    let comfortable_below_gb = f.int(
        &fit.comfortable_below_gb,
        "comfortable_below_gb",
        0,
        1 << 20,
    );
    if tight_below_gb > comfortable_below_gb {
        f.err(
            fit.tight_below_gb.span(),
            format!("tight_below_gb {tight_below_gb} is above comfortable_below_gb {comfortable_below_gb}"),
        );
    }
    let mut models = Vec::new();
    let mut seen_keys = Seen::new("model key");
    let mut seen_ids = Seen::new("model id");
    for m in &t.model {
        let r = m.get_ref();
        f.unique(
            &mut seen_keys,
            r.key.get_ref().to_ascii_lowercase(),
            r.key.span(),
        );
        f.unique(
            &mut seen_ids,
            r.id.get_ref().to_ascii_lowercase(),
            r.id.span(),
        );
        models.push(Model {
            key: r.key.get_ref().clone(),
            id: r.id.get_ref().clone(),
            inference_gb: f.int(&r.inference_gb, "inference_gb", 0, 1 << 24),
            training_gb: f.int(&r.training_gb, "training_gb", 0, 1 << 24),
            params: r.params.get_ref().clone(),
            tier: f.lookup(tiers, &r.tier, "tier"),
            recommended: *r.recommended.get_ref(),
            warning: r.warning.as_ref().map(|w| w.get_ref().clone()),
        });
    }
    Models {
        tight_below_gb,
        comfortable_below_gb,
        tight_advice: fit.tight_advice.get_ref().clone(),
        models,
    }
}
