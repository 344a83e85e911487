//! Durations in the configuration: `5s`, `250ms`, `10min` (humantime), or a bare number of
//! seconds — so `0`, documented as "disables", works written as a number too (in TOML, and in
//! `SLUICE_*` variables, which arrive as numbers when they look like one).

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    humantime_serde::serialize(d, s)
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Seconds(n) => Ok(Duration::from_secs(n)),
        Raw::Text(t) => {
            let t = t.trim();
            if let Ok(n) = t.parse::<u64>() {
                return Ok(Duration::from_secs(n));
            }
            humantime::parse_duration(t).map_err(|e| {
                serde::de::Error::custom(format!(
                    "\"{t}\" is not a duration ({e}): write it like 5s, 250ms or 10min, or as a number of seconds"
                ))
            })
        }
    }
}

/// An optional duration: absent means unset (a default derived from another key).
pub mod option {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::deserialize(d).map(Some)
    }
}
