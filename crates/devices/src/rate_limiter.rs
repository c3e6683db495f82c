//! Rate limits for a device: two token buckets, one for bytes and one for operations, with the
//! parameters Firecracker's users know (`size`, `one_time_burst`, `refill_time_ms`).
//!
//! A bucket holds at most `size` tokens and refills from empty to full in `refill_time_ms`,
//! so its sustained rate is `size / refill_time`; `one_time_burst` extra tokens are spent
//! first and never come back. A device asks [`RateLimiter::blocked`] before it takes a request
//! from its queue and [`RateLimiter::consume`]s what the request costs once it has it. A
//! request is never split or put back: one that costs more than the bucket holds goes through
//! and leaves the bucket in debt, and the device takes nothing more until the debt is paid
//! (the same average rate, no request that can never pass). While blocked the device waits on
//! the limiter's timerfd, armed for the moment the debt is paid (not a fixed cool-down, which
//! distorts small buckets), so a throttled device uses no CPU.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::timerfd::TimerFd;

/// One bucket's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Tokens (bytes or operations) the bucket holds when full.
    pub size: u64,
    /// Extra tokens available once, spent before the bucket's.
    #[serde(default)]
    pub one_time_burst: u64,
    /// Milliseconds to refill the bucket from empty to full.
    pub refill_time_ms: u64,
}

impl TokenBucketConfig {
    /// Checks it; returns the field (relative to the bucket) and the problem.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.size == 0 {
            return Err(("size", "must be at least 1".into()));
        }
        if self.refill_time_ms == 0 || self.refill_time_ms > 3_600_000 {
            return Err(("refill_time_ms", "must be 1-3600000 (an hour)".into()));
        }
        Ok(())
    }
}

/// The limits of one device: bytes and operations, each optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Bytes (the data of reads and writes, or of frames).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Operations (requests, or frames).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimitConfig {
    /// Checks both buckets; returns the field (`bandwidth.size`...) and the problem.
    pub fn check(&self) -> Result<(), (String, String)> {
        for (name, b) in [("bandwidth", &self.bandwidth), ("ops", &self.ops)] {
            if let Some(b) = b {
                b.check().map_err(|(f, m)| (format!("{name}.{f}"), m))?;
            }
        }
        Ok(())
    }

    /// Applies one command-line option to `limit`: `bps=N` / `iops=N` (`pps=N` for frames)
    /// set a bucket of N refilled every second, `bps-burst=N` / `iops-burst=N` its one-time
    /// burst. Returns false if `key` is none of these.
    pub fn apply_flag(limit: &mut Option<Self>, key: &str, v: &str) -> Result<bool, String> {
        let (bytes, burst) = match key {
            "bps" => (true, false),
            "iops" | "pps" => (false, false),
            "bps-burst" => (true, true),
            "iops-burst" | "pps-burst" => (false, true),
            _ => return Ok(false),
        };
        let n: u64 = v
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{key}={v}: not a positive whole number"))?;
        let l = limit.get_or_insert_with(Default::default);
        let b = if bytes { &mut l.bandwidth } else { &mut l.ops };
        let b = b.get_or_insert(TokenBucketConfig {
            size: 0,
            one_time_burst: 0,
            refill_time_ms: 1000,
        });
        if burst {
            b.one_time_burst = n;
        } else {
            b.size = n;
        }
        Ok(true)
    }

    /// Whether it limits anything.
    pub fn is_empty(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }
}

/// Which of a device's limiters: a disk's, or a NIC's towards the guest or from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitedPath {
    /// A disk's requests.
    Disk,
    /// Frames to the guest.
    Rx,
    /// Frames from the guest.
    Tx,
}

/// A token bucket whose balance may go negative (a debt).
#[derive(Debug, Clone)]
struct Bucket {
    size: u64,
    refill_ns: u64,
    budget: i128,
    burst: u64,
    /// Nanosecond-token products not yet worth a whole token (keeps the rate exact).
    carry: u128,
    last: Instant,
}

