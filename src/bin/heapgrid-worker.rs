//! `heapgrid-worker`: a snippet sandbox worker. The server starts these (see
//! `heapgrid_actors::snippet::worker`); they are not run by hand. Each serves snippet runs on its
//! stdin/stdout, one at a time, under a process-wide allocation ceiling set per run: past it the
//! process exits with `monty_types::OOM_EXIT_CODE` and the server replaces it.

#[global_allocator]
static ALLOC: monty_alloc::LimitedAllocator = monty_alloc::LimitedAllocator;

fn main() {
    // No core files from a worker that dies on purpose.
    let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid rlimit for the duration of the call.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
    let set = |limit: Option<usize>| {
        let _ = monty_alloc::set_limit(limit, false);
    };
    if let Err(e) = heapgrid_actors::snippet::worker::serve(&set) {
        eprintln!("heapgrid-worker: {e}");
        std::process::exit(2);
    }
}
