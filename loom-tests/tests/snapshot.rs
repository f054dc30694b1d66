//! Loom models of snapshot publication and page reclamation (`Registry`, `Pin`, `Published`):
//! a writer captures generations into pages, publishes them, retires the pages of older
//! generations and reuses a page only when `Registry::reusable` says so; readers load the
//! published snapshot and read its page. Pages are loom `UnsafeCell`s, so a writer that reused a
//! page a reader can still read is a reported data race, not a lucky interleaving.
#![cfg(heapgrid_loom)]

use heapgrid_heap::snapshot::{Generation, Pin, Published, Registry};
use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::thread;

const PAGES: usize = 2;

/// A snapshot of the model: the page its one value lives in, and its pin.
struct Snap {
    page: usize,
    pin: Pin,
}

impl Generation for Snap {
    fn generation(&self) -> u64 {
        self.pin.generation()
    }
}

struct Pages([UnsafeCell<u64>; PAGES]);

// SAFETY: access is what the model checks; loom reports any unsynchronised pair.
unsafe impl Sync for Pages {}

/// The writer's side: free pages and retired (tag, page) pairs, as `Pager` keeps them.
struct Writer {
    registry: Arc<Registry>,
    published: Arc<Published<Snap>>,
    pages: Arc<Pages>,
    free: Vec<usize>,
    retired: Vec<(u64, usize)>,
    current: Option<(u64, usize)>,
}

impl Writer {
    fn reclaim(&mut self) {
        let registry = &self.registry;
        let free = &mut self.free;
        self.retired.retain(|&(tag, page)| {
            let ok = registry.reusable(tag);
            if ok {
                free.push(page);
            }
            !ok
        });
    }

    /// Writes generation `generation` into a free page (copy on write), captures and publishes
    /// it, and retires the previous page with the previous generation as its tag. Returns false
    /// when no page is free (every other page is still readable by someone).
    fn step(&mut self, generation: u64) -> bool {
        self.reclaim();
        let Some(page) = self.free.pop() else { return false };
        // SAFETY: the page is free: no live snapshot reaches it (what the model checks).
        self.pages.0[page].with_mut(|p| unsafe { *p = generation });
        let pin = Registry::pin(&self.registry, generation);
        assert!(self.published.publish(Arc::new(Snap { page, pin })));
        if let Some((g, old)) = self.current.replace((generation, page)) {
            // Released after capture `g`, before capture `generation`: only snapshots <= g read it.
            self.retired.push((g, old));
        }
        true
    }
}

fn reader(published: Arc<Published<Snap>>, pages: Arc<Pages>) {
    if let Some(s) = published.load() {
        // SAFETY: the snapshot's page is never written while the snapshot lives.
        let v = pages.0[s.page].with(|p| unsafe { *p });
        assert_eq!(v, s.generation(), "a snapshot read a page that was reused");
    }
}

#[test]
fn a_page_a_reader_can_reach_is_never_reused() {
    loom::model(|| {
        let registry = Arc::new(Registry::new());
        let published = Arc::new(Published::<Snap>::new());
        let pages = Arc::new(Pages([UnsafeCell::new(0), UnsafeCell::new(0)]));
        let mut w = Writer {
            registry: registry.clone(),
            published: published.clone(),
            pages: pages.clone(),
            free: vec![0, 1],
            retired: Vec::new(),
            current: None,
        };
        assert!(w.step(1));
        let (p, pg) = (published.clone(), pages.clone());
        let r = thread::spawn(move || reader(p, pg));
        // Generations 2 and 3: the third needs generation 1's page back, which is reusable only
        // once the reader (if it took generation 1) has let go of it.
        let mut generation = 2;
        while generation <= 3 {
            if w.step(generation) {
                generation += 1;
            } else {
                thread::yield_now();
            }
        }
        r.join().unwrap();
        reader(published.clone(), pages.clone());
        // Everything but the published generation can be unpinned.
        drop(w);
        assert_eq!(registry.oldest(), Some(3));
        published.clear();
        assert_eq!(registry.oldest(), None);
    });
}

#[test]
fn publish_never_goes_back_and_clear_unpins() {
    loom::model(|| {
        let registry = Arc::new(Registry::new());
        let published = Arc::new(Published::<Snap>::new());
        let (p2, r2) = (published.clone(), registry.clone());
        let t = thread::spawn(move || p2.publish(Arc::new(Snap { page: 0, pin: Registry::pin(&r2, 2) })));
        let first = published.publish(Arc::new(Snap { page: 0, pin: Registry::pin(&registry, 1) }));
        let second = t.join().unwrap();
        // Whichever order: generation 2 ends up published, and 1 is unpinned once replaced or refused.
        assert!(second, "the newer generation is always published");
        assert!(first || registry.oldest() != Some(1), "a refused generation stays pinned");
        assert_eq!(published.load().map(|s| s.generation()), Some(2));
        assert_eq!(registry.oldest(), Some(2));
        published.clear();
        assert_eq!(registry.oldest(), None);
    });
}
