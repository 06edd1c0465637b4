//! Units an operator writes in the config: durations ("5s", "250ms") and
//! sizes (16384, "256KiB"), as serde field deserializers with errors that
//! say what was expected.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration ({e}); use e.g. \"5s\" or \"250ms\"")))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeRepr {
    Int(u64),
    Text(String),
}

fn parse_size<E: serde::de::Error>(r: SizeRepr) -> Result<u64, E> {
    match r {
        SizeRepr::Int(n) => Ok(n),
        SizeRepr::Text(s) => s
            .parse::<bytesize::ByteSize>()
            .map(|b| b.as_u64())
            .map_err(|e| E::custom(format!("{s:?} is not a size ({e}); use e.g. 16384 or \"256KiB\""))),
    }
}

pub fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    parse_size(SizeRepr::deserialize(d)?)
}

pub fn de_size_usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    de_size(d).and_then(|n| usize::try_from(n).map_err(serde::de::Error::custom))
}

pub fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

pub fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_size(d).map(Some)
}
