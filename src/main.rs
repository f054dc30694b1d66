//! The `heapgrid` binary: `serve` (the server), `shell` and `eval` (commands against a server),
//! `check` (offline integrity check of a data directory).

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use heapgrid::auth::TokenConfig;
use heapgrid::heap::{Heap, HeapOptions};
use heapgrid::server::{INFLIGHT_MAX_DEFAULT, Server, ServerConfig};
use heapgrid::{Client, ClientOptions, FsyncPolicy, Grid, GridOptions, Key, TableOptions, Value};
use serde::Deserialize;

#[derive(Parser)]
#[command(name = "heapgrid", version, about = "An actor-based data grid on a persistent paged heap")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the server.
    Serve(ServeArgs),
    /// Reads commands from standard input and runs them against a server (JSON out).
    Shell(ClientArgs),
    /// Runs one command against a server, e.g. `heapgrid eval get users bob`.
    Eval {
        #[command(flatten)]
        client: ClientArgs,
        /// The command and its arguments.
        command: Vec<String>,
    },
    /// Checks every heap under a data directory (offline; the server must not be running).
    Check { dir: PathBuf },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory.
    #[arg(long)]
    data: Option<PathBuf>,
    /// JSON config file (keys: listen, data, fsync, checkpoint_interval_ms, inflight_max, tokens).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Default fsync policy of new tables: always, never or every:MS.
    #[arg(long)]
    fsync: Option<String>,
}

#[derive(clap::Args)]
struct ClientArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    addr: SocketAddr,
    /// Auth token.
    #[arg(long, env = "HEAPGRID_TOKEN")]
    token: Option<String>,
}

/// The config file.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    listen: Option<SocketAddr>,
    data: Option<PathBuf>,
    fsync: Option<String>,
    checkpoint_interval_ms: Option<u64>,
    inflight_max: Option<usize>,
    #[serde(default)]
    tokens: Vec<TokenConfig>,
}

fn parse_fsync(s: &str) -> Result<FsyncPolicy, String> {
    match s {
        "always" => Ok(FsyncPolicy::Always),
        "never" => Ok(FsyncPolicy::Never),
        _ => s
            .strip_prefix("every:")
            .and_then(|ms| ms.parse().ok())
            .map(FsyncPolicy::EveryMs)
            .ok_or_else(|| format!("fsync policy {s:?}: use always, never or every:MS")),
    }
}

