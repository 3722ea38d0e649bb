//! The inference engine: dedicated OS threads that own the CPU model and
//! decode admitted requests one after the other, in arrival order, so that
//! candle's blocking work never runs on the tokio runtime that answers HTTP.
//!
//! Admission is a counter, not the channel's capacity: up to `max_queue`
//! requests (waiting plus running) are accepted and wait their turn; only
//! the next one is refused ([`SubmitError::QueueFull`] → 429). Each request
//! gets its tokens back on its own channel as they are generated; when the
//! client goes away (the receiver is dropped) its generation stops.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::LoadedModel;
use super::metrics::{FinishReason, ServeMetrics};
use super::text::TextAssembler;
use crate::model::{SamplingParams, pick_sampled};
use crate::openai::Usage;

/// What to generate for one request, already validated.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationSpec {
    /// The prompt's token ids (non-empty).
    pub prompt_ids: Vec<u32>,
    /// Most tokens to generate (≥ 1).
    pub max_tokens: usize,
    /// Temperature (0 = greedy, identical to `generate_greedy`) and top-p.
    pub sampling: SamplingParams,
    /// Seed of the sampler; `None` draws one from the OS.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Keep going past the end-of-sequence token.
    pub ignore_eos: bool,
}

/// The end of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// Why it ended.
    pub reason: FinishReason,
    /// Its token counts.
    pub usage: Usage,
}

/// What the engine sends back, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One generated token: the text it made final (may be empty), and on
    /// the last token how the request ended.
    Token {
        /// New text.
        delta: String,
        /// Set on the last token.
        finished: Option<Finished>,
    },
    /// Generation failed; nothing follows.
    Failed(String),
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// `max_queue` requests are already admitted.
    #[error("the server's queue is full ({0} requests admitted); retry later")]
    QueueFull(usize),
    /// The engine has stopped (shutting down).
    #[error("the inference engine has stopped")]
    Stopped,
}

struct Job {
    spec: GenerationSpec,
    events: UnboundedSender<Event>,
    arrived: Instant,
    /// Held until the request's last event is about to go out (or the job
    /// is dropped), so a client that sends its next request on reading the
    /// answer is never counted twice against `max_queue`.
    permit: std::cell::Cell<Option<Permit>>,
}

impl Job {
    fn release(&self) {
        drop(self.permit.take());
    }
}

/// One admitted request; releases its place when the request ends.
struct Permit(Arc<AtomicUsize>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The engine's handle: submits requests to its threads.
pub struct Engine {
    jobs: Mutex<mpsc::Sender<Job>>,
    admitted: Arc<AtomicUsize>,
    max_queue: usize,
    metrics: ServeMetrics,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("max_queue", &self.max_queue)
            .field("admitted", &self.admitted.load(Ordering::Relaxed))
            .finish()
    }
}

impl Engine {
    /// Starts `threads` engine threads over `model`. They end when the
    /// engine is dropped and the queue has drained.
    pub fn start(
        model: Arc<LoadedModel>,
        metrics: ServeMetrics,
        max_queue: usize,
        threads: usize,
    ) -> std::io::Result<Engine> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            let model = Arc::clone(&model);
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name(format!("engine-{i}"))
                .spawn(move || worker(&rx, &model, &metrics))?;
        }
        Ok(Engine {
            jobs: Mutex::new(tx),
            admitted: Arc::new(AtomicUsize::new(0)),
            max_queue,
            metrics,
        })
    }

    /// Admits a request, or refuses it when `max_queue` are in already.
    pub fn submit(&self, spec: GenerationSpec) -> Result<UnboundedReceiver<Event>, SubmitError> {
        let admitted = self
            .admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_queue).then_some(n + 1)
            });
        if admitted.is_err() {
            return Err(SubmitError::QueueFull(self.max_queue));
        }
        let permit = Permit(Arc::clone(&self.admitted));
        let (events, rx) = unbounded_channel();
        let job = Job {
            spec,
            events,
            arrived: Instant::now(),
            permit: std::cell::Cell::new(Some(permit)),
        };
        self.metrics.waiting.inc();
        let sent = self
            .jobs
            .lock()
            .map_err(|_| SubmitError::Stopped)?
            .send(job);
        if sent.is_err() {
            self.metrics.waiting.dec();
            return Err(SubmitError::Stopped);
        }
        Ok(rx)
    }
}

