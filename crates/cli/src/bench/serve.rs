//! `minserve bench serve`: a streaming load generator for any OpenAI-compatible server (ours,
//! llama.cpp's llama-server, vLLM), after vLLM's benchmark_serving, so that figures compare
//! across servers and with published ones.
//!
//! Every request streams. Time to first token (TTFT) is taken at the first chunk that carries
//! text (a chat stream's opening role-only chunk does not count); inter-token latencies (ITL)
//! are the gaps between text chunks; time per output token (TPOT) is a request's time after
//! its first token divided by its remaining tokens. Output tokens are the server's streamed
//! `usage` (requested with `stream_options.include_usage`), else the number of text chunks.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use futures_util::StreamExt;
use minserve_core::sampling::Rng;
use minserve_tokenizer::Tokenizer;
use serde::Serialize;
use serde_json::{json, Value};

use super::stats::{tpot_ms, Slo, Summary};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// `/v1/completions`: the prompt as sent is what the model sees.
    Completions,
    /// `/v1/chat/completions`: the prompt as one user message, inside the chat template.
    Chat,
}

impl Endpoint {
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Completions => "completions",
            Endpoint::Chat => "chat",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }
}

/// What the requests look like and where they go: shared by `bench serve` and every level of
/// `bench sweep`.
#[derive(Args, Clone, Debug)]
pub struct WorkloadArgs {
    /// The server's address, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted); plain
    /// HTTP.
    #[arg(long)]
    pub base_url: String,
    /// The model name sent with each request (default: the first one the server's /v1/models
    /// lists).
    #[arg(long)]
    pub model: Option<String>,
    /// The tokenizer that builds prompts of exactly --input-len tokens, and counts prompt tokens
    /// when a server reports no usage: a model path, a catalog alias or synthetic:NAME. Give the
    /// served model's own for exact lengths.
    #[arg(long, default_value_t = minserve_hub::default_model().to_string())]
    pub tokenizer: String,
    /// Prompt tokens per request (random prompts).
    #[arg(long, default_value_t = 128, value_parser = positive)]
    pub input_len: usize,
    /// Most tokens generated per request (`max_tokens`).
    #[arg(long, default_value_t = 128, value_parser = positive)]
    pub output_len: usize,
    /// Prompts from a JSON-lines file, one `{"prompt": "...", "output_len": N, "priority": P}`
    /// per line (`output_len` and `priority` optional; `priority` is sent as vLLM's request
    /// field, for servers scheduling by priority), taken in order and cycled, instead of
    /// random ones.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Endpoint::Completions)]
    pub endpoint: Endpoint,
    /// Send `ignore_eos: true` (an extension minserve, vLLM and llama.cpp accept), so that each
    /// request generates all its tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// A service-level objective `TTFT_MS,TPOT_MS`: adds goodput, the rate of requests that met
    /// both.
    #[arg(long)]
    pub slo: Option<Slo>,
    /// A new connection for every request instead of reused keep-alive ones (some servers drop
    /// those after a stream).
    #[arg(long)]
    pub fresh_connection: bool,
    /// Seed of the prompts and of the arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seconds a request may take in all before it counts as failed.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
}

#[derive(Args)]
pub struct ServeBenchArgs {
    #[command(flatten)]
    pub workload: WorkloadArgs,
    #[arg(long, default_value_t = 64, value_parser = positive)]
    pub num_prompts: usize,
    /// Keep this many requests in flight.
    #[arg(long, value_parser = positive, conflicts_with = "request_rate", required_unless_present = "request_rate")]
    pub concurrency: Option<usize>,
    /// Send requests as a seeded Poisson process with this mean rate per second, however many
    /// are in flight.
    #[arg(long, value_parser = positive_rate)]
    pub request_rate: Option<f64>,
    /// Also write the report to this file as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("`{s}` is not a positive whole number")),
    }
}

fn positive_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "`{s}` is not a positive, finite rate (for all at once, use --concurrency N)"
        )),
    }
}

/// How requests are released.
#[derive(Clone, Copy, Debug)]
pub enum LoadPattern {
    Concurrency(usize),
    RequestRate(f64),
}