impl Bucket {
    fn new(c: &TokenBucketConfig, now: Instant) -> Self {
        Self {
            size: c.size,
            refill_ns: c.refill_time_ms.saturating_mul(1_000_000).max(1),
            budget: i128::from(c.size),
            burst: c.one_time_burst,
            carry: 0,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let ns = now.saturating_duration_since(self.last).as_nanos();
        self.last = now;
        if self.budget >= i128::from(self.size) {
            self.carry = 0;
            return;
        }
        let product = ns * u128::from(self.size) + self.carry;
        let tokens = product / u128::from(self.refill_ns);
        self.carry = product % u128::from(self.refill_ns);
        let tokens = i128::try_from(tokens).unwrap_or(i128::MAX);
        self.budget = self
            .budget
            .saturating_add(tokens)
            .min(i128::from(self.size));
    }

    fn consume(&mut self, n: u64, now: Instant) {
        self.refill(now);
        let from_burst = n.min(self.burst);
        self.burst -= from_burst;
        self.budget -= i128::from(n - from_burst);
    }

    /// How long until the debt is paid, if there is one.
    fn wait(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        if self.budget >= 0 {
            return None;
        }
        let debt = self.budget.unsigned_abs();
        let need = debt * u128::from(self.refill_ns);
        let ns = need
            .saturating_sub(self.carry)
            .div_ceil(u128::from(self.size));
        Some(Duration::from_nanos(
            u64::try_from(ns).unwrap_or(u64::MAX).max(1),
        ))
    }
}

/// Whether a bucket has anything to limit.
fn bucket(c: &Option<TokenBucketConfig>, now: Instant) -> Option<Bucket> {
    c.as_ref()
        .filter(|c| c.check().is_ok())
        .map(|c| Bucket::new(c, now))
}

/// A device's rate limiter.
#[derive(Debug)]
pub struct RateLimiter {
    bytes: Option<Bucket>,
    ops: Option<Bucket>,
    timer: TimerFd,
    armed: bool,
}

impl RateLimiter {
    /// A limiter with `config` (an empty one limits nothing).
    pub fn new(config: RateLimitConfig) -> std::io::Result<Self> {
        let now = Instant::now();
        Ok(Self {
            bytes: bucket(&config.bandwidth, now),
            ops: bucket(&config.ops, now),
            timer: TimerFd::new()?,
            armed: false,
        })
    }

    /// Replaces the limits (buckets start full; the burst is the new one's). A device that
    /// was waiting has its timer fire at once, so its event loop runs its queue again.
    pub fn update(&mut self, config: RateLimitConfig) {
        let now = Instant::now();
        self.bytes = bucket(&config.bandwidth, now);
        self.ops = bucket(&config.ops, now);
        if self.armed && self.timer.reset(Duration::from_nanos(1), None).is_err() {
            self.armed = false;
        }
    }

    /// Whether it limits anything.
    pub fn limits(&self) -> bool {
        self.bytes.is_some() || self.ops.is_some()
    }

    /// Charges one operation of `bytes` bytes.
    pub fn consume(&mut self, bytes: u64) {
        // Unlimited (most devices): no clock read per request, 5-6 % of a virtio-net thread
        // that streams frames.
        if !self.limits() {
            return;
        }
        let now = Instant::now();
        if let Some(b) = &mut self.bytes {
            b.consume(bytes, now);
        }
        if let Some(o) = &mut self.ops {
            o.consume(1, now);
        }
    }

    /// Whether the device must wait before taking another request; if so the timer is armed
    /// for when it may go on (the device re-runs its queue when the timer's fd is readable).
    pub fn blocked(&mut self) -> bool {
        if self.armed {
            return true;
        }
        if !self.limits() {
            return false;
        }
        let now = Instant::now();
        let wait = [self.bytes.as_mut(), self.ops.as_mut()]
            .into_iter()
            .flatten()
            .filter_map(|b| b.wait(now))
            .max();
        let Some(wait) = wait else {
            return false;
        };
        match self.timer.reset(wait, None) {
            Ok(()) => {
                self.armed = true;
                true
            }
            Err(e) => {
                // Without a timer nothing would wake the device: let it go on unlimited
                // rather than stall the guest's disk.
                tracing::warn!("rate limiter: cannot arm the timer ({e}): not limiting");
                false
            }
        }
    }

    /// Whether the device waits for the timer (a [`Self::blocked`] said so, and it has not
    /// fired yet).
    pub fn waiting(&self) -> bool {
        self.armed
    }

