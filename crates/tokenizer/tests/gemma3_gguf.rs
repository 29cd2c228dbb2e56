//! The GGUF-built Gemma 3 tokenizer (262,144 SentencePiece pieces, no space prefix, whitespace
//! runs and HTML tags as user-defined pieces) against llama.cpp's, on the SmolLM2 fixture texts
//! plus Gemma's turn markers (fixtures from scripts/gen_gemma3_fixtures.py).

mod common;

use common::{id_mismatches, token_fixtures_of};
use minserve_tokenizer::Tokenizer;

fn gemma3_tokenizer() -> Tokenizer {
    let path = minserve_hub::resolve("gemma3-270m", &minserve_hub::FetchOptions::default())
        .unwrap_or_else(|e| panic!("gemma3-270m is needed by this test: {e}"));
    let mut file = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    Tokenizer::from_gguf(&content).expect("Gemma 3 GGUF tokenizer builds")
}

#[test]
fn ids_match_llama_cpp_and_decode_back() {
    let tok = gemma3_tokenizer();
    let fixtures = token_fixtures_of("gemma3_tokens.json");
    let mut mismatches = id_mismatches(&tok, &fixtures);
    for f in &fixtures {
        let decoded = tok.decode(&f.ids, false).unwrap();
        if decoded != f.text {
            mismatches.push(format!("decode of {:?} gave {decoded:?}", f.text));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} texts differ:\n{}",
        mismatches.len(),
        fixtures.len(),
        mismatches.join("\n")
    );
    let eos = tok.eos_token_ids();
    let end_of_turn = tok.token_to_id("<end_of_turn>").unwrap();
    assert!(
        eos.contains(&end_of_turn),
        "<end_of_turn> ends generation: {eos:?}"
    );
}
