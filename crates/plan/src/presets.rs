//! Built-in model configs (`models/*/config.json`) by preset name and Hugging Face repo id.

use moeserve_core::DeepSeekConfig;

use crate::Result;

#[derive(Debug)]
pub struct ModelPreset {
    pub name: &'static str,
    pub title: &'static str,
    /// Hub repos with this exact architecture config.
    pub repos: &'static [&'static str],
    pub config_json: &'static str,
}

pub const MODELS: &[ModelPreset] = &[
    ModelPreset {
        name: "deepseek-r1-0528",
        title: "DeepSeek-R1-0528",
        repos: &["deepseek-ai/DeepSeek-R1-0528", "deepseek-ai/DeepSeek-R1"],
        config_json: include_str!("../../../models/deepseek-r1-0528/config.json"),
    },
    ModelPreset {
        name: "deepseek-v3",
        title: "DeepSeek-V3",
        repos: &["deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-V3-0324"],
        config_json: include_str!("../../../models/deepseek-v3/config.json"),
    },
    ModelPreset {
        name: "deepseek-v2-lite",
        title: "DeepSeek-V2-Lite",
        repos: &["deepseek-ai/DeepSeek-V2-Lite", "deepseek-ai/DeepSeek-V2-Lite-Chat"],
        config_json: include_str!("../../../models/deepseek-v2-lite/config.json"),
    },
];

impl ModelPreset {
    pub fn config(&self) -> Result<DeepSeekConfig> {
        Ok(DeepSeekConfig::from_json_str(self.config_json, &format!("preset {}", self.name))?)
    }
}

/// A preset by name (`deepseek-r1-0528`, also `deepseek-r1`), title or repo id (`@REVISION` ignored),
/// case-insensitively.
pub fn find(name: &str) -> Option<&'static ModelPreset> {
    let n = name.split('@').next().unwrap_or(name).trim().to_ascii_lowercase();
    MODELS.iter().find(|p| {
        p.name == n
            || p.title.to_ascii_lowercase() == n
            || p.repos
                .iter()
                .any(|r| r.to_ascii_lowercase() == n || r.rsplit('/').next().is_some_and(|t| t.to_ascii_lowercase() == n))
    })
}

pub fn names() -> Vec<&'static str> {
    MODELS.iter().map(|p| p.name).collect()
}

#[cfg(test)]
mod tests {
    use super::find;

    #[test]
    fn presets_parse_and_resolve() {
        for p in super::MODELS {
            p.config().unwrap();
        }
        assert_eq!(find("deepseek-ai/DeepSeek-R1-0528@main").unwrap().name, "deepseek-r1-0528");
        assert_eq!(find("DeepSeek-V3").unwrap().name, "deepseek-v3");
        assert_eq!(find("deepseek-r1").unwrap().name, "deepseek-r1-0528");
        assert_eq!(find("deepseek-ai/DeepSeek-V2-Lite-Chat").unwrap().name, "deepseek-v2-lite");
        assert!(find("deepseek-ai/DeepSeek-V2").is_none());
    }
}
