//! Per-key rate limits (requests/min, tokens/min; token buckets refilled continuously) and
//! per-key usage counters exported in `/metrics`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Which key a request authenticated with (a short label, never the key itself).
#[derive(Debug, Clone)]
pub struct KeyId(pub String);

#[derive(Debug, Default)]
pub struct KeyUsage {
    pub requests: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub rate_limited: AtomicU64,
}

struct Bucket {
    level: f64,
    capacity: f64,
    last: Instant,
}

impl Bucket {
    fn new(per_minute: u64) -> Self {
        Bucket { level: per_minute as f64, capacity: per_minute as f64, last: Instant::now() }
    }

    /// Take `n`; on refusal, the seconds until `n` would be available.
    fn take(&mut self, n: f64) -> Result<(), f64> {
        let now = Instant::now();
        self.level = (self.level + now.duration_since(self.last).as_secs_f64() * self.capacity / 60.0).min(self.capacity);
        self.last = now;
        if n <= self.level {
            self.level -= n;
            Ok(())
        } else if n > self.capacity {
            Err(f64::INFINITY)
        } else {
            Err((n - self.level) * 60.0 / self.capacity)
        }
    }
}

#[derive(Default)]
struct KeyState {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    usage: Arc<KeyUsage>,
}

pub struct RateLimiter {
    rpm: Option<u64>,
    tpm: Option<u64>,
    keys: Mutex<HashMap<String, KeyState>>,
}

/// A refused request: how long to wait and which limit.
pub struct RateLimited {
    pub retry_after: f64,
    pub what: &'static str,
}

impl RateLimiter {
    pub fn new(rpm: Option<u64>, tpm: Option<u64>) -> Self {
        RateLimiter { rpm: rpm.filter(|&r| r > 0), tpm: tpm.filter(|&t| t > 0), keys: Mutex::new(HashMap::new()) }
    }

    fn with_key<T>(&self, key: &str, f: impl FnOnce(&mut KeyState) -> T) -> T {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let st = keys.entry(key.to_string()).or_insert_with(|| KeyState {
            requests: self.rpm.map(Bucket::new),
            tokens: self.tpm.map(Bucket::new),
            usage: Arc::default(),
        });
        f(st)
    }

    /// Count one request against the key's requests/min.
    pub fn admit_request(&self, key: &str) -> Result<Arc<KeyUsage>, RateLimited> {
        self.with_key(key, |st| {
            if let Some(b) = st.requests.as_mut() {
                if let Err(retry_after) = b.take(1.0) {
                    st.usage.rate_limited.fetch_add(1, Ordering::Relaxed);
                    return Err(RateLimited { retry_after, what: "requests per minute" });
                }
            }
            st.usage.requests.fetch_add(1, Ordering::Relaxed);
            Ok(st.usage.clone())
        })
    }

    /// Count prompt + requested completion tokens against the key's tokens/min.
    pub fn admit_tokens(&self, key: &str, prompt: usize, max_completion: usize) -> Result<(), RateLimited> {
        self.with_key(key, |st| {
            if let Some(b) = st.tokens.as_mut() {
                if let Err(retry_after) = b.take((prompt + max_completion) as f64) {
                    st.usage.rate_limited.fetch_add(1, Ordering::Relaxed);
                    return Err(RateLimited { retry_after, what: "tokens per minute" });
                }
            }
            st.usage.prompt_tokens.fetch_add(prompt as u64, Ordering::Relaxed);
            Ok(())
        })
    }

    /// (key label, usage) of every key seen so far.
    pub fn usage(&self) -> Vec<(String, Arc<KeyUsage>)> {
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = keys.iter().map(|(k, s)| (k.clone(), s.usage.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refuse_then_name_a_wait() {
        let r = RateLimiter::new(Some(2), Some(100));
        assert!(r.admit_request("a").is_ok() && r.admit_request("a").is_ok());
        let e = r.admit_request("a").err().unwrap();
        assert!(e.retry_after > 0.0 && e.retry_after <= 30.0);
        assert!(r.admit_request("b").is_ok(), "keys are limited separately");
        assert!(r.admit_tokens("a", 60, 30).is_ok());
        assert!(r.admit_tokens("a", 10, 10).is_err());
        assert!(r.admit_tokens("c", 200, 0).err().unwrap().retry_after.is_infinite());
        let usage = r.usage();
        assert_eq!(usage[0].1.requests.load(Ordering::Relaxed), 2);
        assert_eq!(usage[0].1.rate_limited.load(Ordering::Relaxed), 2);
    }
}