impl std::fmt::Display for LoadPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadPattern::Concurrency(c) => write!(f, "concurrency {c}"),
            LoadPattern::RequestRate(r) => write!(f, "{r} requests/s (Poisson)"),
        }
    }
}

/// One request's prompt.
#[derive(Clone, Debug)]
pub struct Prompt {
    pub text: String,
    /// By the local tokenizer, without special tokens; used when the server reports no usage.
    pub tokens: usize,
    pub output_len: usize,
    pub priority: Option<i64>,
}

/// One line of a --dataset file.
#[derive(Debug, Clone, PartialEq)]
struct DatasetEntry {
    prompt: String,
    output_len: Option<usize>,
    priority: Option<i64>,
}

/// A connection to a server with its workload, ready to run at any load.
pub struct ServingBenchmark {
    args: WorkloadArgs,
    client: reqwest::Client,
    root: String,
    model: String,
    tokenizer: Tokenizer,
    /// Ids that decode alone to whole characters: what random prompts are drawn from.
    candidates: Vec<u32>,
    dataset: Option<Vec<DatasetEntry>>,
}

/// What the report keeps of the error messages: the first few different ones.
const MAX_ERRORS: usize = 5;

impl ServingBenchmark {
    pub async fn new(args: WorkloadArgs) -> anyhow::Result<Self> {
        let tokenizer = crate::model_source::load_tokenizer(&args.tokenizer)?;
        let mut client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs_f64(args.request_timeout.max(0.001)));
        if args.fresh_connection {
            client = client.pool_max_idle_per_host(0);
        }
        let client = client.build().context("building the HTTP client")?;
        let root = args.base_url.trim_end_matches('/');
        let root = root.strip_suffix("/v1").unwrap_or(root).to_string();
        let model = match &args.model {
            Some(model) => model.clone(),
            None => first_model(&client, &root).await.with_context(|| {
                format!("asking {root}/v1/models for a model (or pass --model)")
            })?,
        };
        let dataset = args.dataset.as_deref().map(read_dataset).transpose()?;
        let candidates = match dataset {
            Some(_) => Vec::new(),
            None => prompt_candidates(&tokenizer)?,
        };
        Ok(Self {
            args,
            client,
            root,
            model,
            tokenizer,
            candidates,
            dataset,
        })
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn args(&self) -> &WorkloadArgs {
        &self.args
    }

    /// Prompts `first..first + n` of the seeded stream; a sweep takes a new range per level, so
    /// that no level finds the previous one's prompts in a prefix cache.
    pub fn prompts(&self, first: usize, n: usize) -> anyhow::Result<Vec<Prompt>> {
        (first..first + n)
            .map(|index| match &self.dataset {
                Some(entries) => {
                    let entry = &entries[index % entries.len()];
                    Ok(Prompt {
                        tokens: self.tokenizer.encode(&entry.prompt, false)?.len(),
                        text: entry.prompt.clone(),
                        output_len: entry.output_len.unwrap_or(self.args.output_len),
                        priority: entry.priority,
                    })
                }
                None => {
                    // The first draw of a generator seeded with seed + index hashes the pair,
                    // so neighbouring prompts share no stream.
                    let mut rng =
                        Rng::new(Rng::new(self.args.seed.wrapping_add(index as u64)).next_u64());
                    Ok(Prompt {
                        text: exact_prompt(
                            &self.tokenizer,
                            &self.candidates,
                            self.args.input_len,
                            &mut rng,
                        )?,
                        tokens: self.args.input_len,
                        output_len: self.args.output_len,
                        priority: None,
                    })
                }
            })
            .collect()
    }