fn worker(rx: &Mutex<mpsc::Receiver<Job>>, model: &LoadedModel, metrics: &ServeMetrics) {
    loop {
        let job = match rx.lock() {
            Ok(guard) => match guard.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
            Err(_) => return,
        };
        metrics.waiting.dec();
        let mut running = Running::start(&metrics.running);
        // A panic must not take the thread (and every later request) with
        // it: the request's channel closes and its handler answers 500.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            run(model, metrics, &job, &mut running);
        }));
        if outcome.is_err() {
            tracing::error!("generation panicked; request dropped");
        }
    }
}

/// Counts one request in `vllm:num_requests_running` until it ends.
struct Running<'g> {
    gauge: &'g prometheus::IntGauge,
    counted: bool,
}

impl<'g> Running<'g> {
    fn start(gauge: &'g prometheus::IntGauge) -> Self {
        gauge.inc();
        Running {
            gauge,
            counted: true,
        }
    }

    fn end(&mut self) {
        if std::mem::take(&mut self.counted) {
            self.gauge.dec();
        }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.end();
    }
}

fn run(model: &LoadedModel, metrics: &ServeMetrics, job: &Job, running: &mut Running<'_>) {
    let spec = &job.spec;
    let eos = if spec.ignore_eos { None } else { model.eos };
    let fail = |message: String| {
        tracing::warn!(error = %message, "generation failed");
        job.release();
        // The client may be gone already; nothing else to tell.
        let _ = job.events.send(Event::Failed(message));
    };
    let mut decoding = match model
        .model
        .start_decoding(&spec.prompt_ids, spec.max_tokens, eos)
    {
        Ok(d) => d,
        Err(e) => return fail(e.to_string()),
    };
    let mut rng = match spec.seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => StdRng::from_os_rng(),
    };
    let sampling = spec.sampling;
    let mut pick = |logits: &candle_core::Tensor| pick_sampled(logits, sampling, &mut rng);
    let mut text = TextAssembler::new(&model.tokenizer, spec.stop.clone());
    let mut last_token_at: Option<Instant> = None;
    loop {
        let id = match decoding.next_token(&mut pick) {
            Ok(Some(id)) => id,
            Ok(None) => return fail("generation ended without a finish reason".into()),
            Err(e) => return fail(e.to_string()),
        };
        let now = Instant::now();
        match last_token_at {
            None => metrics
                .time_to_first_token
                .observe((now - job.arrived).as_secs_f64()),
            Some(t) => metrics
                .time_per_output_token
                .observe((now - t).as_secs_f64()),
        }
        last_token_at = Some(now);
        let pushed = match text.push(id) {
            Ok(p) => p,
            Err(e) => return fail(e.to_string()),
        };
        let reason = if pushed.stopped || Some(id) == eos {
            Some(FinishReason::Stop)
        } else if decoding.produced() >= spec.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        let mut delta = pushed.delta;
        let finished = reason.map(|reason| {
            delta.push_str(&text.finish());
            Finished {
                reason,
                usage: Usage::new(
                    u32::try_from(spec.prompt_ids.len()).unwrap_or(u32::MAX),
                    u32::try_from(decoding.produced()).unwrap_or(u32::MAX),
                ),
            }
        });
        // Counted before the last event goes out, so a client that reads
        // /metrics right after its answer sees its request in them.
        if let Some(f) = finished {
            record_finished(metrics, job.arrived, f);
            running.end();
            job.release();
        }
        if job.events.send(Event::Token { delta, finished }).is_err() {
            tracing::info!(
                generated = decoding.produced(),
                "client went away; generation stopped"
            );
            return;
        }
        if finished.is_some() {
            return;
        }
    }
}

fn record_finished(metrics: &ServeMetrics, arrived: Instant, f: Finished) {
    metrics.e2e_latency.observe(arrived.elapsed().as_secs_f64());
    metrics
        .generation_tokens
        .inc_by(u64::from(f.usage.completion_tokens));
    metrics
        .prompt_tokens
        .inc_by(u64::from(f.usage.prompt_tokens));
    metrics.record_success(f.reason);
    tracing::debug!(
        prompt_tokens = f.usage.prompt_tokens,
        completion_tokens = f.usage.completion_tokens,
        finish_reason = f.reason.as_str(),
        "request finished"
    );
}
