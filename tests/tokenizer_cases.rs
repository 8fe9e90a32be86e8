//! The bundled GPT-NeoX-20B tokenizer reproduces the Hugging Face `tokenizers` ids for every
//! reference case and decodes them back to the same text.

#[test]
fn neox_cases_round_trip() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tokenizers/gpt-neox-20b.cases.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tok = mamba_lm::tokenizer::neox();
    let cases = v["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let got = mamba_lm::tokenizer::encode(&tok, text).unwrap();
        assert_eq!(got, want, "encode {text:?}");
        assert_eq!(mamba_lm::tokenizer::decode(&tok, &got).unwrap(), text, "decode {text:?}");
    }
}
