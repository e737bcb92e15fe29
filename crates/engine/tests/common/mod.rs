//! Helpers shared by the engine's integration tests.

use moeserve_engine::EngineHandle;

/// Every KV page is back in the pool (free or cached) once all requests have finished.
pub fn assert_all_pages_free(e: &EngineHandle) {
    // the engine publishes metrics after each loop; give it a moment to settle
    for _ in 0..200 {
        let m = e.metrics();
        if m.kv_pages_used == 0 && m.running == 0 && m.waiting == 0 {
            assert_eq!(m.kv_pages_free + m.kv_pages_cached, m.kv_pages_total);
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("pages still in use: {:?}", e.metrics());
}
