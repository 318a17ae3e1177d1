//! `trellis agent`: runs the durable agent loop against any OpenAI-compatible endpoint, acting
//! on the shop as a logged-in user through its gateway; lists, shows, approves, denies,
//! cancels and resumes runs.
//!
//! The run log is a trellis-saga log (`--store`, default `sqlite://trellis-data/agent.db`), so
//! a run whose process died is carried on by `trellis agent resume ID`, and an operator can
//! decide on a waiting call from another terminal (`trellis agent approve ID`).

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use serde_json::Value;
use trellis_agent::run::{self, StepTiming};
use trellis_agent::{
    Agent, Caller, Limits, OpenAiClient, OpenAiConfig, RunEvent, RunOutcome, StopReason,
};
use trellis_saga::{AnySagaStore, SagaId, SagaStatus};
use uuid::Uuid;

/// The system prompt of shop runs.
const SYSTEM_PROMPT: &str = "You are the assistant of an online shop, acting for the logged-in \
user with the tools you are given. Use the tools to find facts; never invent order ids, \
product ids or prices. Prefer one call that answers over many. Calls that place or cancel \
orders may wait for a human's approval. Answer briefly, in the user's language.";

/// `trellis agent`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct AgentArgs {
    #[command(subcommand)]
    command: Option<AgentCommand>,
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, Args)]
struct StoreArgs {
    /// The run log: `sqlite://PATH` or `postgres://…`.
    #[arg(
        long,
        env = "TRELLIS_AGENT_DB",
        default_value = "sqlite://trellis-data/agent.db",
        global = true
    )]
    store: String,
}

#[derive(Debug, Args)]
struct ShopArgs {
    /// The shop's gateway.
    #[arg(long, env = "TRELLIS_GATEWAY", default_value = "http://127.0.0.1:8080")]
    gateway: String,
    /// A bearer token of the user the agent acts for (instead of --email/--password).
    #[arg(long, env = "TRELLIS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Log in as this user.
    #[arg(long, env = "TRELLIS_EMAIL")]
    email: Option<String>,
    /// The user's password (asked for when --email is given without it).
    #[arg(long, env = "TRELLIS_PASSWORD", hide_env_values = true)]
    password: Option<String>,
}

#[derive(Debug, Args)]
struct LlmArgs {
    /// The OpenAI-compatible API's base URL, up to `/v1` (or OPENAI_BASE_URL).
    #[arg(long)]
    llm_base_url: Option<String>,
    /// The model (or OPENAI_MODEL).
    #[arg(long)]
    llm_model: Option<String>,
    /// The API key (or OPENAI_API_KEY).
    #[arg(long, hide_env_values = true)]
    llm_api_key: Option<String>,
    /// The time limit of one model request, in seconds.
    #[arg(long, default_value_t = 120)]
    llm_timeout_secs: u64,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// What to ask, e.g. "cancel my last pending order".
    prompt: Option<String>,
    #[command(flatten)]
    shop: ShopArgs,
    #[command(flatten)]
    llm: LlmArgs,
    #[command(flatten)]
    approval: ApprovalArgs,
    /// The most model answers.
    #[arg(long, default_value_t = Limits::default().max_steps)]
    max_steps: u32,
    /// The most tokens over the run.
    #[arg(long, default_value_t = Limits::default().max_tokens)]
    max_tokens: u64,
    /// The longest the run may take, in seconds.
    #[arg(long, default_value_t = Limits::default().max_wall_secs)]
    max_seconds: u64,
}

