//! Child processes for crash tests: re-runs this test binary on one test with environment
//! variables that switch the test body into its child role, reads the child's stdout line by
//! line, and kills it with SIGKILL. Also the seeded generator the crash tests draw timings from.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A running child and the lines it printed so far.
pub struct Child {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    reader: Option<JoinHandle<()>>,
}

/// Starts this test binary running only `test_name`, with `envs` set.
pub fn spawn(test_name: &str, envs: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([test_name, "--exact", "--nocapture", "--test-threads=1"]);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Child { child, lines, reader: Some(reader) }
}

impl Child {
    /// The next line, if one arrives within `timeout`.
    pub fn line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// The child's process id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`, then every line printed before the kill that was not read yet.
    pub fn kill(mut self) -> Vec<String> {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        self.lines.try_iter().collect()
    }
}

/// A seed from the clock (printed, so a failure can be replayed) and a generator seeded with it.
pub fn seeded(label: &str) -> (u64, impl FnMut() -> u64) {
    let seed = std::env::var("HEAPGRID_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("{label} seed {seed} (set HEAPGRID_TEST_SEED to replay)");
    let mut rng = fastrand::Rng::with_seed(seed);
    (seed, move || rng.u64(..))
}
