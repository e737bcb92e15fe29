//! `moeserve logits`: float32 logits `[T, vocab]` (tensor `logits`) and, for models with an MTP
//! layer, `mtp_logits` `[T-1, vocab]` (row i: hidden h_i + token t_{i+1}, predicting t_{i+2}).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use moeserve_model::{ForwardBatch, Mtp};

use crate::source::{self, ModelArgs};

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated token ids (e.g. 0,12,7).
    #[arg(long)]
    pub input_ids: String,
    /// Output .safetensors file.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let ids = source::parse_ids(&args.input_ids)?;
    if ids.is_empty() {
        bail!("--input-ids is empty");
    }
    let loaded = source::load(&args.model, true)?;
    let model = &loaded.model;
    let mut cache = model.lead().new_cache();
    let hidden = model.forward(&ForwardBatch::single(&ids, 0), &mut [&mut cache])?;
    let mut out = HashMap::new();
    out.insert("logits".to_string(), model.logits(&hidden)?);
    if let (Some(mtp), true) = (model.lead().mtp(), ids.len() > 1) {
        let t = ids.len();
        let mut mtp_cache = Mtp::new_cache(model.lead());
        let y = model.mtp_forward(&ForwardBatch::single(&ids[1..], 0), &hidden.narrow(0, 0, t - 1)?, &mut [&mut mtp_cache])?;
        out.insert("mtp_logits".to_string(), model.mtp_head_logits(&mtp.norm(&y)?)?);
    }
    candle_core::safetensors::save(&out, &args.out).with_context(|| format!("writing {}", args.out.display()))?;
    let mut names: Vec<_> = out.iter().map(|(k, v)| format!("{k} {:?}", v.dims())).collect();
    names.sort();
    eprintln!("wrote {}: {}", args.out.display(), names.join(", "));
    Ok(())
}