#[derive(Debug, Args)]
struct ApprovalArgs {
    /// Approve every call that needs approval, without asking.
    #[arg(long)]
    approve_all: bool,
    /// Without a terminal to ask on, how long to wait for an operator's decision
    /// (`trellis agent approve|deny ID`) before leaving the run waiting, in seconds.
    #[arg(long, default_value_t = 3600)]
    approval_wait_secs: u64,
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// Lists runs, oldest first.
    Runs {
        /// Only runs with this status (running, compensating, completed, failed, stuck).
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Shows a run: its transcript, its calls and each step's timing.
    Show {
        /// The run.
        id: Uuid,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Approves a waiting call (all waiting calls without CALL).
    Approve {
        /// The run.
        id: Uuid,
        /// The call, `N.I` as `show` prints it.
        call: Option<String>,
        /// Who approves (default `cli:$USER`).
        #[arg(long)]
        operator: Option<String>,
    },
    /// Denies a waiting call: the run is aborted and its changes are undone.
    Deny {
        /// The run.
        id: Uuid,
        /// The call, `N.I`.
        call: Option<String>,
        /// Why.
        #[arg(long, default_value = "denied from the CLI")]
        reason: String,
        /// Who denies (default `cli:$USER`).
        #[arg(long)]
        operator: Option<String>,
    },
    /// Cancels a running run: its changes are undone when it is next driven.
    Cancel {
        /// The run.
        id: Uuid,
        /// Why.
        #[arg(long, default_value = "cancelled from the CLI")]
        reason: String,
        /// Who cancels (default `cli:$USER`).
        #[arg(long)]
        operator: Option<String>,
    },
    /// Serves the operator's HTTP surface for runs (list, show, approve, deny, cancel; see
    /// trellis_agent::http) until Ctrl-C. It has no authentication: keep it on loopback or an
    /// operator network.
    Serve {
        /// Listen here.
        #[arg(long, env = "TRELLIS_AGENT_LISTEN", default_value = "127.0.0.1:8097")]
        listen: std::net::SocketAddr,
    },
    /// Carries on a run from its log (after a crash, or after a decision).
    Resume {
        /// The run.
        id: Uuid,
        #[command(flatten)]
        shop: ShopArgs,
        #[command(flatten)]
        llm: LlmArgs,
        #[command(flatten)]
        approval: ApprovalArgs,
    },
}

fn operator(given: Option<String>) -> String {
    given.unwrap_or_else(|| {
        format!(
            "cli:{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
        )
    })
}

async fn open_store(url: &str) -> anyhow::Result<AnySagaStore> {
    if let Some(path) = url.strip_prefix("sqlite://")
        && let Some(parent) = std::path::Path::new(path).parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    AnySagaStore::open(url)
        .await
        .with_context(|| format!("opening the run log {url}"))
}

impl AgentArgs {
    pub(crate) async fn run(self) -> anyhow::Result<()> {
        let store = open_store(&self.store.store).await?;
        match self.command {
            None => {
                let Some(prompt) = self.run.prompt.clone() else {
                    bail!(
                        "say what the agent should do: trellis agent \"list my orders\" (or see trellis agent --help)"
                    );
                };
                let limits = Limits {
                    max_steps: self.run.max_steps,
                    max_tokens: self.run.max_tokens,
                    max_wall_secs: self.run.max_seconds,
                    max_answer_tokens: None,
                };
                let session = Session::open(&self.run.shop, &self.run.llm, store).await?;
                let agent = session.agent().with_limits(limits);
                let id = agent.start(&session.caller, &prompt).await?;
                eprintln!("run {id} (trellis agent show {id})");
                drive(&agent, &session.caller, id, &self.run.approval).await
            }
            Some(AgentCommand::Resume {
                id,
                shop,
                llm,
                approval,
            }) => {
                let session = Session::open(&shop, &llm, store).await?;
                let agent = session.agent();
                drive(&agent, &session.caller, SagaId::from_uuid(id), &approval).await
            }
            Some(AgentCommand::Runs { status, limit }) => {
                let status = match status {
                    Some(s) => Some(
                        SagaStatus::parse(&s).with_context(|| format!("unknown status `{s}`"))?,
                    ),
                    None => None,
                };
                let runs = run::list(&store, status, limit).await?;
                println!(
                    "{:<36}  {:<12}  {:<20}  UPDATED",
                    "RUN", "STATUS", "STARTED"
                );
                for summary in runs {
                    println!(
                        "{:<36}  {:<12}  {:<20}  {}",
                        summary.id,
                        summary.status.as_str(),
                        summary.created_at.format("%Y-%m-%d %H:%M:%S"),
                        summary.updated_at.format("%Y-%m-%d %H:%M:%S"),
                    );
                }
                Ok(())
            }
            Some(AgentCommand::Serve { listen }) => {
                let app = trellis_agent::http::router(Arc::new(store));
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("listening on {listen}"))?;
                eprintln!("agent runs served on http://{listen}/runs (Ctrl-C stops)");
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = tokio::signal::ctrl_c().await;
                    })
                    .await?;
                Ok(())
            }
            Some(AgentCommand::Show { id, json }) => {
                show(&store, SagaId::from_uuid(id), json).await
            }
            Some(AgentCommand::Approve {
                id,
                call,
                operator: who,
            }) => {
                let decided = run::approve(
                    &store,
                    SagaId::from_uuid(id),
                    call.as_deref(),
                    &operator(who),
                )
                .await?;
                for call in decided {
                    println!(
                        "approved {} (trellis agent resume {id} carries the run on)",
                        call.label()
                    );
                }
                Ok(())
            }
            Some(AgentCommand::Deny {
                id,
                call,
                reason,
                operator: who,
            }) => {
                let decided = run::deny(
                    &store,
                    SagaId::from_uuid(id),
                    call.as_deref(),
                    &operator(who),
                    &reason,
                )
                .await?;
                for call in decided {
                    println!(
                        "denied {}: the run is aborted and its changes undone when it resumes",
                        call.label()
                    );
                }
                Ok(())
            }
            Some(AgentCommand::Cancel {
                id,
                reason,
                operator: who,
            }) => {
                run::cancel(&store, SagaId::from_uuid(id), &operator(who), &reason).await?;
                println!("cancelled {id}: its changes are undone when it resumes");
                Ok(())
            }
        }
    }
}