    fn request_body(&self, prompt: &Prompt) -> Value {
        let mut body = json!({
            "model": self.model,
            "max_tokens": prompt.output_len,
            "temperature": 0.0,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        match self.args.endpoint {
            Endpoint::Completions => body["prompt"] = json!(prompt.text),
            Endpoint::Chat => body["messages"] = json!([{"role": "user", "content": prompt.text}]),
        }
        if self.args.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        if let Some(priority) = prompt.priority {
            body["priority"] = json!(priority);
        }
        body
    }

    /// Sends every prompt at `load` and measures. Failed requests are counted and reported,
    /// never an error of the benchmark itself.
    pub async fn run(&self, prompts: &[Prompt], load: LoadPattern) -> ServingReport {
        let url = format!("{}{}", self.root, self.args.endpoint.path());
        let bodies: Vec<Value> = prompts.iter().map(|p| self.request_body(p)).collect();
        let send = |i: usize| {
            let (url, body) = (&url, &bodies[i]);
            async move { (i, self.send(url, body).await) }
        };
        let start = Instant::now();
        let mut outcomes: Vec<(usize, RequestOutcome)> = match load {
            LoadPattern::Concurrency(c) => {
                let next = AtomicUsize::new(0);
                let worker = || async {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= bodies.len() {
                            return done;
                        }
                        done.push(send(i).await);
                    }
                };
                futures_util::future::join_all((0..c.min(bodies.len())).map(|_| worker()))
                    .await
                    .into_iter()
                    .flatten()
                    .collect()
            }
            LoadPattern::RequestRate(rate) => {
                // Exponential gaps make a Poisson process; the first request goes at once.
                let mut rng = Rng::new(self.args.seed ^ 0xA5A5_A5A5_A5A5_A5A5);
                let mut at = 0.0;
                let requests = (0..bodies.len()).map(|i| {
                    if i > 0 {
                        at += -(1.0 - rng.next_f64()).ln() / rate;
                    }
                    let due = start + Duration::from_secs_f64(at);
                    async move {
                        tokio::time::sleep_until(due.into()).await;
                        send(i).await
                    }
                });
                futures_util::future::join_all(requests).await
            }
        };
        let duration = start.elapsed().as_secs_f64();
        outcomes.sort_by_key(|(i, _)| *i);
        self.report(
            prompts,
            load,
            outcomes.into_iter().map(|(_, o)| o),
            duration,
        )
    }

    async fn send(&self, url: &str, body: &Value) -> RequestOutcome {
        let start = Instant::now();
        let mut reader = StreamReader::new(self.args.endpoint);
        let result = async {
            let response = self.client.post(url).json(body).send().await?;
            let status = response.status();
            if !status.is_success() {
                let text = response.text().await.unwrap_or_default();
                bail!("HTTP {}: {}", status.as_u16(), error_message(&text));
            }
            let mut bytes = response.bytes_stream();
            while let Some(chunk) = bytes.next().await {
                if reader.push(&chunk?, start.elapsed().as_secs_f64())? {
                    return Ok(());
                }
            }
            bail!("the stream ended before `data: [DONE]`")
        }
        .await;
        RequestOutcome {
            error: result.err().map(|e| format!("{e:#}")),
            latency: start.elapsed().as_secs_f64(),
            text_times: reader.text_times,
            usage: reader.usage,
        }
    }

    fn report(
        &self,
        prompts: &[Prompt],
        load: LoadPattern,
        outcomes: impl Iterator<Item = RequestOutcome>,
        duration_s: f64,
    ) -> ServingReport {
        let mut report = ServingReport {
            base_url: self.root.clone(),
            model: self.model.clone(),
            endpoint: self.args.endpoint,
            num_prompts: prompts.len(),
            concurrency: None,
            request_rate: None,
            input_len: self.dataset.is_none().then_some(self.args.input_len),
            dataset: self.args.dataset.as_ref().map(|p| p.display().to_string()),
            output_len: self.args.output_len,
            ignore_eos: self.args.ignore_eos,
            fresh_connection: self.args.fresh_connection,
            seed: self.args.seed,
            completed: 0,
            failed: 0,
            errors: Vec::new(),
            duration_s,
            total_input_tokens: 0,
            total_output_tokens: 0,
            request_throughput: 0.0,
            output_throughput: 0.0,
            total_token_throughput: 0.0,
            ttft_ms: None,
            tpot_ms: None,
            itl_ms: None,
            e2el_ms: None,
            slo: self.args.slo,
            good_requests: None,
            goodput: None,
        };
        match load {
            LoadPattern::Concurrency(c) => report.concurrency = Some(c),
            LoadPattern::RequestRate(r) => report.request_rate = Some(r),
        }
        let (mut ttfts, mut tpots, mut itls, mut e2els) = (vec![], vec![], vec![], vec![]);
        let mut good = 0;
        for (prompt, outcome) in prompts.iter().zip(outcomes) {
            if let Some(error) = outcome.error {
                report.failed += 1;
                if report.errors.len() < MAX_ERRORS && !report.errors.contains(&error) {
                    report.errors.push(error);
                }
                continue;
            }
            report.completed += 1;
            let (prompt_tokens, output_tokens) = outcome
                .usage
                .unwrap_or((prompt.tokens, outcome.text_times.len()));
            report.total_input_tokens += prompt_tokens;
            report.total_output_tokens += output_tokens;
            let latency_ms = outcome.latency * 1e3;
            e2els.push(latency_ms);
            itls.extend(outcome.text_times.windows(2).map(|w| (w[1] - w[0]) * 1e3));
            let Some(&first) = outcome.text_times.first() else {
                continue;
            };
            let ttft_ms = first * 1e3;
            ttfts.push(ttft_ms);
            let tpot = tpot_ms(latency_ms, ttft_ms, output_tokens);
            tpots.extend(tpot);
            good += usize::from(self.args.slo.is_some_and(|slo| slo.is_met(ttft_ms, tpot)));
        }
        let per_s = |n: usize| n as f64 / duration_s.max(1e-9);
        report.request_throughput = per_s(report.completed);
        report.output_throughput = per_s(report.total_output_tokens);
        report.total_token_throughput =
            per_s(report.total_input_tokens + report.total_output_tokens);
        report.ttft_ms = Summary::of(&ttfts);
        report.tpot_ms = Summary::of(&tpots);
        report.itl_ms = Summary::of(&itls);
        report.e2el_ms = Summary::of(&e2els);
        if self.args.slo.is_some() {
            report.good_requests = Some(good);
            report.goodput = Some(per_s(good));
        }
        report
    }
}

/// One request as the client saw it.
struct RequestOutcome {
    error: Option<String>,
    /// Seconds from sending to the end of the stream (or the failure).
    latency: f64,
    /// Seconds from sending to each chunk that carried text.
    text_times: Vec<f64>,
    /// `(prompt_tokens, completion_tokens)` as the server reported them.
    usage: Option<(usize, usize)>,
}

/// Everything `bench serve` measured; latencies in milliseconds, throughputs per second.
#[derive(Debug, Clone, Serialize)]
pub struct ServingReport {
    pub base_url: String,
    pub model: String,
    pub endpoint: Endpoint,
    pub num_prompts: usize,
    pub concurrency: Option<usize>,
    pub request_rate: Option<f64>,
    /// Tokens of each random prompt; `None` with a dataset.
    pub input_len: Option<usize>,
    pub dataset: Option<String>,
    pub output_len: usize,
    pub ignore_eos: bool,
    pub fresh_connection: bool,
    pub seed: u64,
    pub completed: usize,
    pub failed: usize,
    /// The first few different error messages.
    pub errors: Vec<String>,
    pub duration_s: f64,
    /// Over completed requests, as the server counted them when it reported usage.
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub ttft_ms: Option<Summary>,
    pub tpot_ms: Option<Summary>,
    pub itl_ms: Option<Summary>,
    pub e2el_ms: Option<Summary>,
    pub slo: Option<Slo>,
    pub good_requests: Option<usize>,
    /// Requests per second that met the SLO.
    pub goodput: Option<f64>,
}

impl ServingReport {
    pub fn print(&self) {
        let load = match (self.concurrency, self.request_rate) {
            (Some(c), _) => LoadPattern::Concurrency(c).to_string(),
            (_, Some(r)) => LoadPattern::RequestRate(r).to_string(),
            _ => String::new(),
        };
        println!("============ Serving Benchmark Result ============");
        println!("{:<40}{}", "Server:", self.base_url);
        println!("{:<40}{}", "Model:", self.model);
        println!("{:<40}{load}", "Load:");
        println!("{:<40}{}", "Successful requests:", self.completed);
        println!("{:<40}{}", "Failed requests:", self.failed);
        for error in &self.errors {
            println!("  error: {error}");
        }
        println!("{:<40}{:.2}", "Benchmark duration (s):", self.duration_s);
        println!("{:<40}{}", "Total input tokens:", self.total_input_tokens);
        println!(
            "{:<40}{}",
            "Total generated tokens:", self.total_output_tokens
        );
        println!(
            "{:<40}{:.2}",
            "Request throughput (req/s):", self.request_throughput
        );
        println!(
            "{:<40}{:.2}",
            "Output token throughput (tok/s):", self.output_throughput
        );
        println!(
            "{:<40}{:.2}",
            "Total token throughput (tok/s):", self.total_token_throughput
        );
        if let (Some(slo), Some(goodput), Some(good)) = (self.slo, self.goodput, self.good_requests)
        {
            println!(
                "{:<40}{goodput:.2} ({good} met TTFT <= {} ms, TPOT <= {} ms)",
                "Request goodput (req/s):", slo.ttft_ms, slo.tpot_ms
            );
        }
        for (title, summary) in [
            ("Time to First Token", self.ttft_ms),
            ("Time per Output Token (excl. 1st token)", self.tpot_ms),
            ("Inter-token Latency", self.itl_ms),
            ("End-to-end Latency", self.e2el_ms),
        ] {
            println!("{:-^50}", title);
            match summary {
                Some(s) => {
                    for (name, v) in [
                        ("Mean", s.mean),
                        ("P50", s.p50),
                        ("P90", s.p90),
                        ("P99", s.p99),
                    ] {
                        println!("{:<40}{v:.2}", format!("{name} (ms):"));
                    }
                }
                None => println!("(no samples)"),
            }
        }
        println!("{}", "=".repeat(50));
    }
}

/// Reads a server-sent event stream as it arrives, whatever the chunking.
struct StreamReader {
    endpoint: Endpoint,
    pending: Vec<u8>,
    text_times: Vec<f64>,
    usage: Option<(usize, usize)>,
}

impl StreamReader {
    fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            pending: Vec::new(),
            text_times: Vec::new(),
            usage: None,
        }
    }

    /// Takes the bytes that arrived `at` seconds into the request; true once `[DONE]` came.
    fn push(&mut self, bytes: &[u8], at: f64) -> anyhow::Result<bool> {
        self.pending.extend_from_slice(bytes);
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim_end().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim_start();
            if data == "[DONE]" {
                return Ok(true);
            }
            let event: Value = serde_json::from_str(data)
                .with_context(|| format!("an event that is not JSON: {data}"))?;
            self.take_event(&event, at)?;
        }
        Ok(false)
    }

    fn take_event(&mut self, event: &Value, at: f64) -> anyhow::Result<()> {
        if let Some(error) = event.get("error") {
            bail!("error in the stream: {}", message_of(error));
        }
        if let Some(usage) = event.get("usage").filter(|u| u.is_object()) {
            let count = |key: &str| usage.get(key).and_then(Value::as_u64).map(|n| n as usize);
            if let (Some(prompt), Some(completion)) =
                (count("prompt_tokens"), count("completion_tokens"))
            {
                self.usage = Some((prompt, completion));
            }
        }
        let choice = event.get("choices").and_then(|c| c.get(0));
        let text = match self.endpoint {
            Endpoint::Completions => choice.and_then(|c| c.get("text")),
            Endpoint::Chat => choice
                .and_then(|c| c.get("delta"))
                .and_then(|d| d.get("content")),
        };
        if text.and_then(Value::as_str).is_some_and(|t| !t.is_empty()) {
            self.text_times.push(at);
        }
        Ok(())
    }
}