type AnyErr = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("heapgrid: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r: Result<(), AnyErr> = match cli.cmd {
        Cmd::Serve(a) => rt.block_on(serve(a)),
        Cmd::Shell(c) => rt.block_on(shell(c)),
        Cmd::Eval { client, command } => rt.block_on(eval(client, command)),
        Cmd::Check { dir } => check(&dir),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("heapgrid: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(a: ServeArgs) -> Result<(), AnyErr> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_target(false).init();
    let file: ConfigFile = match &a.config {
        Some(p) => {
            serde_json::from_str(&std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?)
                .map_err(|e| format!("{}: {e}", p.display()))?
        }
        None => ConfigFile::default(),
    };
    let data = a.data.or(file.data).unwrap_or_else(|| PathBuf::from("./heapgrid-data"));
    let listen = a.listen.or(file.listen).unwrap_or_else(|| ([127, 0, 0, 1], 7070).into());
    let fsync = match a.fsync.or(file.fsync) {
        Some(s) => parse_fsync(&s)?,
        None => FsyncPolicy::default(),
    };
    let mut gopts = GridOptions { fsync, ..GridOptions::default() };
    if let Some(ms) = file.checkpoint_interval_ms {
        gopts.checkpoint_interval_ms = ms;
    }
    let grid = Grid::open(&data, gopts).await?;
    tracing::info!(data = %data.display(), tables = grid.tables().len(), "grid opened");
    let cfg = ServerConfig {
        listen,
        inflight_max: file.inflight_max.unwrap_or(INFLIGHT_MAX_DEFAULT),
        tokens: file.tokens,
    };
    let trusted = cfg.tokens.is_empty();
    let server = match Server::start(grid.core().clone(), cfg).await {
        Ok(s) => s,
        Err(e) => {
            grid.close().await?;
            return Err(e.into());
        }
    };
    // Tests and scripts read this line to learn the port (with --listen 127.0.0.1:0).
    println!("heapgrid listening on {}", server.local_addr());
    std::io::stdout().flush()?;
    tracing::info!(addr = %server.local_addr(), trusted, "listening");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
    server.shutdown().await;
    grid.close().await?;
    tracing::info!("checkpointed and closed");
    Ok(())
}

async fn connect(c: &ClientArgs) -> Result<Client, AnyErr> {
    let opts = ClientOptions { token: c.token.clone(), ..ClientOptions::default() };
    Ok(Client::connect_with(c.addr, opts).await?)
}

fn parse_key(s: &str) -> Key {
    s.parse::<i64>().map(Key::Int).unwrap_or_else(|_| Key::Str(s.to_string()))
}

fn key_json(k: &Key) -> serde_json::Value {
    match k {
        Key::Int(i) => (*i).into(),
        Key::Str(s) => s.clone().into(),
    }
}

/// Runs one command; returns its JSON result.
async fn run_command(client: &Client, words: &[String]) -> Result<serde_json::Value, AnyErr> {
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    let usage = "commands: tables | create T [SHARDS] | drop T | get T K | put T K JSON | del T K | \
                 count T | scan T [PREFIX] [LIMIT] | ping";
    Ok(match w.as_slice() {
        ["ping"] => {
            client.ping().await?;
            "pong".into()
        }
        ["tables"] => serde_json::to_value(client.tables().await?)?,
        ["create", t, rest @ ..] => {
            let shards = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(1);
            client.create_table(t, TableOptions { shards, fsync: None }).await?;
            "created".into()
        }
        ["drop", t] => {
            client.drop_table(t).await?;
            "dropped".into()
        }
        ["get", t, k] => {
            client.table(t).get_value(parse_key(k)).await?.map_or(serde_json::Value::Null, |v| v.to_json())
        }
        ["put", t, k, json @ ..] => {
            let j: serde_json::Value = serde_json::from_str(&json.join(" "))?;
            let version = client.table(t).put_value(parse_key(k), Value::from_json(&j)?).await?;
            serde_json::json!({ "version": version })
        }
        ["del", t, k] => client.table(t).delete(parse_key(k)).await?.into(),
        ["count", t] => client.table(t).count().await?.into(),
        ["scan", t, rest @ ..] => {
            let limit = rest.get(1).map(|s| s.parse()).transpose()?.unwrap_or(100);
            let table = client.table(t);
            let entries = match rest.first() {
                Some(prefix) => table.prefix(prefix, limit, false).await?,
                None => table.scan_page(.., limit, false).await?,
            };
            serde_json::Value::Array(
                entries
                    .iter()
                    .map(|(k, v)| serde_json::json!({ "key": key_json(k), "value": v.to_json() }))
                    .collect(),
            )
        }
        _ => return Err(usage.into()),
    })
}

async fn eval(c: ClientArgs, command: Vec<String>) -> Result<(), AnyErr> {
    let client = connect(&c).await?;
    let out = run_command(&client, &command).await?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

async fn shell(c: ClientArgs) -> Result<(), AnyErr> {
    let client = connect(&c).await?;
    let stdin = std::io::stdin();
    let interactive = std::io::IsTerminal::is_terminal(&stdin);
    let mut line = String::new();
    loop {
        if interactive {
            print!("heapgrid> ");
            std::io::stdout().flush()?;
        }
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(());
        }
        let words: Vec<String> = line.split_whitespace().map(String::from).collect();
        match words.first().map(String::as_str) {
            None => continue,
            Some("quit" | "exit") => return Ok(()),
            _ => match run_command(&client, &words).await {
                Ok(v) => println!("{}", serde_json::to_string_pretty(&v)?),
                Err(e) => println!("{}", serde_json::json!({ "error": e.to_string() })),
            },
        }
    }
}

/// Every `*.heap` file under `dir`.
fn heaps(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            heaps(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "heap") {
            out.push(p);
        }
    }
    Ok(())
}

fn check(dir: &Path) -> Result<(), AnyErr> {
    let mut files = Vec::new();
    heaps(dir, &mut files).map_err(|e| format!("{}: {e}", dir.display()))?;
    if files.is_empty() {
        return Err(format!("{}: no heap files", dir.display()).into());
    }
    let mut bad = 0;
    for f in &files {
        // No op-log replay: nothing is written; this checks the last checkpoint on disk.
        let r = Heap::open(f, HeapOptions { op_log: false, ..HeapOptions::default() })
            .and_then(|h| h.check_integrity());
        match r {
            Ok(rep) => {
                println!("ok       {} ({} entries, {} tree pages)", f.display(), rep.entries, rep.tree_pages)
            }
            Err(e) => {
                bad += 1;
                println!("CORRUPT  {}: {e}", f.display());
            }
        }
    }
    if bad > 0 {
        return Err(format!("{bad} of {} heaps failed the check", files.len()).into());
    }
    Ok(())
}
