//! The `heapgrid` binary. Until the server lands it offers `demo` (opens a heap in the data
//! directory, writes, reads back, checkpoints and reports) and `check` (offline integrity check).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use heapgrid::heap::{Heap, HeapOptions, WriteBatch};

#[derive(Parser)]
#[command(name = "heapgrid", version, about = "An actor-based data grid on a persistent paged heap")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Opens (or creates) a heap in DIR, writes KEYS keys, reads them back, checkpoints, checks.
    Demo {
        #[arg(long, default_value = "./heapgrid-data")]
        dir: PathBuf,
        #[arg(long, default_value_t = 100_000)]
        keys: u32,
    },
    /// Checks the integrity of a heap file (offline). Exits non-zero on corruption.
    Check { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Demo { dir, keys } => demo(dir, keys),
        Cmd::Check { file } => check(file),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("heapgrid: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo(dir: PathBuf, keys: u32) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("demo.heap");
    let t = Instant::now();
    let mut heap = Heap::open(&path, HeapOptions::default())?;
    println!("opened {} with {} keys in {:?}", path.display(), heap.len(), t.elapsed());
    let t = Instant::now();
    let mut batch = WriteBatch::new();
    for i in 0..keys {
        batch.put(
            format!("user:{i:08}").as_bytes(),
            format!("{{\"id\":{i},\"visits\":{}}}", i % 97).as_bytes(),
        )?;
        if batch.len() == 1000 {
            heap.apply(&batch)?;
            batch.clear();
        }
    }
    heap.apply(&batch)?;
    heap.checkpoint()?;
    println!("wrote and checkpointed {keys} keys in {:?}", t.elapsed());
    let t = Instant::now();
    for i in 0..keys {
        let k = format!("user:{i:08}");
        heap.get(k.as_bytes())?.ok_or_else(|| format!("{k} missing"))?;
    }
    println!("read {keys} keys back in {:?}", t.elapsed());
    let first: Vec<String> = heap
        .range(b"user:00000042".as_slice()..)
        .take(3)
        .map(|e| e.map(|(k, v)| format!("{} = {}", String::from_utf8_lossy(k), String::from_utf8_lossy(&v))))
        .collect::<Result<_, _>>()?;
    println!("range from user:00000042: {first:?}");
    let r = heap.check_integrity()?;
    println!("integrity ok: {r:?}");
    println!("stats: {:?}", heap.stats());
    heap.close()?;
    Ok(())
}

fn check(file: PathBuf) -> Result<(), Box<dyn std::error::Error>> {
    if !file.is_file() {
        return Err(format!("{}: no such heap file", file.display()).into());
    }
    // No op-log replay (nothing is written): this checks the last checkpoint as it is on disk.
    let heap = Heap::open(&file, HeapOptions { op_log: false, ..HeapOptions::default() })?;
    let r = heap.check_integrity()?;
    println!("{}: ok, {} entries, {r:?}", file.display(), heap.len());
    Ok(())
}