/// The message of an OpenAI-style error object, or the value itself.
fn message_of(error: &Value) -> String {
    match error.get("message").and_then(Value::as_str) {
        Some(message) => message.to_string(),
        None => error.to_string(),
    }
}

/// The message of an error response body, shortened if it is not OpenAI-shaped.
fn error_message(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(v) if v.get("error").is_some() => message_of(&v["error"]),
        _ => body.chars().take(200).collect(),
    }
}

async fn first_model(client: &reqwest::Client, root: &str) -> anyhow::Result<String> {
    let response = client.get(format!("{root}/v1/models")).send().await?;
    let status = response.status();
    let body: Value = response.json().await?;
    if !status.is_success() {
        bail!(
            "HTTP {}: {}",
            status.as_u16(),
            error_message(&body.to_string())
        );
    }
    body["data"][0]["id"]
        .as_str()
        .map(String::from)
        .context("the server lists no model")
}

fn read_dataset(path: &Path) -> anyhow::Result<Vec<DatasetEntry>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let entries = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            let at = || format!("{}:{}", path.display(), i + 1);
            let v: Value =
                serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
            let prompt = v["prompt"]
                .as_str()
                .with_context(|| format!("{}: no \"prompt\" string", at()))?;
            let output_len = v
                .get("output_len")
                .and_then(Value::as_u64)
                .map(|n| n as usize);
            let priority = match v.get("priority") {
                None => None,
                Some(p) => Some(
                    p.as_i64()
                        .with_context(|| format!("{}: \"priority\" is not an integer", at()))?,
                ),
            };
            Ok(DatasetEntry {
                prompt: prompt.to_string(),
                output_len,
                priority,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if entries.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(entries)
}

/// Ids whose text alone is whole, printable characters: a prompt drawn from them is valid
/// UTF-8 before any re-encoding. Special tokens decode to nothing and drop out too.
fn prompt_candidates(tokenizer: &Tokenizer) -> anyhow::Result<Vec<u32>> {
    let is_text = |t: &str| {
        !t.is_empty()
            && t.chars()
                .all(|c| c != '\u{FFFD}' && (!c.is_control() || c.is_whitespace()))
    };
    let candidates: Vec<u32> = (0..tokenizer.vocab_size() as u32)
        .filter(|&id| tokenizer.decode(&[id], true).is_ok_and(|t| is_text(&t)))
        .collect();
    if candidates.is_empty() {
        bail!("the tokenizer has no token that decodes to text");
    }
    Ok(candidates)
}

/// Text that encodes to exactly `len` tokens, as vLLM's random dataset builds it: random ids,
/// decoded; the text re-encodes to a different count where tokens merge across their
/// boundaries, so cut or pad the re-encoded ids and try again until the count holds.
fn exact_prompt(
    tokenizer: &Tokenizer,
    candidates: &[u32],
    len: usize,
    rng: &mut Rng,
) -> anyhow::Result<String> {
    let mut draw = || candidates[(rng.next_u64() % candidates.len() as u64) as usize];
    let mut ids: Vec<u32> = (0..len).map(|_| draw()).collect();
    for _ in 0..100 {
        let text = tokenizer.decode(&ids, true)?;
        let encoded = tokenizer.encode(&text, false)?;
        if encoded.len() == len && !text.contains('\u{FFFD}') {
            return Ok(text);
        }
        ids = encoded;
        ids.truncate(len);
        // A cut through a character's bytes would decode to U+FFFD: cut before it.
        while !ids.is_empty()
            && tokenizer
                .decode(&ids, true)
                .is_ok_and(|t| t.ends_with('\u{FFFD}'))
        {
            ids.pop();
        }
        while ids.len() < len {
            ids.push(draw());
        }
    }
    bail!("found no text of exactly {len} tokens for this tokenizer")
}

pub fn run(args: ServeBenchArgs) -> anyhow::Result<()> {
    // One thread is plenty to drive a few hundred streams, and leaves the cores to a server on
    // the same machine.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let bench = ServingBenchmark::new(args.workload).await?;
        let prompts = bench.prompts(0, args.num_prompts)?;
        let load = match (args.concurrency, args.request_rate) {
            (Some(c), _) => LoadPattern::Concurrency(c),
            (None, Some(r)) => LoadPattern::RequestRate(r),
            (None, None) => unreachable!("clap requires one of them"),
        };
        eprintln!(
            "minserve: {} requests to {} (model {}) at {load}",
            prompts.len(),
            bench.root,
            bench.model
        );
        let report = bench.run(&prompts, load).await;
        report.print();
        if let Some(path) = &args.json {
            write_json(path, &report)?;
        }
        Ok(())
    })
}

