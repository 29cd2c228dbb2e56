//! `minserve eval perplexity` as a user runs it: the real binary, a text file, its JSON line.

use std::process::Command;

use serde_json::Value;

// Plain English prose, written for this test, long enough to span several windows.
const TEXT: &str = "The library opens at nine in the morning and closes at six in the evening. \
Most people come in the afternoon, after school or after work, and the reading room is often \
full by four o'clock. The librarian keeps a list of the books that are asked for most, and \
every month she orders new copies of the ones that are always out. Children like the picture \
books near the window, where the light is good, and their parents sit on the long bench beside \
them. On Saturdays there is a story hour, and a volunteer reads aloud to anyone who wants to \
listen. In the winter the heating is turned up, and the room smells of old paper and coffee. \
Students bring their laptops and work at the big tables until the lights flash to say that the \
library will close in ten minutes. Then they pack their bags, return the books to the trolley, \
and walk out into the dark street, where the buses stop every quarter of an hour.";

fn eval(args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, TEXT.repeat(2)).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_minserve"))
        .args(["eval", "perplexity", "--json", "--text"])
        .arg(&text)
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The stderr of a `minserve` run that must fail.
fn refusal(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_minserve"))
        .args(args)
        .output()
        .unwrap();
    assert!(!output.status.success(), "{args:?} must fail");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn the_default_model_reads_english_and_a_requantized_copy_with_a_q8_cache_agrees_with_it() {
    let report = eval(&[
        "--context",
        "128",
        "--stride",
        "64",
        "--weights-format",
        "q8_0",
        "--kv-cache-dtype",
        "q8",
        "--reference",
        "smollm2-135m-instruct",
    ]);
    let scored = report["scored_tokens"].as_u64().unwrap();
    assert!(report["windows"].as_u64().unwrap() > 3, "{report}");
    assert_eq!(
        scored + 1,
        report["text_tokens"].as_u64().unwrap(),
        "{report}"
    );
    let ours = report["result"]["perplexity"].as_f64().unwrap();
    let reference = report["reference"]["perplexity"].as_f64().unwrap();
    assert_eq!(report["result"]["weights_format"], "Q8_0", "{report}");
    assert!(report["reference"]["weights_format"].is_null(), "{report}");
    assert_eq!(report["result"]["kv_cache_dtype"], "q8", "{report}");
    assert_eq!(report["reference"]["kv_cache_dtype"], "f16", "{report}");
    // A 135M model on simple prose: far better than chance (a vocabulary of 49,152; measured
    // 23.3), and a re-quantized copy of the same weights must read it almost the same way
    // (measured: perplexity within 0.2%, 94% of top-1 guesses equal).
    assert!((1.5..40.0).contains(&reference), "{report}");
    assert!((ours / reference - 1.0).abs() < 0.05, "{report}");
    let agreement = report["top1_agreement"].as_f64().unwrap();
    assert!((0.9..=1.0).contains(&agreement), "{report}");
}

#[test]
fn a_model_agrees_with_itself_on_every_token() {
    let report = eval(&[
        "--model",
        "synthetic:tiny",
        "--context",
        "64",
        "--stride",
        "32",
        "--reference",
        "synthetic:tiny",
    ]);
    assert_eq!(report["top1_agreement"], 1.0, "{report}");
    assert_eq!(
        report["result"]["perplexity"], report["reference"]["perplexity"],
        "{report}"
    );
}

/// A table of many formats reads the reference once (`--write-top1`) and compares every other
/// format with that file: the agreement is the one `--reference` finds by running it.
#[test]
fn a_written_top1_file_gives_the_agreement_a_reference_run_gives() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("top1.json");
    let file = file.to_str().unwrap();
    let window = ["--context", "128", "--stride", "64"];
    let quantized = [&window[..], &["--weights-format", "q8_0"]].concat();
    let by_run = eval(&[&quantized[..], &["--reference", "smollm2-135m-instruct"]].concat());
    let written = eval(&[&window[..], &["--write-top1", file]].concat());
    assert!(written["top1_agreement"].is_null(), "{written}");
    assert_eq!(
        written["result"]["perplexity"], by_run["reference"]["perplexity"],
        "the file's model is --reference's"
    );
    let by_file = eval(&[&quantized[..], &["--reference-top1", file]].concat());
    assert_eq!(by_file["top1_agreement"], by_run["top1_agreement"]);
    assert!(by_file["top1_agreement"].as_f64().unwrap() < 1.0);

    // Other places (another stride) are refused, not compared.
    let stderr = refusal(&[
        "eval",
        "perplexity",
        "--text",
        "Cargo.toml",
        "--context",
        "128",
        "--stride",
        "32",
        "--reference-top1",
        file,
    ]);
    assert!(
        stderr.contains("--reference-top1") && stderr.contains("--stride 64"),
        "{stderr}"
    );
}

/// `--lm-head-format q8_0` on a quantized folder (whose tied lm_head is stored in f16) reads
/// the text almost as the float lm_head does; on a GGUF, whose lm_head is already quantized,
/// it is refused.
#[test]
fn a_float_lm_head_stored_as_q8_0_reads_the_text_as_the_float_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("rtn8");
    let output = Command::new(env!("CARGO_BIN_EXE_minserve"))
        .args([
            "quantize",
            "--model",
            "smollm2-135m-instruct",
            "--method",
            "rtn",
        ])
        .args(["--bits", "8", "--out"])
        .arg(&folder)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let folder = folder.to_str().unwrap();
    let top1 = dir.path().join("top1.json");
    let top1 = top1.to_str().unwrap();
    let window = ["--context", "128", "--stride", "64", "--model", folder];
    let float = eval(&[&window[..], &["--write-top1", top1]].concat());
    let q8 = eval(
        &[
            &window[..],
            &["--lm-head-format", "q8_0", "--reference-top1", top1],
        ]
        .concat(),
    );
    let (float_ppl, q8_ppl) = (
        float["result"]["perplexity"].as_f64().unwrap(),
        q8["result"]["perplexity"].as_f64().unwrap(),
    );
    assert_ne!(float_ppl, q8_ppl, "the lm_head must have changed");
    // Q8_0 keeps 8 bits per weight in blocks of 32: the measured moves are about 0.1% in
    // perplexity and a few top-1 places of 400.
    assert!((q8_ppl / float_ppl - 1.0).abs() < 0.02, "{float} vs {q8}");
    let agreement = q8["top1_agreement"].as_f64().unwrap();
    assert!((0.95..1.0).contains(&agreement), "{q8}");

    let stderr = refusal(&[
        "eval",
        "perplexity",
        "--text",
        "Cargo.toml",
        "--lm-head-format",
        "q8_0",
    ]);
    assert!(
        stderr.contains("--lm-head-format") && stderr.contains("already quantized"),
        "{stderr}"
    );
}

#[test]
fn a_stride_longer_than_the_context_is_refused() {
    let stderr = refusal(&[
        "eval",
        "perplexity",
        "--model",
        "synthetic:tiny",
        "--text",
        "Cargo.toml",
        "--context",
        "64",
        "--stride",
        "100",
    ]);
    assert!(stderr.contains("--stride 100"), "{stderr}");
}
