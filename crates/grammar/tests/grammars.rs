//! Grammars against the default model's real vocabulary: random walks that draw any token
//! the mask allows (uniformly, so unlikely pieces are tried as often as likely ones) always
//! end in an output the grammar describes, and what cannot be followed is refused at compile
//! time.

use candle_core::quantized::gguf_file;
use minserve_core::constraint::{ConstraintFactory, TokenMask};
use minserve_core::sampling::Rng;
use minserve_grammar::{Grammar, GrammarCompiler};
use minserve_tokenizer::Tokenizer;
use serde_json::{json, Value};

fn smollm2() -> Tokenizer {
    let path = minserve_hub::resolve(
        minserve_hub::default_model(),
        &minserve_hub::FetchOptions::default(),
    )
    .unwrap_or_else(|e| panic!("the default model is needed by this test: {e}"));
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    Tokenizer::from_gguf(&content).unwrap()
}

struct Setup {
    tokenizer: Tokenizer,
    compiler: GrammarCompiler,
    vocab_size: usize,
}

fn setup() -> Setup {
    let tokenizer = smollm2();
    let vocab_size = tokenizer.vocab_size();
    let compiler = GrammarCompiler::new(&tokenizer, vocab_size).unwrap();
    Setup {
        tokenizer,
        compiler,
        vocab_size,
    }
}

/// Walks `grammar` drawing allowed tokens uniformly (EOS only once nothing else is left, so
/// that walks go deep), at most `max_tokens`; the text and whether the grammar completed.
fn random_walk(
    setup: &Setup,
    grammar: &dyn ConstraintFactory,
    seed: u64,
    max_tokens: usize,
) -> (String, bool) {
    let mut walk = grammar.start();
    let mut rng = Rng::new(seed);
    let mut tokens = Vec::new();
    let eos = setup.tokenizer.eos_token_ids();
    for _ in 0..max_tokens {
        let mut mask = TokenMask::new(setup.vocab_size);
        walk.fill_mask(&mut mask).unwrap();
        let allowed: Vec<u32> = (0..setup.vocab_size as u32)
            .filter(|&t| mask.is_allowed(t))
            .collect();
        assert!(!allowed.is_empty(), "nothing allowed after {tokens:?}");
        let text: Vec<u32> = allowed
            .iter()
            .copied()
            .filter(|t| !eos.contains(t))
            .collect();
        let pick = match text.is_empty() {
            true => allowed[0],
            false => text[(rng.next_u64() % text.len() as u64) as usize],
        };
        walk.commit(pick).unwrap();
        if eos.contains(&pick) {
            break;
        }
        tokens.push(pick);
        if walk.is_complete() {
            break;
        }
    }
    let text = setup.tokenizer.decode(&tokens, true).unwrap();
    (text, walk.is_complete())
}

#[test]
fn random_walks_stay_inside_their_grammar() {
    let s = setup();

    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
        },
        "required": ["name", "age", "pets"],
        "additionalProperties": false,
    });
    let grammar = s.compiler.compile(&Grammar::JsonSchema(schema)).unwrap();
    for seed in 0..10 {
        let (text, complete) = random_walk(&s, grammar.as_ref(), seed, 200);
        assert!(complete, "{text:?}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!(v["name"].as_str().unwrap().chars().count() <= 8, "{text}");
        assert!((0..=150).contains(&v["age"].as_i64().unwrap()), "{text}");
        assert!(v["pets"].as_array().unwrap().len() <= 3, "{text}");
        assert_eq!(v.as_object().unwrap().len(), 3, "{text}");
    }

    let grammar = s
        .compiler
        .compile(&Grammar::Regex(r"[0-9]{3}-[a-z]{2,4}".into()))
        .unwrap();
    for seed in 0..10 {
        let (text, complete) = random_walk(&s, grammar.as_ref(), seed, 50);
        assert!(complete, "{text:?}");
        let (digits, letters) = text.split_once('-').unwrap();
        assert!(
            digits.len() == 3 && digits.bytes().all(|b| b.is_ascii_digit()),
            "{text}"
        );
        assert!((2..=4).contains(&letters.len()), "{text}");
        assert!(letters.bytes().all(|b| b.is_ascii_lowercase()), "{text}");
    }

    let choices = vec!["yes".to_string(), "no".into(), "maybe \"so\"\n".into()];
    let grammar = s
        .compiler
        .compile(&Grammar::Choice(choices.clone()))
        .unwrap();
    for seed in 0..10 {
        let (text, complete) = random_walk(&s, grammar.as_ref(), seed, 20);
        assert!(complete && choices.contains(&text), "{text:?}");
    }

    let lark = r#"start: "The answer is " num "."
num: /[1-9][0-9]?/"#;
    let grammar = s.compiler.compile(&Grammar::Lark(lark.into())).unwrap();
    for seed in 0..10 {
        let (text, complete) = random_walk(&s, grammar.as_ref(), seed, 20);
        let num = text
            .strip_prefix("The answer is ")
            .and_then(|t| t.strip_suffix('.'));
        assert!(
            complete && num.is_some_and(|n| n.parse::<u32>().is_ok()),
            "{text:?}"
        );
    }
}

#[test]
fn what_cannot_be_followed_is_refused_at_compile_time() {
    let s = setup();
    let refused = [
        Grammar::JsonSchema(json!({"type": "frobnicate"})),
        Grammar::JsonSchema(json!(["not", "an", "object"])),
        Grammar::JsonSchema(json!({"type": "integer", "minimum": 5, "maximum": 1})),
        Grammar::Regex("(unclosed".into()),
        Grammar::Choice(vec![]),
        Grammar::Lark("start: undefined_rule".into()),
        // Over the size limit: a schema with thousands of distinct properties.
        Grammar::JsonSchema(json!({
            "type": "object",
            "properties": (0..20_000)
                .map(|i| (format!("p{i}"), json!({"type": "string", "pattern": format!("x{i}[a-z]+")})))
                .collect::<serde_json::Map<_, _>>(),
        })),
    ];
    for grammar in refused {
        let error = s.compiler.compile(&grammar).err();
        assert!(error.is_some(), "compiled: {grammar:?}");
        assert!(!error.unwrap().0.is_empty());
    }
}