pub fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_lines_carry_optional_lengths_and_priorities() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(
            &path,
            "{\"prompt\": \"a\"}\n\n{\"prompt\": \"b\", \"output_len\": 7, \"priority\": -2}\n",
        )
        .unwrap();
        let entries = read_dataset(&path).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!((entries[0].output_len, entries[0].priority), (None, None));
        assert_eq!(
            (entries[1].output_len, entries[1].priority),
            (Some(7), Some(-2))
        );
        std::fs::write(
            &path,
            "{\"prompt\": \"a\"}\n{\"prompt\": \"b\", \"priority\": \"high\"}\n",
        )
        .unwrap();
        let err = read_dataset(&path).unwrap_err().to_string();
        assert!(
            err.ends_with("d.jsonl:2: \"priority\" is not an integer"),
            "{err}"
        );
    }

    #[test]
    fn stream_reader_takes_events_split_anywhere() {
        let stream = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
            ": a comment\r\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\r\n\r\n",
            "data:{\"choices\":[{\"index\":0,\"delta\":{\"content\":\" there\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\n",
            "data: [DONE]\n\n",
        )
        .as_bytes();
        for split in [1, 2, 7, 40, stream.len()] {
            let mut reader = StreamReader::new(Endpoint::Chat);
            let mut done = false;
            for (i, chunk) in stream.chunks(split).enumerate() {
                done = reader.push(chunk, i as f64).unwrap();
                if done {
                    break;
                }
            }
            assert!(done);
            assert_eq!(reader.text_times.len(), 2, "split {split}");
            assert!(reader.text_times[0] < reader.text_times[1] || split == stream.len());
            assert_eq!(reader.usage, Some((7, 3)));
        }
    }

    #[test]
    fn an_error_event_fails_the_request() {
        let mut reader = StreamReader::new(Endpoint::Completions);
        let err = reader
            .push(
                b"data: {\"error\": {\"message\": \"out of memory\"}}\n",
                0.0,
            )
            .unwrap_err();
        assert!(err.to_string().contains("out of memory"), "{err}");
        assert_eq!(error_message("{\"error\":{\"message\":\"busy\"}}"), "busy");
        assert_eq!(error_message("plain"), "plain");
    }

    #[test]
    fn random_prompts_are_exact_for_the_default_models_tokenizer() {
        // Byte-level BPE merges across the boundaries of random tokens: the case the
        // re-encoding loop exists for. Fetches the default model on first use, as the model
        // tests do.
        let tokenizer = crate::model_source::load_tokenizer(minserve_hub::default_model()).unwrap();
        let candidates = prompt_candidates(&tokenizer).unwrap();
        for (seed, len) in [(0, 1), (1, 31), (2, 128), (3, 512)] {
            let text = exact_prompt(&tokenizer, &candidates, len, &mut Rng::new(seed)).unwrap();
            assert_eq!(
                tokenizer.encode(&text, false).unwrap().len(),
                len,
                "{text:?}"
            );
        }
    }

    #[test]
    fn random_prompts_have_exactly_the_asked_token_count() {
        let config = minserve_model::synthetic::preset("smollm2-135m").unwrap();
        let tokenizer = minserve_model::synthetic::tokenizer(&config).unwrap();
        let candidates = prompt_candidates(&tokenizer).unwrap();
        assert!(
            candidates
                .iter()
                .all(|&id| (32..127).contains(&id) || (9..=13).contains(&id) || id > 258),
            "control characters, raw high bytes and special tokens are not prompt text"
        );
        for (seed, len) in [(0, 1), (1, 17), (2, 128)] {
            let text = exact_prompt(&tokenizer, &candidates, len, &mut Rng::new(seed)).unwrap();
            assert_eq!(tokenizer.encode(&text, false).unwrap().len(), len);
        }
    }
}
