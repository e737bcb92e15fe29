use super::*;

const TINY_V3: &str = include_str!("../../../../tests/fixtures/tiny-v3/config.json");
const TINY_V3_FP8: &str = include_str!("../../../../tests/fixtures/tiny-v3-fp8/config.json");
const TINY_V2: &str = include_str!("../../../../tests/fixtures/tiny-v2/config.json");
const R1: &str = include_str!("../../../../models/deepseek-r1-0528/config.json");

fn parse(s: &str) -> Result<DeepSeekConfig> {
    DeepSeekConfig::from_json_str(s, "config.json")
}

/// Parse `base` with one field replaced (`None` removes it) and return the error text.
fn err_with(base: &str, field: &str, value: Option<Value>) -> String {
    let mut v: Value = serde_json::from_str(base).unwrap();
    match value {
        Some(x) => v[field] = x,
        None => {
            v.as_object_mut().unwrap().remove(field);
        }
    }
    match parse(&v.to_string()) {
        Ok(_) => panic!("config with {field} = {:?} parsed", v.get(field)),
        Err(e) => e.to_string(),
    }
}

#[test]
fn parses_the_three_fixture_configs() {
    let v3 = parse(TINY_V3).unwrap();
    assert_eq!(v3.model_type, ModelType::DeepseekV3);
    assert_eq!(v3.q_lora_rank, Some(48));
    assert_eq!(v3.topk_method, TopkMethod::NoauxTc);
    assert_eq!(v3.scoring_func, ScoringFunc::Sigmoid);
    assert_eq!(v3.num_nextn_predict_layers, 1);
    assert!(!v3.is_moe_layer(0) && v3.is_moe_layer(1) && v3.is_moe_layer(2));
    assert_eq!(v3.rope_scaling.as_ref().unwrap().original_max_position_embeddings, 32);
    assert!(v3.quantization_config.is_none());

    let fp8 = parse(TINY_V3_FP8).unwrap();
    assert_eq!(fp8.quantization_config.unwrap().weight_block_size, Some([32, 16]));

    let v2 = parse(TINY_V2).unwrap();
    assert_eq!(v2.model_type, ModelType::DeepseekV2);
    assert_eq!(v2.q_lora_rank, None);
    assert_eq!(v2.topk_method, TopkMethod::GroupLimitedGreedy);
    assert_eq!(v2.scoring_func, ScoringFunc::Softmax);
    assert!(!v2.norm_topk_prob);
    assert_eq!(v2.n_shared_experts, 2);
    assert_eq!(v2.num_nextn_predict_layers, 0);
}

#[test]
fn r1_dimensions_and_kv_bytes() {
    let r1 = parse(R1).unwrap();
    assert!((r1.softmax_scale() - 0.1352337789).abs() < 1e-9);
    let layout = r1.kv_layout();
    assert_eq!(layout.row_dim(), 576);
    // 576 bf16 values × 61 layers
    assert_eq!(layout.bytes_per_token(2), 70_272);
    // 128 heads × (192 + 128) × 61 layers × 2 bytes
    assert_eq!(r1.decompressed_kv_bytes_per_token(2), 4_997_120);
    assert_eq!(r1.quantization_config.unwrap().weight_block_size, Some([128, 128]));
}

#[test]
fn round_trips_through_to_json() {
    for text in [TINY_V3, TINY_V3_FP8, TINY_V2, R1] {
        let c = parse(text).unwrap();
        assert_eq!(parse(&c.to_json().to_string()).unwrap(), c);
    }
}

#[test]
fn unknown_model_type_is_named() {
    let e = err_with(TINY_V3, "model_type", Some(json!("llama")));
    assert!(e.contains("model_type") && e.contains("llama"), "{e}");
}

#[test]
fn missing_required_fields_are_named() {
    for field in ["kv_lora_rank", "hidden_size", "qk_rope_head_dim", "vocab_size", "num_hidden_layers", "model_type"] {
        let e = err_with(TINY_V3, field, None);
        assert!(e.contains(field) && e.contains("missing"), "{field}: {e}");
    }
}

#[test]
fn invalid_fields_are_named() {
    let cases = [
        ("kv_lora_rank", json!("big")),
        ("q_lora_rank", json!(0)),
        ("topk_method", json!("random")),
        ("scoring_func", json!("relu")),
        ("n_group", json!(3)),
        ("topk_group", json!(9)),
        ("num_experts_per_tok", json!(99)),
        ("qk_rope_head_dim", json!(7)),
        ("hidden_act", json!("gelu")),
        ("norm_topk_prob", json!("yes")),
        ("rope_scaling", json!({"type": "linear", "factor": 2.0})),
        ("quantization_config", json!({"quant_method": "awq"})),
    ];
    for (field, value) in cases {
        let e = err_with(TINY_V3, field, Some(value.clone()));
        assert!(e.contains(field), "{field} = {value}: {e}");
    }
}

#[test]
fn not_json_is_an_error() {
    assert!(parse("{ not json").unwrap_err().to_string().contains("config.json"));
}