    /// [`Self::blocked`], adding one to `episodes` each time the limiter starts a wait (not
    /// for every check while it waits).
    pub fn blocked_counting(&mut self, episodes: &std::sync::atomic::AtomicU64) -> bool {
        let was = self.armed;
        let b = self.blocked();
        if b && !was {
            episodes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        b
    }

    /// The timer fired: consume its event; the device then runs its queue again.
    pub fn on_timer(&mut self) {
        let _ = self.timer.wait();
        self.armed = false;
    }
}

impl AsRawFd for RateLimiter {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(size: u64, burst: u64, ms: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            size,
            one_time_burst: burst,
            refill_time_ms: ms,
        }
    }

    #[test]
    fn a_bucket_refills_at_its_rate_exactly() {
        let t0 = Instant::now();
        let mut b = Bucket::new(&cfg(1000, 0, 1000), t0);
        b.consume(1000, t0);
        assert_eq!(b.budget, 0);
        // 1 token per ms, counted without rounding loss over many small steps.
        let mut t = t0;
        for _ in 0..1000 {
            t += Duration::from_micros(333);
            b.refill(t);
        }
        assert_eq!(b.budget, 333);
        // Never beyond the size.
        b.refill(t + Duration::from_secs(10));
        assert_eq!(b.budget, 1000);
    }

    #[test]
    fn debts_block_for_exactly_their_time_and_bursts_come_first() {
        let t0 = Instant::now();
        let mut b = Bucket::new(&cfg(100, 50, 100), t0);
        b.consume(120, t0); // 50 from the burst, 70 from the bucket
        assert_eq!((b.burst, b.budget), (0, 30));
        assert_eq!(b.wait(t0), None);
        b.consume(130, t0); // a debt of 100
        assert_eq!(b.wait(t0), Some(Duration::from_millis(100)));
        assert_eq!(
            b.wait(t0 + Duration::from_millis(60)),
            Some(Duration::from_millis(40))
        );
        assert_eq!(b.wait(t0 + Duration::from_millis(100)), None);
    }

    #[test]
    fn the_limiter_arms_its_timer_and_an_empty_one_never_blocks() {
        let mut none = RateLimiter::new(RateLimitConfig::default()).unwrap();
        none.consume(u64::MAX);
        assert!(!none.blocked());
        let mut l = RateLimiter::new(RateLimitConfig {
            bandwidth: None,
            ops: Some(cfg(10, 0, 20)),
        })
        .unwrap();
        for _ in 0..10 {
            assert!(!l.blocked());
            l.consume(4096);
        }
        assert!(!l.blocked(), "a bucket at zero owes nothing");
        l.consume(0);
        assert!(l.blocked());
        let t = Instant::now();
        l.on_timer(); // waits for the timer
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(1), "{waited:?}");
        assert!(!l.blocked());
        // An update starts full buckets, and a waiting device is woken at once.
        l.consume(0);
        l.consume(0);
        assert!(l.blocked());
        l.update(RateLimitConfig::default());
        let t = Instant::now();
        l.on_timer();
        assert!(t.elapsed() < Duration::from_millis(15));
        assert!(!l.blocked());
    }

    #[test]
    fn configs_are_checked_and_parse_as_documented() {
        let c: RateLimitConfig = serde_json::from_str(
            r#"{"bandwidth":{"size":1048576,"refill_time_ms":1000},"ops":{"size":100,"one_time_burst":1000,"refill_time_ms":100}}"#,
        )
        .unwrap();
        assert!(c.check().is_ok());
        assert_eq!(c.ops.unwrap().one_time_burst, 1000);
        let bad = RateLimitConfig {
            bandwidth: Some(cfg(0, 0, 1)),
            ops: None,
        };
        assert_eq!(bad.check().unwrap_err().0, "bandwidth.size");
        let bad = RateLimitConfig {
            bandwidth: None,
            ops: Some(cfg(1, 0, 0)),
        };
        assert_eq!(bad.check().unwrap_err().0, "ops.refill_time_ms");
        assert!(serde_json::from_str::<RateLimitConfig>(r#"{"bytes":{}}"#).is_err());
    }
}