/// A logged-in user, the model and the tools.
struct Session {
    store: Arc<AnySagaStore>,
    llm: Arc<OpenAiClient>,
    tools: trellis_agent::ToolRegistry,
    caller: Caller,
}

impl Session {
    async fn open(shop: &ShopArgs, llm: &LlmArgs, store: AnySagaStore) -> anyhow::Result<Self> {
        let gateway = shop.gateway.trim_end_matches('/').to_owned();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()?;
        let token = match (&shop.token, &shop.email) {
            (Some(token), _) => token.clone(),
            (None, Some(email)) => {
                let password = match &shop.password {
                    Some(p) => p.clone(),
                    None => rpassword::prompt_password(format!("password for {email}: "))?,
                };
                login(&http, &gateway, email, &password).await?
            }
            (None, None) => bail!(
                "who does the agent act for? give --token (TRELLIS_TOKEN) or --email (TRELLIS_EMAIL)"
            ),
        };
        let me: Value = http
            .get(format!("{gateway}/api/users/me"))
            .bearer_auth(&token)
            .send()
            .await
            .with_context(|| format!("reaching the shop at {gateway}"))?
            .error_for_status()
            .context("the shop did not accept the token (GET /api/users/me)")?
            .json()
            .await?;
        let caller = Caller::new(
            me["id"].as_str().unwrap_or_default(),
            me["role"].as_str().unwrap_or("customer"),
        )
        .with_bearer(token);
        let mut config = OpenAiConfig::from_env();
        if let Some(url) = &llm.llm_base_url {
            config.base_url.clone_from(url);
        }
        if let Some(model) = &llm.llm_model {
            config.model.clone_from(model);
        }
        if let Some(key) = &llm.llm_api_key {
            config.api_key = Some(key.clone());
        }
        config.timeout = Duration::from_secs(llm.llm_timeout_secs.max(1));
        let llm = Arc::new(OpenAiClient::new(config)?);
        let tools = shop_agent::registry(&gateway)
            .map_err(|e| anyhow::anyhow!("building the shop's tools: {e}"))?;
        Ok(Self {
            store: Arc::new(store),
            llm,
            tools,
            caller,
        })
    }

