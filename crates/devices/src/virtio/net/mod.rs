//! virtio-net on a TAP device:
//!
//! * this file: how a NIC is attached ([`NicConfig`], parsed from flags and from the API);
//! * [`device`]: the device (rx and tx queues, offloads, back-pressure, save and restore);
//! * [`event_handler`]: its place on the event loop.

pub mod device;
pub mod event_handler;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use device::{Net, NetError, NetState, QUEUE_SIZE};

/// How a NIC is attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    /// TAP interface name.
    pub tap: String,
    /// MAC address.
    #[serde(with = "mac_text")]
    pub mac: [u8; 6],
    /// Rate limits on frames to the guest (bytes and frames per refill time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limit: Option<crate::rate_limiter::RateLimitConfig>,
    /// Rate limits on frames from the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limit: Option<crate::rate_limiter::RateLimitConfig>,
    /// The guest's addresses on this NIC, announced after a move along with the MAC (a
    /// gratuitous ARP for each IPv4 address, an unsolicited neighbour advertisement for each
    /// IPv6 one), so neighbours' caches are refreshed, not only bridges' tables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<std::net::IpAddr>,
}

/// Parses `aa:bb:cc:dd:ee:ff` (a unicast address).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// A MAC in its text form on the wire.
mod mac_text {
    use super::*;

    pub fn serialize<S: Serializer>(m: &[u8; 6], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&mac_string(m))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 6], D::Error> {
        let text = String::deserialize(d)?;
        parse_mac(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{text:?} is not a unicast MAC address aa:bb:cc:dd:ee:ff"
            ))
        })
    }
}

/// A stable, locally administered unicast MAC derived from `seed` (FNV-1a).
pub fn derived_mac(seed: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_le_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

impl std::str::FromStr for NicConfig {
    type Err = String;
    /// Parses the `--net` flag: `tap=NAME[,mac=MAC]`, the guest's addresses to announce after
    /// a migration (`ip=ADDR`, IPv4 or IPv6, repeatable), and limits per second, to the guest
    /// (`rx-bps=N`, `rx-pps=N`, `rx-bps-burst=N`, `rx-pps-burst=N`) and from it (`tx-...`).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut tap = None;
        let mut mac = None;
        let mut addresses = Vec::new();
        let (mut rx, mut tx) = (None, None);
        for opt in s.split(',') {
            match opt.split_once('=') {
                Some(("tap", v)) if !v.is_empty() => tap = Some(v.to_owned()),
                Some(("mac", v)) => {
                    mac = Some(parse_mac(v).ok_or_else(|| {
                        format!("invalid mac {v:?}: expected a unicast aa:bb:cc:dd:ee:ff")
                    })?)
                }
                Some(("ip", v)) => addresses.push(
                    v.parse()
                        .map_err(|_| format!("invalid ip {v:?}: expected an IPv4 or IPv6 address"))?,
                ),
                Some((k, v))
                    if match k.split_once('-') {
                        Some(("rx", rest)) => crate::rate_limiter::RateLimitConfig::apply_flag(&mut rx, rest, v)?,
                        Some(("tx", rest)) => crate::rate_limiter::RateLimitConfig::apply_flag(&mut tx, rest, v)?,
                        _ => false,
                    } => {}
                _ => {
                    return Err(format!(
                        "unknown NIC option {opt:?}: expected tap=NAME[,mac=MAC][,ip=ADDR][,rx-|tx-bps|pps[-burst]=N]"
                    ))
                }
            }
        }
        let tap = tap.ok_or("a NIC needs tap=NAME")?;
        for (dir, l) in [("rx", &rx), ("tx", &tx)] {
            if let Some(l) = l {
                l.check().map_err(|(f, m)| format!("{dir} {f}: {m}"))?;
            }
        }
        Ok(NicConfig {
            mac: mac.unwrap_or_else(|| derived_mac(&tap)),
            tap,
            rx_rate_limit: rx,
            tx_rate_limit: tx,
            addresses,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nic_limits_parse_from_flags() {
        let n: NicConfig = "tap=t,tx-pps=1000,tx-pps-burst=50,rx-bps=1000000"
            .parse()
            .unwrap();
        let tx = n.tx_rate_limit.unwrap().ops.unwrap();
        assert_eq!(
            (tx.size, tx.one_time_burst, tx.refill_time_ms),
            (1000, 50, 1000)
        );
        assert_eq!(n.rx_rate_limit.unwrap().bandwidth.unwrap().size, 1_000_000);
        assert!(n.rx_rate_limit.unwrap().ops.is_none());
        assert!("tap=t,tx-pps=0".parse::<NicConfig>().is_err());
        assert!(
            "tap=t,tx-pps-burst=5".parse::<NicConfig>().is_err(),
            "a burst without a rate"
        );
        assert!("tap=t,up-pps=5".parse::<NicConfig>().is_err());
    }

    #[test]
    fn nic_specs_parse_from_flags_and_json() {
        let n: NicConfig = "tap=tap0,mac=02:00:00:00:00:01".parse().unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, [2, 0, 0, 0, 0, 1]);
        let d: NicConfig = "tap=tap1".parse().unwrap();
        assert_eq!(d.mac, derived_mac("tap1"));
        assert_eq!(d.mac[0], 0x02);
        assert!("mac=02:00:00:00:00:01".parse::<NicConfig>().is_err());
        assert!(
            "tap=t,mac=01:00:00:00:00:01".parse::<NicConfig>().is_err(),
            "multicast"
        );
        assert!("tap=t,mac=zz".parse::<NicConfig>().is_err());
        let text = serde_json::to_string(&n).unwrap();
        assert_eq!(text, r#"{"tap":"tap0","mac":"02:00:00:00:00:01"}"#);
        assert_eq!(serde_json::from_str::<NicConfig>(&text).unwrap(), n);
        assert!(
            serde_json::from_str::<NicConfig>(r#"{"tap":"t","mac":"ff:00:00:00:00:01"}"#).is_err()
        );
    }
}