    fn agent(&self) -> Agent<AnySagaStore> {
        Agent::new(self.store.clone(), self.llm.clone(), self.tools.clone())
            .with_system_prompt(SYSTEM_PROMPT)
            .on_event(print_event)
    }
}

async fn login(
    http: &reqwest::Client,
    gateway: &str,
    email: &str,
    password: &str,
) -> anyhow::Result<String> {
    let response = http
        .post(format!("{gateway}/api/auth/token"))
        .json(&serde_json::json!({ "email": email, "password": password }))
        .send()
        .await
        .with_context(|| format!("reaching the shop at {gateway}"))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!(
            "logging in as {email}: {status} {}",
            body["message"]
                .as_str()
                .or(body["error"].as_str())
                .unwrap_or("")
        );
    }
    body["access_token"]
        .as_str()
        .map(str::to_owned)
        .context("the login answer has no access_token")
}

fn short(text: &str, max: usize) -> String {
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        let cut: String = one_line.chars().take(max).collect();
        format!("{cut}…")
    }
}

fn print_event(event: &RunEvent) {
    match event {
        RunEvent::Answer {
            step,
            content,
            tool_calls,
            took,
        } => {
            if let Some(text) = content.as_deref().filter(|_| !tool_calls.is_empty()) {
                println!("[{step}] model ({took:.1?}): {}", short(text, 200));
            } else if tool_calls.is_empty() {
                println!("[{step}] model ({took:.1?}) answered");
            }
            for call in tool_calls {
                println!("[{step}] → {} {}", call.name, short(&call.arguments, 200));
            }
        }
        RunEvent::CallFinished { call, took } => {
            let outcome = call.outcome.as_ref();
            let mark = if outcome.is_some_and(|o| o.ok) {
                "✓"
            } else {
                "✗"
            };
            println!(
                "[{}] {mark} {} ({took:.1?}): {}",
                call.label(),
                call.tool,
                short(outcome.map_or("", |o| o.content.as_str()), 200)
            );
        }
        RunEvent::AwaitingApproval { call } => {
            println!(
                "[{}] waits for approval: {} {}",
                call.label(),
                call.tool,
                short(&call.arguments, 200)
            );
        }
        RunEvent::Undone { call } => println!("[{}] undone: {}", call.label(), call.tool),
        RunEvent::Stopped { stop } => {
            if *stop != StopReason::EndTurn {
                println!("stopped: {}", describe(stop));
            }
        }
    }
}

fn describe(stop: &StopReason) -> String {
    match stop {
        StopReason::EndTurn => "the model ended its turn".into(),
        StopReason::StepLimit => "the step limit was reached (--max-steps)".into(),
        StopReason::TokenBudget => "the token budget was spent (--max-tokens)".into(),
        StopReason::WallTime => "the time limit passed (--max-seconds)".into(),
        StopReason::Denied { call, reason } => {
            format!("call {call} was denied by {reason}; changes undone")
        }
        StopReason::Cancelled { reason } => format!("cancelled by {reason}; changes undone"),
        StopReason::Error { message } => format!("error: {message}"),
    }
}

async fn drive(
    agent: &Agent<AnySagaStore>,
    caller: &Caller,
    id: SagaId,
    approval: &ApprovalArgs,
) -> anyhow::Result<()> {
    loop {
        match agent.drive(id, caller).await? {
            RunOutcome::Finished { stop, answer } => {
                if let Some(answer) = answer {
                    println!("\n{answer}");
                }
                return match stop {
                    StopReason::EndTurn => Ok(()),
                    other => bail!("run {id}: {}", describe(&other)),
                };
            }
            RunOutcome::Stuck { step, error } => {
                bail!(
                    "run {id} is stuck: undoing {step} failed ({error}); the change is still in place. \
                     Fix it by hand, then look at trellis agent show {id}"
                );
            }
            RunOutcome::AwaitingApproval { calls } => {
                if approval.approve_all {
                    run::approve(agent.store(), id, None, &operator(None)).await?;
                    continue;
                }
                if std::io::stdin().is_terminal() {
                    for call in calls {
                        print!(
                            "approve {} {} {}? [y/N] ",
                            call.label(),
                            call.tool,
                            short(&call.arguments, 200)
                        );
                        std::io::stdout().flush()?;
                        let mut line = String::new();
                        std::io::stdin().lock().read_line(&mut line)?;
                        let label = call.label();
                        let at = label.split(':').next().unwrap_or(&label);
                        if matches!(line.trim(), "y" | "Y" | "yes") {
                            run::approve(agent.store(), id, Some(at), &operator(None)).await?;
                        } else {
                            run::deny(
                                agent.store(),
                                id,
                                Some(at),
                                &operator(None),
                                "declined at the prompt",
                            )
                            .await?;
                        }
                    }
                    continue;
                }
                eprintln!(
                    "waiting for an operator: trellis agent approve {id} (or deny {id}); up to {} s",
                    approval.approval_wait_secs
                );
                wait_for_decision(agent, id, Duration::from_secs(approval.approval_wait_secs))
                    .await?;
            }
        }
    }
}

/// Polls the log until every waiting call has a decision, or `limit` passes.
async fn wait_for_decision(
    agent: &Agent<AnySagaStore>,
    id: SagaId,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let (_, state) = agent.load(id).await?;
        let waiting = state.calls.iter().any(|c| {
            c.outcome.is_none()
                && c.effect.is_some_and(trellis_agent::Effect::needs_approval)
                && c.decision.is_none()
        });
        if !waiting {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "no decision within {limit:?}; the run waits: trellis agent approve {id}, then trellis agent resume {id}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn show(store: &AnySagaStore, id: SagaId, json: bool) -> anyhow::Result<()> {
    let instance = trellis_saga::SagaStore::load(store, id)
        .await?
        .with_context(|| format!("no run {id}"))?;
    if instance.definition != run::DEFINITION {
        bail!(
            "{id} is a saga of `{}`, not an agent run",
            instance.definition
        );
    }
    let state: trellis_agent::RunState = instance.context()?;
    let timings = run::timings(&instance);
    if json {
        let out = serde_json::json!({
            "id": id.to_string(),
            "status": instance.status.as_str(),
            "state": state,
            "steps": timings,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("run {id}: {}", instance.status.as_str());
    println!(
        "for {} ({}), model {}",
        state.caller.subject, state.caller.role, state.model
    );
    println!(
        "{} model answers, {} tokens, {} calls{}",
        state.steps,
        state.usage.total(),
        state.calls.len(),
        state
            .stop
            .as_ref()
            .map(|s| format!(", stopped: {}", describe(s)))
            .unwrap_or_default()
    );
    println!("\ntranscript:");
    for message in &state.messages {
        match message {
            trellis_agent::Message::System { .. } => {}
            trellis_agent::Message::User { content } => println!("  user: {}", short(content, 300)),
            trellis_agent::Message::Assistant {
                content,
                tool_calls,
            } => {
                if let Some(text) = content {
                    println!("  model: {}", short(text, 300));
                }
                for call in tool_calls {
                    println!("  model → {} {}", call.name, short(&call.arguments, 200));
                }
            }
            trellis_agent::Message::Tool {
                tool_call_id,
                content,
            } => {
                println!("  tool {tool_call_id}: {}", short(content, 200));
            }
        }
    }
    println!("\nsteps:");
    for StepTiming {
        step,
        started,
        ended,
        outcome,
    } in timings
    {
        let took = ended.map(|e| format!("{} ms", (e - started).num_milliseconds()));
        println!(
            "  {:<36} {}  {:>9}  {}",
            step,
            started.format("%H:%M:%S%.3f"),
            took.unwrap_or_else(|| "…".into()),
            outcome.unwrap_or_else(|| "in flight / waiting".into())
        );
    }
    Ok(())
}
